"""Failure handling: errors that name the bad value and its fix, and counted recoveries.

What goes wrong, and what happens (the README's "Failure modes" section says the same):

- a config that cannot work (unknown key, wrong type, out-of-range value, missing model or
  checkpoint, env that cannot be made, tokenizer without a chat template, too many
  minibatches): :class:`ConfigError` (or the parser's own error) before training starts,
  printed by the CLI as one line;
- a fault during training (env faults past ``data.max_env_errors`` in one rollout, non-finite
  losses ``model.max_nonfinite_steps`` times in a row): :class:`RunAborted`, also one line;
  fewer faults are recovered from, counted and logged (:class:`EnvFaults`,
  :class:`NonFiniteLoss`; env faults in :mod:`llamagym_pl.env_faults`);
- a checkpoint that cannot be resumed from (torn, not a checkpoint, a plain state dict, weights only,
  another model): :class:`ConfigError` naming the file, before training (:func:`read_checkpoint`,
  :func:`check_checkpoint_fits`);
- a crash: checkpoints are written atomically, so ``last.ckpt`` is always a whole epoch; Ctrl-C
  also saves ``interrupted.ckpt``; a full disk is one line, the old ``last.ckpt`` kept (all in
  :mod:`llamagym_pl.checkpointing`);
- preemption (SIGTERM, SLURM's SIGUSR1): stop at the next step, one line, status 128 + signal
  (:mod:`llamagym_pl.preemption`); a lost DDP rank: one line on the survivors
  (:mod:`llamagym_pl.lost_rank`).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DEBUG_ENV = "LLAMAGYM_PL_DEBUG"
"""Set to 1 to get the full traceback of errors the CLI otherwise prints as one line."""


class LlamaGymError(Exception):
    """An error whose message says what to fix; the CLI prints it without a traceback."""

    label = "error: "
    """What the CLI prints between its name and the message."""
    exit_status = 1


class ConfigError(LlamaGymError, ValueError):
    """A setting, model or checkpoint that cannot work with the rest of the config."""


class RunAborted(LlamaGymError, RuntimeError):
    """Training stopped on purpose: faults went past their configured limit."""


@contextmanager
def one_line_errors(prog: str, types: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Turn ``types`` of errors into ``prog: error: <message>`` on stderr and exit status 1 (a
    :class:`LlamaGymError` may say otherwise: its ``label`` and ``exit_status``)."""
    try:
        yield
    except types as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        label, status = getattr(err, "label", "error: "), getattr(err, "exit_status", 1)
        hint = f"\n(set {DEBUG_ENV}=1 for the traceback)" if label == "error: " else ""
        message = f"{prog}: {label}{err}{hint}"
        if status == 1:
            raise SystemExit(message) from None  # Python prints it and exits with 1
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(status) from None


# ----------------------------------------------------------------------------- config
def check_group_size(num_envs: int, group_size: int) -> None:
    """Refuse ``num_envs`` that are not whole groups of ``group_size`` (one line)."""
    if num_envs % group_size:
        raise ConfigError(
            f"data.num_envs={num_envs} is not a multiple of data.group_size={group_size}: a group's "
            f"episodes are played side by side, so set num_envs to a multiple of {group_size}"
        )


def check_config(model: Any, datamodule: Any) -> None:
    """Checks across model and data that would otherwise fail only once training runs."""
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"the tokenizer of model.name_or_path={model.hparams.name_or_path!r} has no chat template; "
            "use an instruct/chat model, or add a Jinja `chat_template` to its tokenizer_config.json"
        )
    budget, per_env = next(iter(datamodule.budget.items()))  # steps_per_env or episodes_per_env
    # A step budget plays from num_envs episodes (as long as they last) to one per turn.
    most = datamodule.hparams.num_envs * per_env
    if model.hparams.num_minibatches > most:
        safe = "data.num_envs" if budget == "steps_per_env" else str(most)  # always that many episodes
        raise ConfigError(
            f"model.num_minibatches={model.hparams.num_minibatches} is more than a rollout can have "
            f"episodes (data.num_envs x data.{budget} = {most}); lower it to at most {safe}"
        )
    estimator, group_size = model.hparams.advantage_estimator, datamodule.hparams.group_size
    if estimator != "gae" and group_size < 2:
        raise ConfigError(
            f"model.advantage_estimator={estimator} compares the episodes of a group, but "
            f"data.group_size={group_size}: set data.group_size to 2 or more (e.g. 8), and data.num_envs "
            "to a multiple of it"
        )
    check_group_size(datamodule.hparams.num_envs, group_size)
    datamodule.make_collector(1).close()  # the env id and kwargs, and the fallback action


