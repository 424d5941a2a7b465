"""``python -m llamagym_pl.fit --config experiments/blackjack.yaml [--ckpt_path last]``.

A LightningCLI over :class:`PPOModule` and :class:`RolloutDataModule`: every constructor
argument is a YAML key / command-line flag (``--model.learning_rate 1e-4``), ``--print_config``
prints the full resolved config, and ``--ckpt_path last`` resumes from the newest
``last.ckpt`` in ``checkpoint.dirpath``.

Config errors (and training aborted on purpose, see :mod:`llamagym_pl.guards`) print as one
line; checkpoints are written atomically and resumed with ``weights_only``; Ctrl-C saves
``interrupted.ckpt`` and exits with status 1; SIGTERM (and SLURM's SIGUSR1, which also requeues
the job) stops at the next step with one line and status 128 + the signal
(:mod:`llamagym_pl.preemption`); a lost DDP rank stops the others with one line
(:mod:`llamagym_pl.lost_rank`); every such line ends with the command that resumes.
"""

from __future__ import annotations

import difflib
import re
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from llamagym_pl.checkpointing import InterruptCheckpoint, defer_interrupts
from llamagym_pl.datamodule import RolloutDataModule
from llamagym_pl.guards import (
    LlamaGymError,
    check_checkpoint_fits,
    check_ckpt_path,
    check_config,
    one_line_errors,
    read_checkpoint,
)
from llamagym_pl.lost_rank import rank_lost, watch_children
from llamagym_pl.module import PPOModule
from llamagym_pl.preemption import (
    REQUEUE_SIGNAL,
    Preempted,
    defer_preemption,
    on_slurm,
    received_signal,
    requeue_slurm_job,
)

TRAINER_DEFAULTS = {
    "max_epochs": 100,
    # One epoch = one PPO iteration: the rollout must be played afresh every epoch.
    "reload_dataloaders_every_n_epochs": 1,
    "num_sanity_val_steps": 0,
    # Greedy evaluation (Lightning validation) is a few thousand episodes: not every epoch.
    "check_val_every_n_epoch": 10,
    # Each rank plays its own envs; Lightning must not split a rank's rollout again.
    "use_distributed_sampler": False,
    "log_every_n_steps": 1,
    # Lightning's own save is atomic only when the system temp dir shares the checkpoint's disk.
    "plugins": {"class_path": "llamagym_pl.checkpointing.AtomicCheckpointIO"},
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "default"},
    },
}


class ConciseParser(LightningArgumentParser):
    """LightningCLI's parser, with parse errors that fit on a screen.

    The stock error prints the whole ~100-line usage above the one line that matters; here the
    usage is one line, and an unknown key gets a "did you mean" from the known keys.
    """

    def print_usage(self, file: Any = None) -> None:
        (file or sys.stdout).write(f"usage: {self.prog} [--config FILE] [--SECTION.KEY VALUE ...]\n")

    def error(self, message: str, ex: Exception | None = None) -> Any:
        return super().error(message + _did_you_mean(message, [a.dest for a in self._actions]), ex)


_UNKNOWN_KEY = (
    re.compile(r"Group '([\w.]+)' does not accept option '(\w+)'"),
    re.compile(r"unrecognized arguments: --([\w.]+)"),
)


def _did_you_mean(message: str, keys: list[str]) -> str:
    if "(did you mean" in message:  # with exit_on_error=False jsonargparse reports an error twice
        return ""
    for pattern in _UNKNOWN_KEY:
        match = pattern.search(message)
        if match:
            close = difflib.get_close_matches(".".join(match.groups()), keys, n=1, cutoff=0.7)
            return f" (did you mean '{close[0]}'?)" if close else ""
    return ""


class LlamaGymCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="Checkpoint to resume from: a path, or last (newest last.ckpt in checkpoint.dirpath).",
        )
        parser.add_argument(
            "--torch_num_threads",
            type=int | None,
            default=None,
            help="CPU threads for torch ops (None: torch's default, one per core). Small models "
            "run fastest on 1: their matmuls are too small to split, and on a busy machine a "
            "second thread waits for a free core at every op.",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.dirpath": "runs/default/checkpoints",
                "checkpoint.save_last": True,
                "checkpoint.every_n_epochs": 1,
                # Else Lightning saves only after validation (every check_val_every_n_epoch
                # epochs): a crash would lose up to that many epochs.
                "checkpoint.save_on_train_epoch_end": True,
            }
        )

    def before_instantiate_classes(self) -> None:
        threads = self.config.get("torch_num_threads")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"torch_num_threads={threads} must be >= 1 (or null for torch's default)")
            torch.set_num_threads(threads)


