"""The LlamaGym-style loop: ``agent.act(obs)``, ``agent.assign_reward(r)``, ``agent.terminate_episode()``.

:class:`ImperativeTrainer` is what :class:`~llamagym_pl.agent.Agent`'s imperative methods drive.
It records every episode as a :class:`~llamagym_pl.rollout.Episode` and, once ``batch_size``
episodes are finished, runs one PPO iteration with the functions the Lightning path uses
(:func:`~llamagym_pl.buffer.build_buffer`, :func:`~llamagym_pl.update.score_rollout`,
:class:`~llamagym_pl.buffer.MinibatchSampler`, :func:`~llamagym_pl.update.ppo_loss`). The two paths
differ only in who owns the loop, never in the PPO math.

It fixes three faults of the original LlamaGym ``Agent``:

* ``act`` always returns a valid action. LlamaGym returned ``None`` into ``env.step`` when
  ``extract_action`` failed, and dropped the reply, so the conversation lost step with the env.
  Here an unparsable or out-of-space reply plays a counted fallback action.
* Each ``assign_reward`` is the reward of the last ``act`` turn, and GAE runs over turns. LlamaGym
  spread a sparse final reward over the turns with a wrong divisor (messages / 2, counting the
  system message).
* A reply is the decoded new tokens of ``generate``, not text split at a template marker.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from llamagym_pl import ppo
from llamagym_pl.agent import Agent
from llamagym_pl.buffer import MinibatchSampler, RolloutBuffer, build_buffer, minibatch
from llamagym_pl.chat import UnknownWords, build_messages, left_pad, prompt_start, prompt_token_ids
from llamagym_pl.policy import PolicyWithValueHead, disable_dropout, half_precision_trainable
from llamagym_pl.rollout import (
    Episode,
    RolloutStats,
    _sample_space,
    cut_at_eos,
    derive_seed,
    discrete_action_names,
    rollout_metrics,
)
from llamagym_pl.sampling import (
    build_generation_config,
    generate_from_settings,
    off_policy_keys,
    refuse_truncation,
)
from llamagym_pl.update import ppo_loss, score_rollout

log = logging.getLogger(__name__)

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
_SAMPLING_KEYS = ("temperature", "top_k", "top_p")
GENERATE_KEY = "generate_config_dict[{!r}]"  # how errors name a generate_config_dict key
# TRL PPOConfig names (what LlamaGym scripts pass) -> ours.
_ALIASES = {"ppo_epochs": "update_epochs", "lam": "gae_lambda", "cliprange": "clip_coef"}


@dataclass
class ImperativeConfig:
    """PPO settings of the imperative loop (``ppo_config_dict``), named as in ``PPOModule``.

    Defaults equal ``PPOModule``'s except ``learning_rate`` (1e-5, for fine-tuning a pretrained LLM
    in full, close to the 1.41e-5 of TRL that LlamaGym used; ``PPOModule``'s 3e-4 suits the tiny
    model trained from scratch) and ``batch_size`` (8, as in LlamaGym's example).

    Args:
        batch_size: finished episodes per PPO update (LlamaGym counted turns).
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        adam_eps: AdamW epsilon (1e-5 as in CleanRL).
        gamma: discount per turn.
        gae_lambda: GAE lambda.
        update_epochs: passes over each batch.
        num_minibatches: minibatches per pass; TRL's ``mini_batch_size`` sets it to
            ``batch_size // mini_batch_size``.
        clip_coef: PPO ratio clip.
        clip_vloss: clip the value update around the old values.
        vf_coef: value loss weight.
        ent_coef: entropy bonus weight.
        max_grad_norm: gradient norm clip.
        target_kl: stop an update's remaining minibatches once approx-KL exceeds it (None: never).
        norm_adv: normalize advantages once per batch of episodes (not per minibatch).
        invalid_action: ``random`` (a random action) or ``fixed`` (``fallback_action``) for a reply
            that ``extract_action`` rejects (raises) or maps outside the action space.
        fallback_action: the action for ``invalid_action="fixed"``.
        invalid_penalty: added to the reward of an invalid turn (``rollout/return_mean`` excludes it).
        action_space: the env's action space (``env.action_space``); else ``agent.action_space``.
        seed: seeds torch's global RNG once (generation samples from it) and the fallback and
            minibatch RNGs; None leaves torch's RNG alone (the other RNGs then use 0).
        max_prompt_tokens: prompt budget in tokens (None: whole conversations). Longer prompts
            drop their oldest turns, keeping the system prompt and the current observation, as
            ``data.max_prompt_tokens`` does (see :func:`~llamagym_pl.chat.fit_to_budget`).
    """

    batch_size: int = 8
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    adam_eps: float = 1e-5
    gamma: float = 1.0
    gae_lambda: float = 0.95
    update_epochs: int = 4
    num_minibatches: int = 4
    clip_coef: float = 0.2
    clip_vloss: bool = True
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    max_grad_norm: float = 1.0
    target_kl: float | None = None
    norm_adv: bool = True
    invalid_action: Literal["random", "fixed"] = "random"
    fallback_action: Any = None
    invalid_penalty: float = 0.0
    action_space: Any = None
    seed: int | None = None
    max_prompt_tokens: int | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ImperativeConfig:
        """Build from ``ppo_config_dict``: keys may carry a ``ppo/`` prefix or a TRL name."""
        values = {_ALIASES.get(k.split("/")[-1], k.split("/")[-1]): v for k, v in values.items()}
        mini_batch_size = values.pop("mini_batch_size", None)
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            known = sorted([f.name for f in fields(cls)] + ["mini_batch_size", *_ALIASES])
            raise ValueError(f"unknown ppo_config_dict keys {unknown}; known keys: {known}")
        config = cls(**values)
        if mini_batch_size is not None and "num_minibatches" not in values:
            config.num_minibatches = max(1, config.batch_size // int(mini_batch_size))
        config.validate()
        return config

    def validate(self) -> None:
        for name in ("batch_size", "update_epochs", "num_minibatches", "learning_rate", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ppo_config_dict[{name!r}]={getattr(self, name)} must be > 0")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ppo_config_dict[{name!r}]={getattr(self, name)} is outside [0, 1]")
        if self.num_minibatches > self.batch_size:
            raise ValueError(
                f"num_minibatches={self.num_minibatches} exceeds batch_size={self.batch_size} episodes"
            )
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"ppo_config_dict['max_prompt_tokens']={self.max_prompt_tokens} must be >= 1")
        if self.invalid_action not in ("random", "fixed"):
            raise ValueError(f"invalid_action={self.invalid_action!r} must be 'random' or 'fixed'")


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


def as_policy(model: nn.Module) -> PolicyWithValueHead:
    """Wrap a causal LM with our value head; a :class:`PolicyWithValueHead` passes through.

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
        model = PolicyWithValueHead(model)
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


class ImperativeTrainer:
    """Plays an agent turn by turn and trains it with PPO every ``batch_size`` finished episodes."""

    def __init__(
        self,
        agent: Agent,
        model: nn.Module,
        tokenizer: Any,
        device: str | torch.device | None,
        generate_config_dict: dict[str, Any] | None = None,
        ppo_config_dict: dict[str, Any] | None = None,
        training: bool = True,
    ) -> None:
        if model is None or tokenizer is None:
            raise ValueError(
                "act() needs a model and tokenizer: construct the agent as MyAgent(model, tokenizer, device)"
            )
        self.agent = agent
        self.config = ImperativeConfig.from_dict(dict(ppo_config_dict or {}))
        self.generate_kwargs = generation_kwargs(generate_config_dict)
        if training:
            refuse_truncation(self.generate_kwargs, GENERATE_KEY)
        if tokenizer.pad_token is None:
            # Left padding needs a pad id; borrowing eos (as load_tokenizer does) leaves the vocab alone.
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.policy = as_policy(model)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.policy.value_head.to(self.device)
        if any(p.device != self.device for p in self.policy.lm.parameters()):
            self.policy.lm.to(self.device)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        cfg = self.config
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.learning_rate, eps=cfg.adam_eps, weight_decay=cfg.weight_decay
        )
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(derive_seed(cfg.seed or 0, 2))
        self.training = training
        self.episode: Episode | None = None  # the episode being played
        self.episodes: list[Episode] = []  # finished, waiting for the next update
        self.unknown_words = UnknownWords()  # warns once per word the tokenizer cannot read
        self.num_updates = 0
        self._reset_timers()

    # ------------------------------------------------------------------ the loop
    def act(self, observation: Any) -> Any:
        """Reply to ``observation`` and return a valid action (a counted fallback if invalid)."""
        if self.episode is None:
            self.episode = Episode(system_prompt=self.agent.get_system_prompt())
        ep = self.episode
        text = self.agent.format_observation(observation)
        if not isinstance(text, str):
            raise TypeError(f"format_observation returned {type(text).__name__} ({text!r}); return a str")
        start = self._prompt_start(ep, text)
        prompt_ids, reply_ids, reply = self._generate(ep, text, start)
        action, invalid = self._parse(reply)
        # Appended together, after parsing, so the lists stay in step whatever happens above.
        self._append_observation(ep, text, start, prompt_ids)
        ep.responses.append(reply)
        ep.actions.append(action)
        ep.response_ids.append(reply_ids)
        ep.invalid.append(invalid)
        ep.rewards.append(0.0)
        ep.penalties.append(self.config.invalid_penalty if invalid else 0.0)
        return action

    def assign_reward(self, reward: float) -> None:
        """Add ``reward`` to the turn of the last ``act`` (a second call for one turn adds up)."""
        if self.episode is None or not self.episode.responses:
            raise RuntimeError(
                "assign_reward() was called before act() in this episode: a reward belongs to the turn "
                "of the last act(observation), so call act first"
            )
        self.episode.rewards[-1] += float(reward)
        self.episode.env_return += float(reward)

    def terminate_episode(self, truncated: bool = False, next_observation: Any = None) -> dict[str, float]:
        """End the episode; train if ``batch_size`` episodes are finished. Returns stats or ``{}``.

        ``truncated=True`` (a time limit, not a terminal state) needs ``next_observation``: the
        value of that state is bootstrapped instead of assuming the future is worth 0.
        """
        if truncated and next_observation is None:
            raise ValueError("terminate_episode(truncated=True) needs next_observation= to bootstrap from")
        ep, self.episode = self.episode, None
        if ep is None or not ep.responses:
            return {}
        if truncated:
            ep.truncated = True
            text = self.agent.format_observation(next_observation)
            # The state to bootstrap from, with the prompt it would be played from.
            start = self._prompt_start(ep, text)
            self._append_observation(ep, text, start, self._prompt_ids(ep, text, start))
        else:
            ep.terminated = True
        if not self.training:
            return {}
        self.episodes.append(ep)
        if len(self.episodes) < self.config.batch_size:
            return {}
        return self._update()

    def set_training(self, mode: bool) -> None:
        if mode != self.training and self.episode is not None and self.episode.responses:
            raise RuntimeError("switch agent.train()/agent.eval() between episodes, not during one")
        if mode:
            refuse_truncation(self.generate_kwargs, GENERATE_KEY)
        self.training = mode

    # ------------------------------------------------------------------ acting
    def _prompt_start(self, ep: Episode, text: str) -> int:
        """How many of the oldest turns the prompt for ``text`` drops (0 without a budget)."""
        budget = self.config.max_prompt_tokens
        if budget is None:
            return 0
        previous = ep.prompt_start[-1] if ep.prompt_start else 0
        observations = [*ep.observations, text]
        return prompt_start(self.tokenizer, ep.system_prompt, observations, ep.responses, budget, previous)

    def _append_observation(self, ep: Episode, text: str, start: int, prompt_ids: list[int]) -> None:
        if self.config.max_prompt_tokens is not None:
            ep.prompt_start.append(start)
        ep.observations.append(text)
        ep.prompt_ids.append(prompt_ids)  # training scores exactly the prompt the policy saw

    def _prompt_ids(self, ep: Episode, text: str, start: int) -> list[int]:
        """Token ids of the generation prompt for ``text`` after ``ep``'s turns from ``start`` on."""
        observations, responses = [*ep.observations, text][start:], ep.responses[start:]
        messages = build_messages(self.tokenizer, ep.system_prompt, observations, responses)
        ids = prompt_token_ids(self.tokenizer, [messages])[0]
        self.unknown_words.check(self.tokenizer, [m["content"] for m in messages], [ids])
        return ids

    @torch.no_grad()
    def _generate(self, ep: Episode, text: str, start: int) -> tuple[list[int], list[int], str]:
        """(prompt ids, sampled reply ids up to and including a sampled eos, reply text)."""
        tok = self.tokenizer
        prompt = self._prompt_ids(ep, text, start)
        input_ids, attention_mask = left_pad([prompt], tok.pad_token_id)  # (1, L) each
        kwargs = dict(self.generate_kwargs)
        if not self.training:  # inference mode: greedy
            kwargs = {k: v for k, v in kwargs.items() if k not in _SAMPLING_KEYS} | {"do_sample": False}
        kwargs.setdefault("pad_token_id", tok.pad_token_id)
        kwargs.setdefault("eos_token_id", tok.eos_token_id)
        self.policy.eval()
        start = time.perf_counter()
        out = generate_from_settings(
            self.policy, input_ids.to(self.device), attention_mask.to(self.device), **kwargs
        )
        new = cut_at_eos(out[0, input_ids.shape[1] :].tolist(), tok.eos_token_id)  # only the new tokens
        if self.training:
            self._batch_start = self._batch_start or start
            self._gen_seconds += time.perf_counter() - start
            self._gen_tokens += len(new)
            self._prompt_tokens += input_ids.shape[1]
        return prompt, new, tok.decode(new, skip_special_tokens=True).strip()

    def _action_space(self) -> Any:
        """``ppo_config_dict['action_space']``, else ``agent.action_space`` (None: unknown)."""
        cfg = self.config
        return cfg.action_space if cfg.action_space is not None else getattr(self.agent, "action_space", None)

    def _parse(self, reply: str) -> tuple[Any, bool]:
        cfg = self.config
        space = self._action_space()
        try:
            action = self.agent.extract_action(reply)
        except Exception as err:  # any parse failure is an invalid action by contract
            if space is None and not (cfg.invalid_action == "fixed" and cfg.fallback_action is not None):
                raise RuntimeError(
                    f"{type(self.agent).__name__}.extract_action failed on the reply {reply!r}, and no "
                    "action space is known to pick a fallback action from: pass "
                    "ppo_config_dict={'action_space': env.action_space} (or set agent.action_space), or "
                    "invalid_action='fixed' with a fallback_action"
                ) from err
            return self._fallback(space), True
        if space is None or space.contains(action):
            return action, False
        return self._fallback(space), True

    def _fallback(self, space: Any) -> Any:
        cfg = self.config
        if cfg.invalid_action == "random":
            return _sample_space(space, self.rng)
        if space is not None and not space.contains(cfg.fallback_action):
            raise ValueError(f"fallback_action={cfg.fallback_action!r} is not in the action space {space}")
        return cfg.fallback_action

    # ------------------------------------------------------------------ learning
    def _update(self) -> dict[str, float]:
        """One PPO iteration on the oldest ``batch_size`` finished episodes."""
        cfg = self.config
        episodes, self.episodes = self.episodes[: cfg.batch_size], self.episodes[cfg.batch_size :]
        seconds = time.perf_counter() - (self._batch_start or time.perf_counter())
        space = self._action_space()
        metrics = rollout_metrics(
            RolloutStats(
                episodes=episodes,
                env_steps=sum(ep.num_turns for ep in episodes),
                generated_tokens=self._gen_tokens,
                prompt_tokens=self._prompt_tokens,
                generation_seconds=self._gen_seconds,
                env_seconds=max(seconds - self._gen_seconds, 0.0),  # everything between generations
                seconds=seconds,
                action_names=discrete_action_names(space, self.agent) if space is not None else None,
                action_start=int(getattr(space, "start", 0)),
            )
        )
        metrics["rollout/invalid_actions"] = float(sum(sum(ep.invalid) for ep in episodes))
        buf = build_buffer(
            self.tokenizer, episodes, temperature=float(self.generate_kwargs.get("temperature", 1.0))
        )
        score_batch = math.ceil(len(buf) / cfg.num_minibatches)  # no more memory than a minibatch
        metrics.update(
            score_rollout(self.policy, buf, cfg.gamma, cfg.gae_lambda, score_batch, norm_adv=cfg.norm_adv)
        )
        sampler = MinibatchSampler(
            buf.train_lengths,
            cfg.num_minibatches,
            cfg.update_epochs,
            seed=derive_seed(cfg.seed or 0, self.num_updates, 4),
        )
        metrics.update(self._optimize(buf, sampler))
        metrics["train/explained_variance"] = float(
            ppo.explained_variance(buf.old_values, buf.returns, buf.turn_mask)
        )
        metrics["train/learning_rate"] = float(self.optimizer.param_groups[0]["lr"])
        self.num_updates += 1
        self._reset_timers()
        return metrics

    def _optimize(self, buf: RolloutBuffer, sampler: MinibatchSampler) -> dict[str, float]:
        """Minibatch steps of :func:`ppo_loss`; returns its diagnostics averaged over episodes."""
        cfg = self.config
        sums: dict[str, float] = {}
        weight = steps = 0
        self.policy.train()
        try:
            for index in sampler:
                batch = {k: v.to(self.device) for k, v in minibatch(buf, index).items()}
                loss, metrics = ppo_loss(
                    self.policy,
                    batch,
                    cfg.clip_coef,
                    cfg.clip_vloss,
                    cfg.vf_coef,
                    cfg.ent_coef,
                    buf.temperature,
                )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                steps += 1
                weight += len(index)
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * len(index)
                if cfg.target_kl is not None and float(metrics["train/approx_kl"]) > cfg.target_kl:
                    break
        finally:
            self.policy.eval()
        return {key: total / weight for key, total in sums.items()} | {"train/minibatch_steps": float(steps)}

    def _reset_timers(self) -> None:
        self._batch_start: float | None = None
        self._gen_seconds = 0.0
        self._gen_tokens = self._prompt_tokens = 0