RANGES: dict[str, tuple[str, Any, str]] = {
    "gamma": ("in", (0.0, 1.0), ""),
    "gae_lambda": ("in", (0.0, 1.0), ""),
    "learning_rate": (">", 0, ""),
    "clip_coef": (">", 0, ""),
    "max_grad_norm": (">", 0, ""),
    "temperature": (">", 0, " (use greedy evaluation instead)"),
    "update_epochs": (">=", 1, ""),
    "num_minibatches": (">=", 1, ""),
    "prepare_batch_size": (">=", 1, ""),
    "batch_size": (">=", 1, ""),
    "total_updates": (">=", 1, ""),
    "num_envs": (">=", 1, ""),
    "group_size": (">=", 1, ""),
    "step_advantage_weight": (">=", 0, ""),
    "eval_num_envs": (">=", 1, ""),
    "steps_per_env": (">=", 1, ""),
    "episodes_per_env": (">=", 1, ""),
    "max_new_tokens": (">=", 1, ""),
    "max_prompt_tokens": (">=", 1, " (or null: no budget)"),
    "max_env_errors": (">=", 0, " (0: abort on the first)"),
    "env_timeout_s": (">", 0, " (or null: no limit)"),
}
"""Every bounded setting, in one place: ``name: (op, bound, hint)``; PPOModule, RolloutDataModule,
the rollout and the imperative loop all check theirs here."""


def check_ranges(key: str, **values: Any) -> None:
    """Raise a ValueError naming the first of ``values`` outside its :data:`RANGES` (settings
    without a range, and None values, pass). ``key`` formats a setting's name as the user wrote
    it, e.g. ``"model.{}"``."""
    for name, value in values.items():
        if value is None or name not in RANGES:
            continue
        op, bound, hint = RANGES[name]
        if op == "in":
            low, high = bound
            if not (low <= value <= high) or math.isnan(value):
                raise ValueError(
                    f"{key.format(name)}={value} is outside [{low}, {high}]; pick a value in that range"
                )
        elif not (value > bound if op == ">" else value >= bound):
            raise ValueError(f"{key.format(name)}={value} must be {op} {bound}{hint}")


def check_ckpt_path(ckpt_path: str | None) -> str | None:
    """``ckpt_path`` if it names a checkpoint file (or ``last``/``best``/``hpc``/a URL)."""
    if ckpt_path is None or ckpt_path in ("last", "best", "hpc") or "://" in ckpt_path:
        return ckpt_path
    if not Path(ckpt_path).is_file():
        what = "is a directory" if Path(ckpt_path).is_dir() else "does not exist"
        raise ConfigError(
            f"ckpt_path {ckpt_path!r} {what}; pass a .ckpt file written by llamagym_pl.fit, or `last` "
            "for the newest last.ckpt in checkpoint.dirpath"
        )
    return ckpt_path


RESUME_HINT = (
    "pass a whole .ckpt written by llamagym_pl.fit (`last`: the newest last.ckpt in checkpoint.dirpath, "
    "written atomically after every epoch)"
)


