"""Settings of the imperative loop (``ppo_config_dict``, ``generate_config_dict``) and the user's model.

The loop trains with :class:`~llamagym_pl.module.PPOModule`'s hyperparameters and the rollout's
invalid-action and prompt-budget settings, by the same names and with the same defaults, read
from their signatures: nothing is copied here but the few defaults that differ.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from torch import nn

from llamagym_pl.actions import ScoreNormalization
from llamagym_pl.guards import check_ranges
from llamagym_pl.module import PPOModule
from llamagym_pl.policy import PolicyWithValueHead, disable_dropout, half_precision_trainable
from llamagym_pl.rollout import RolloutCollector
from llamagym_pl.sampling import build_generation_config, off_policy_keys

# The loop's warnings are the loop's: logged under its module's name.
log = logging.getLogger("llamagym_pl.imperative")

# LlamaGym's max_new_tokens. Sampling is from the untruncated softmax at `temperature` (LlamaGym
# used temperature 0.9, top_p 0.6) because PPO scores replies with exactly that distribution
# (log-probs at the same temperature): sampling from another one makes the "old" log-probs wrong
# and the ratios biased. For the same reason the model's own generation_config.json is set aside
# (llamagym_pl.sampling) and training refuses top_k/top_p.
GENERATE_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 32,
    "do_sample": True,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
}
GENERATE_KEY = "generate_config_dict[{!r}]"  # how errors name a generate_config_dict key
PPO_KEY = "ppo_config_dict[{!r}]"  # ... and a ppo_config_dict key
# TRL PPOConfig names (what LlamaGym scripts pass) -> ours.
_ALIASES = {"ppo_epochs": "update_epochs", "lam": "gae_lambda", "cliprange": "clip_coef"}

MODEL_ONLY = frozenset(
    {
        "name_or_path",
        "dtype",
        "trust_remote_code",
        "quantization",
        "quant_compute_dtype",
        "gradient_checkpointing",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
        "prepare_batch_size",
        "max_nonfinite_steps",
    }
)
"""PPOModule arguments the loop has no use for: the user brings the model (and its adapter), a
preparation pass runs a minibatch's rows at a time, and a non-finite loss is not skipped."""
ROLLOUT_KEYS = ("invalid_action", "fallback_action", "invalid_penalty", "max_prompt_tokens")
LOOP_DEFAULTS = {
    # Fine-tuning a pretrained LLM in full, close to the 1.41e-5 of TRL that LlamaGym used;
    # PPOModule's 3e-4 suits the tiny model trained from scratch.
    "learning_rate": 1e-5,
}


def _defaults(function: Any, names: Any) -> dict[str, Any]:
    parameters = inspect.signature(function).parameters
    return {name: parameters[name].default for name in names}


def settings_defaults() -> dict[str, Any]:
    """Every training setting the loop takes, with its default: PPOModule's and the rollout's."""
    module = [name for name in inspect.signature(PPOModule.__init__).parameters if name != "self"]
    ppo = _defaults(PPOModule.__init__, [name for name in module if name not in MODEL_ONLY])
    return ppo | _defaults(RolloutCollector.__init__, ROLLOUT_KEYS) | LOOP_DEFAULTS