class ParseOnlyCLI(LlamaGymCLI):
    """The CLI's parser and parsed config with nothing built: for checking configs that a program
    writes (:mod:`llamagym_pl.sweep`) without loading a model for each."""

    def _set_seed(self) -> None:
        pass  # nothing runs here (and its "Seed set" line would precede a one-line error)

    def before_instantiate_classes(self) -> None:
        pass  # torch_num_threads is for the run that trains

    def instantiate_classes(self) -> None:
        pass


def make_cli(args=None, cli_class: type[LlamaGymCLI] = LlamaGymCLI, **kwargs: Any) -> LlamaGymCLI:
    """``cli_class`` over :class:`PPOModule` and :class:`RolloutDataModule` with this project's
    parser and trainer defaults, parsed from ``args``; ``kwargs`` go to LightningCLI."""
    return cli_class(
        PPOModule,
        RolloutDataModule,
        run=False,
        args=args,
        parser_class=ConciseParser,
        trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [InterruptCheckpoint()]},
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        **kwargs,
    )


def build_cli(args=None, run_fit: bool = True, cli_class: type[LlamaGymCLI] = LlamaGymCLI) -> LlamaGymCLI:
    """Parse the config (``args`` as a list or dict for tests) and optionally run ``fit``;
    ``cli_class`` may add arguments of its own (see :mod:`llamagym_pl.evaluate`)."""
    cli = make_cli(args, cli_class)
    check_config(cli.model, cli.datamodule)
    if run_fit:
        fit(cli)
    return cli


def fit(cli: LlamaGymCLI) -> None:
    """``trainer.fit`` with the CLI's model, data and ``--ckpt_path``."""
    ckpt_path = check_ckpt_path(cli.config.get("ckpt_path"))
    local = ckpt_file(cli, ckpt_path)
    if local is not None:  # a torn or foreign file: one line now, not a traceback from Lightning
        check_checkpoint_fits(cli.model, read_checkpoint(local), local)
    trainer = cli.trainer
    watch_children("llamagym_pl.fit", lambda: resume_hint(cli))  # rank 0's DDP children
    try:
        # weights_only: resuming runs no pickled code (the checkpoint holds plain values only).
        trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, weights_only=True)
    except (Preempted, SIGTERMException) as err:  # the latter: Lightning's own stop on SIGTERM
        signum = getattr(err, "signum", None) or received_signal() or signal.SIGTERM
        detail = f" in epoch {trainer.current_epoch}, which is abandoned; {resume_hint(cli)}"
        if signum == REQUEUE_SIGNAL and on_slurm() and trainer.global_rank == 0:
            detail += f"; requeued SLURM job {requeue_slurm_job()}"
        raise Preempted(signum, detail) from err
    except Exception as err:
        lost = rank_lost(err, trainer.global_rank, trainer.world_size, resume_hint(cli))
        if lost is None:
            raise
        raise lost from err


def resume_hint(cli: LlamaGymCLI) -> str:
    """Where the run's last whole epoch is, and the command that resumes from it."""
    configs = " ".join(f"--config {c}" for c in cli.config.get("config") or [])
    command = f"`python -m llamagym_pl.fit {configs} ... --ckpt_path last`".replace("  ", " ")
    last = ckpt_file(cli, "last")
    if last is None:
        return f"no epoch was saved yet: run again from the start (or {command}, which starts over too)"
    return f"{last} holds the epochs before it: resume with {command} (the same flags)"


def ckpt_file(cli: LlamaGymCLI, ckpt_path: str | None) -> str | None:
    """The local file ``trainer.fit`` will resume from: ``ckpt_path`` itself, or for ``last`` the
    newest ``last*.ckpt`` in ``checkpoint.dirpath`` (as Lightning picks it); None otherwise."""
    if ckpt_path is None or "://" in ckpt_path or ckpt_path in ("best", "hpc"):
        return None
    if ckpt_path != "last":
        return ckpt_path
    dirpath = cli.config.get("checkpoint", {}).get("dirpath")
    last = [p for p in Path(dirpath or ".").glob("last*.ckpt") if re.match(r"last(-\d+)?$", p.stem)]
    return str(max(last, key=lambda p: p.stat().st_mtime)) if dirpath and last else None


SETUP_ERRORS = (ValueError, TypeError, OSError, LlamaGymError, MisconfigurationException)
"""Errors while building from the config are config errors: printed as one line (Lightning's
``MisconfigurationException``: e.g. ``accelerator: gpu`` on a machine without one)."""


def main(argv: list[str] | None = None) -> None:
    with one_line_errors("llamagym_pl.fit", SETUP_ERRORS):
        cli = build_cli(argv, run_fit=False)
    defer_interrupts()  # Ctrl-C stops at the next step, where shutting down is safe
    defer_preemption()  # so do a scheduler's SIGTERM and SLURM's SIGUSR1
    with one_line_errors("llamagym_pl.fit", (LlamaGymError,)):
        fit(cli)


if __name__ == "__main__":
    main()