def read_checkpoint(path: str | Path, resume: bool = True) -> dict[str, Any]:
    """The Lightning checkpoint at ``path``, or :class:`ConfigError` saying why the file is not one
    (torn, not a torch file, pickled objects, a plain state dict, no optimizer state to resume).

    Read with ``weights_only`` (no pickled code runs) and ``mmap``: the tensors stay on disk until
    used, so checking a checkpoint before ``fit`` loads it again costs little. ``resume``: the
    training state (optimizer, loops) is required too, not only the weights.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(
            f"checkpoint {str(path)!r} holds pickled objects that loading with weights_only=True refuses "
            f"(no pickled code runs on resume: {str(err).splitlines()[0]}); it was not written by "
            f"llamagym_pl.fit: {RESUME_HINT}"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ConfigError(
            f"checkpoint {str(path)!r} cannot be read ({str(err).splitlines()[0][:120]}): it is truncated "
            f"(cut short while copied or written?) or not a torch checkpoint; {RESUME_HINT}"
        ) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        what = f"a {type(checkpoint).__name__}"
        if isinstance(checkpoint, dict):
            what = f"a dict of {len(checkpoint)} entries, no 'state_dict': a state dict from torch.save?"
        raise ConfigError(
            f"checkpoint {str(path)!r} is not a Lightning checkpoint ({what}); {RESUME_HINT}. To start "
            "from other weights, save_pretrained them and set model.name_or_path to that directory"
        )
    if resume and "optimizer_states" not in checkpoint:
        raise ConfigError(
            f"checkpoint {str(path)!r} holds weights only (no optimizer state: saved with "
            f"save_weights_only?), so training cannot resume from it; {RESUME_HINT}, or evaluate it "
            "with python -m llamagym_pl.evaluate"
        )
    return checkpoint


SHAPE_HPARAMS = ("name_or_path", "lora_r", "lora_target_modules", "quantization")
"""Hyperparameters that decide which weights a checkpoint holds, and their shapes."""


def check_checkpoint_fits(module: Any, checkpoint: dict[str, Any], source: Any) -> None:
    """Raise :class:`ConfigError` unless ``checkpoint["state_dict"]`` fits ``module``.

    Names the checkpoint, what does not fit and the hyperparameters that differ, instead of
    ``load_state_dict``'s list of size mismatches. Frozen weights a LoRA checkpoint leaves out
    are not required (see :func:`llamagym_pl.policy.drop_frozen`).
    """
    saved, own = checkpoint["state_dict"], module.state_dict()
    problems = [
        f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} here"
        for k, v in saved.items()
        if k in own and v.shape != own[k].shape
    ]
    problems += [f"{k}: not in this model" for k in saved if k not in own]
    problems += [
        f"{n}: missing from the checkpoint"
        for n, p in module.named_parameters()
        if p.requires_grad and n not in saved
    ]
    if not problems:
        return
    theirs, ours = checkpoint.get("hyper_parameters", {}), dict(module.hparams)
    differ = [
        f"{k}={theirs[k]!r} (this run: {ours[k]!r})"
        for k in SHAPE_HPARAMS
        if k in theirs and theirs[k] != ours.get(k)
    ]
    why = (
        ("it was written with model." + ", model.".join(differ))
        if differ
        else "its model hyperparameters match"
    )
    raise ConfigError(
        f"checkpoint {str(source)!r} does not fit this model ({len(problems)} weights differ, e.g. "
        f"{'; '.join(problems[:3])}); {why}. Use the config the checkpoint was trained with"
    )


# ----------------------------------------------------------------------------- context
def context_length(policy: Any) -> int | None:
    """The model's context length from its config (None when it does not say)."""
    config = getattr(getattr(policy, "lm", policy), "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def check_context(policy: Any, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a prompt that, with its reply, would not fit the model's context."""
    limit = context_length(policy)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise ConfigError(
            f"a prompt of {prompt_tokens} tokens plus data.max_new_tokens={max_new_tokens} exceeds the "
            f"model's context of {limit} tokens; set data.max_prompt_tokens (drops the oldest turns), "
            "shorten the system prompt or observations, cap episodes with data.max_episode_steps, lower "
            "data.max_new_tokens, or use a longer-context model"
        )


# ----------------------------------------------------------------------------- training faults
class NonFiniteLoss:
    """Skip minibatches whose loss is NaN/inf; raise :class:`RunAborted` after ``limit`` in a row."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ConfigError(f"model.max_nonfinite_steps={limit} must be >= 1")
        self.limit = limit
        self.in_a_row = 0
        self.skipped = 0  # this epoch (reset by the module)

    def skip(self, loss: torch.Tensor, epoch: int, batch_idx: int) -> bool:
        if bool(torch.isfinite(loss)):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.skipped += 1
        where = f"epoch {epoch}, minibatch {batch_idx}"
        if self.in_a_row >= self.limit:
            raise RunAborted(
                f"the loss was non-finite ({loss.item()}) in {self.in_a_row} minibatches in a row "
                f"(model.max_nonfinite_steps={self.limit}), last at {where}: training diverged. "
                "Lower model.learning_rate or model.max_grad_norm, check the rewards, or resume "
                "from an earlier checkpoint"
            )
        log.warning(
            "non-finite loss (%s) at %s: update skipped (%d in a row)", loss.item(), where, self.in_a_row
        )
        return True