@dataclass
class ImperativeConfig:
    """Settings of the imperative loop (``ppo_config_dict``).

    Besides the fields below, ``ppo_config_dict`` takes :class:`~llamagym_pl.module.PPOModule`'s
    training hyperparameters (``gamma``, ``clip_coef``, ``ent_coef``, ``lr_schedule``,
    ``kl_coef`` ...) and the rollout's ``invalid_action``, ``fallback_action``,
    ``invalid_penalty`` and ``max_prompt_tokens``, by those names and with those defaults, but
    ``learning_rate`` (1e-5). They are read as attributes (``config.gamma``). Keys may carry a
    ``ppo/`` prefix or a TRL name (``ppo_epochs``, ``lam``, ``cliprange``, ``mini_batch_size``).

    Args:
        batch_size: finished episodes per PPO update (LlamaGym counted turns).
        policy: ``generate`` (the LM writes each reply) or ``score`` (it picks among the agent's
            ``candidate_actions``), as ``data.policy``.
        score_normalization: as ``data.score_normalization``.
        action_space: the env's action space (``env.action_space``); else ``agent.action_space``.
        seed: seeds torch's global RNG once (replies sample from it) and the fallback and
            minibatch RNGs; None leaves torch's RNG alone (the other RNGs then use 0).
        total_updates: the PPO updates ``lr_schedule: linear`` decays the learning rate over
            (to 0), as ``trainer.max_epochs`` does for ``PPOModule``.
        group_size: for ``advantage_estimator: grpo/gigpo``: each ``group_size`` consecutive
            episodes of a batch form a group (the script should reset them from the same seed:
            ``env.reset(seed=...)``, else a group compares episodes from different states).
            ``batch_size`` must be a multiple of it.
        settings: PPOModule's and the rollout's settings (see above).
    """

    batch_size: int = 8
    policy: Literal["generate", "score"] = "generate"
    score_normalization: ScoreNormalization = "token"
    action_space: Any = None
    seed: int | None = None
    total_updates: int | None = None
    group_size: int = 1
    settings: dict[str, Any] = field(default_factory=settings_defaults)

    def __getattr__(self, name: str) -> Any:
        settings = self.__dict__.get("settings", {})
        if name in settings:
            return settings[name]
        raise AttributeError(f"{type(self).__name__} has no setting {name!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ImperativeConfig:
        """Build from ``ppo_config_dict``: keys may carry a ``ppo/`` prefix or a TRL name."""
        values = {_ALIASES.get(k.split("/")[-1], k.split("/")[-1]): v for k, v in values.items()}
        mini_batch_size = values.pop("mini_batch_size", None)
        own = {f.name for f in fields(cls)} - {"settings"}
        settings = settings_defaults()
        unknown = sorted(set(values) - own - set(settings))
        if unknown:
            known = sorted([*own, *settings, "mini_batch_size", *_ALIASES])
            raise ValueError(f"unknown ppo_config_dict keys {unknown}; known keys: {known}")
        settings.update({k: v for k, v in values.items() if k not in own})
        config = cls(**{k: v for k, v in values.items() if k in own}, settings=settings)
        if mini_batch_size is not None and "num_minibatches" not in values:
            config.settings["num_minibatches"] = max(1, config.batch_size // int(mini_batch_size))
        config.validate()
        return config

    def validate(self) -> None:
        s = self.settings
        own = {name: getattr(self, name) for name in ("batch_size", "total_updates", "group_size")}
        check_ranges(PPO_KEY, **own, **s)
        if s["advantage_estimator"] != "gae" and self.group_size < 2:
            raise ValueError(
                f"{PPO_KEY.format('advantage_estimator')}={s['advantage_estimator']!r} compares the episodes "
                f"of a group: set {PPO_KEY.format('group_size')} to 2 or more"
            )
        if self.batch_size % self.group_size:
            raise ValueError(
                f"{PPO_KEY.format('batch_size')}={self.batch_size} is not a multiple of "
                f"{PPO_KEY.format('group_size')}={self.group_size}: a batch holds whole groups"
            )
        if s["num_minibatches"] > self.batch_size:
            raise ValueError(
                f"num_minibatches={s['num_minibatches']} exceeds batch_size={self.batch_size} episodes"
            )
        if s["lr_schedule"] not in ("constant", "linear"):
            raise ValueError(
                f"{PPO_KEY.format('lr_schedule')}={s['lr_schedule']!r} must be 'constant' or 'linear'"
            )
        if s["lr_schedule"] == "linear" and self.total_updates is None:
            raise ValueError(
                f"{PPO_KEY.format('lr_schedule')}='linear' needs {PPO_KEY.format('total_updates')}: the "
                "number of PPO updates to decay the learning rate over"
            )


def generation_kwargs(generate_config_dict: dict[str, Any] | None) -> dict[str, Any]:
    """HF ``generate`` kwargs: :data:`GENERATE_DEFAULTS` updated with the user's (``generate/`` prefix ok).

    They are all that generation uses (the model's ``generation_config.json`` is set aside). Keys
    that make sampling differ from the softmax PPO scores (logits processors such as
    ``repetition_penalty``) are applied, with a warning that PPO is off-policy. A temperature is
    fine: PPO scores at the same one.
    """
    kwargs = dict(GENERATE_DEFAULTS)
    kwargs.update({k.split("/")[-1]: v for k, v in (generate_config_dict or {}).items()})
    build_generation_config(kwargs, what="generate_config_dict")  # a typo fails here, not in act()
    off_policy = off_policy_keys(kwargs)
    if off_policy:
        log.warning(
            "generate_config_dict sets %s: sampling then differs from the softmax that PPO scores "
            "replies with, so PPO is off-policy and its ratios are biased; for on-policy PPO remove these "
            "keys",
            ", ".join(off_policy),
        )
    return kwargs


def as_policy(model: nn.Module, critic: bool = True) -> PolicyWithValueHead:
    """Wrap a causal LM with our value head (none without ``critic``: critic-free estimators); a
    :class:`PolicyWithValueHead` passes through.

    Refuses trainable weights in half precision (:func:`half_precision_trainable`), then turns
    off every dropout of the user's model (:func:`disable_dropout`): updates run in train mode,
    replies and their old log-probs in eval mode, and PPO's ratios need the two to agree.
    """
    if not isinstance(model, PolicyWithValueHead):
        if hasattr(model, "pretrained_model") and hasattr(model, "v_head"):
            log.warning(
                "got TRL's AutoModelForCausalLMWithValueHead: training its LM with our own value head"
            )
            model = model.pretrained_model
        if not isinstance(model, nn.Module) or not hasattr(model, "generate"):
            raise TypeError(
                f"model must be a Hugging Face causal LM (AutoModelForCausalLM), got {type(model)}"
            )
        model = PolicyWithValueHead(model, critic=critic)
    half = half_precision_trainable(model)
    if half:
        dtype = model.get_parameter(half[0]).dtype
        raise ValueError(
            f"{len(half)} trainable weights of the model are in {dtype} (e.g. {half[0]}), where AdamW's "
            "small updates round away: load the model in float32 (from_pretrained(..., "
            "dtype=torch.float32)), or add a LoRA adapter whose weights are float32 (peft's default)"
        )
    log.info("%d dropout probabilities of the model set to 0", disable_dropout(model))
    return model
