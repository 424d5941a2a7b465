"""The LlamaGym-style loop: ``agent.act(obs)``, ``agent.assign_reward(r)``, ``agent.terminate_episode()``.

:class:`ImperativeTrainer` is what :class:`~llamagym_pl.agent.Agent`'s imperative methods drive.
Each ``act`` is one turn of the rollout's own step (:class:`~llamagym_pl.rollout.Actor`: the prompt
under its budget, the action style's reply, the invalid-action policy), recorded as an
:class:`~llamagym_pl.episode.Episode`; once ``batch_size`` episodes are finished, one PPO
iteration runs with the functions the Lightning path uses (:func:`~llamagym_pl.buffer.build_buffer`,
:func:`~llamagym_pl.update.prepare_rollout`, :class:`~llamagym_pl.minibatches.MinibatchSampler`,
:func:`~llamagym_pl.update.minibatch_loss`, :func:`~llamagym_pl.update.make_optimizer`). The two
paths differ only in who owns the loop, never in the PPO math: both styles (``policy``), the KL
penalty (``kl_coef``) and the learning-rate schedule (``lr_schedule``) work in both.

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

import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from llamagym_pl import ppo
from llamagym_pl.actions import RolloutDataset, make_style
from llamagym_pl.actor import Actor
from llamagym_pl.buffer import RolloutBuffer, build_buffer
from llamagym_pl.episode import Episode, InvalidActions, PromptBudget, derive_seed, format_observation
from llamagym_pl.estimators import group_estimator
from llamagym_pl.imperative_setup import GENERATE_KEY, PPO_KEY, ImperativeConfig, as_policy, generation_kwargs
from llamagym_pl.kl import KLController, ReferencePolicy
from llamagym_pl.minibatches import MinibatchSampler
from llamagym_pl.prefix_cache import PrefixMemo
from llamagym_pl.sampling import refuse_truncation
from llamagym_pl.stats import RolloutStats, discrete_action_names, rollout_metrics
from llamagym_pl.update import make_optimizer, minibatch_loss, prepare_rollout


class ImperativeTrainer:
    """Plays an agent turn by turn and trains it with PPO every ``batch_size`` finished episodes."""

    def __init__(
        self,
        agent: Any,  # an llamagym_pl.Agent: the loop only calls its methods
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
        self.config = cfg = ImperativeConfig.from_dict(dict(ppo_config_dict or {}))
        self.generate_kwargs = generation_kwargs(generate_config_dict)
        if training:
            refuse_truncation(self.generate_kwargs, GENERATE_KEY)
        if tokenizer.pad_token is None:
            # Left padding needs a pad id; borrowing eos (as load_tokenizer does) leaves the vocab alone.
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.estimator = group_estimator(
            cfg.advantage_estimator, cfg.group_std_norm, cfg.step_advantage_weight
        )
        self.policy = as_policy(model, critic=self.estimator is None)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.policy.value_head.to(self.device)
        if any(p.device != self.device for p in self.policy.lm.parameters()):
            self.policy.lm.to(self.device)
        self.style = make_style(
            cfg.policy, agent, score_normalization=cfg.score_normalization, **self.generate_kwargs
        )
        if hasattr(self.style, "prefix_memo"):
            # Serial acts, one prompt each: the system prompt's KV cache kept until the next update.
            self.style.prefix_memo = PrefixMemo()
        space = cfg.action_space if cfg.action_space is not None else getattr(agent, "action_space", None)
        self.action_space = space
        invalid = InvalidActions(agent, space, cfg.invalid_action, cfg.fallback_action, cfg.invalid_penalty)
        self.actor = Actor(
            self.style, invalid, PromptBudget(cfg.max_prompt_tokens, PPO_KEY.format("max_prompt_tokens"))
        )
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = make_optimizer(
            self.params, cfg.learning_rate, cfg.adam_eps, cfg.weight_decay, cfg.lr_schedule, cfg.total_updates
        )
        self.kl_ctl = KLController(cfg.kl_coef, cfg.target_kl_ref, cfg.kl_horizon)
        self.reference = ReferencePolicy(self.policy) if cfg.kl_coef > 0 else None
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(derive_seed(cfg.seed or 0, 2))
        self.training = training
        self.episode: Episode | None = None  # the episode being played
        self.episodes: list[Episode] = []  # finished, waiting for the next update
        self.num_updates = 0
        self._batch_start: float | None = None

    # ------------------------------------------------------------------ the loop
    def act(self, observation: Any, info: dict[str, Any] | None = None) -> Any:
        """Reply to ``observation`` and return a valid action (a counted fallback if invalid)."""
        if self.episode is None:
            self.episode = Episode(system_prompt=self.agent.get_system_prompt())
        ep = self.episode
        ep.observations.append(format_observation(self.agent, observation))
        start = time.perf_counter()
        try:
            state = (observation, info or {})
            (action,) = self.actor.act(
                self.policy,
                self.tokenizer,
                [ep],
                [state],
                [self.rng],
                greedy=not self.training,
                count=self.training,
            )
        except BaseException:
            del ep.observations[len(ep.responses) :]  # the failed turn leaves no half entry
            del ep.prompt_start[len(ep.responses) :]
            raise
        ep.rewards.append(0.0)
        if self.training and self._batch_start is None:
            self._batch_start = start
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
            # The state to bootstrap from, with the prompt it would be played from.
            ep.observations.append(format_observation(self.agent, next_observation))
            self.actor.budget.add_bootstrap_prompts(self.tokenizer, [ep])
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

    # ------------------------------------------------------------------ learning
    def _update(self) -> dict[str, float]:
        """One PPO iteration on the oldest ``batch_size`` finished episodes."""
        cfg = self.config
        episodes, self.episodes = self.episodes[: cfg.batch_size], self.episodes[cfg.batch_size :]
        for i, ep in enumerate(episodes):  # consecutive episodes form the groups of grpo/gigpo
            ep.group = i // cfg.group_size if cfg.group_size > 1 else None
        metrics = rollout_metrics(self._stats(episodes))
        metrics["rollout/invalid_actions"] = float(sum(sum(ep.invalid) for ep in episodes))
        buf = build_buffer(self.tokenizer, episodes, temperature=self.style.temperature)
        self.style.encode(self.tokenizer, episodes, buf)
        metrics.update(self._prepare(buf))
        sampler = MinibatchSampler(
            buf.train_lengths,
            cfg.num_minibatches,
            cfg.update_epochs,
            seed=derive_seed(cfg.seed or 0, self.num_updates, 4),
        )
        metrics.update(self._optimize(RolloutDataset(buf, self.style), sampler))
        if self.policy.has_critic:
            metrics["train/explained_variance"] = float(
                ppo.explained_variance(buf.old_values, buf.returns, buf.turn_mask)
            )
        metrics["train/learning_rate"] = float(self.optimizer.param_groups[0]["lr"])
        self.scheduler.step()  # the schedule counts PPO updates
        self.num_updates += 1
        self._batch_start = None
        self.actor.reset_counts()
        return metrics

    def _stats(self, episodes: list[Episode]) -> RolloutStats:
        actor, space = self.actor, self.action_space
        seconds = time.perf_counter() - (self._batch_start or time.perf_counter())
        return RolloutStats(
            episodes=episodes,
            env_steps=sum(ep.num_turns for ep in episodes),
            generated_tokens=actor.reply_tokens,
            prompt_tokens=actor.prompt_tokens,
            generation_seconds=actor.seconds,
            env_seconds=max(seconds - actor.seconds, 0.0),  # everything between replies
            seconds=seconds,
            action_names=discrete_action_names(space, self.agent),
            action_start=int(getattr(space, "start", 0)),
        )

    def _prepare(self, buf: RolloutBuffer) -> dict[str, float]:
        """:func:`prepare_rollout`, as many rows (or turns) per forward as a minibatch holds; with
        ``kl_coef`` the KL penalty, its coefficient adapted as in the Lightning path."""
        cfg, kl_coef = self.config, self.kl_ctl.value
        units = max(len(buf), len(buf.train_lengths))  # rows, or turns in score mode
        batch_size = math.ceil(units / cfg.num_minibatches)
        metrics = prepare_rollout(
            self.policy,
            buf,
            self.style,
            cfg.gamma,
            cfg.gae_lambda,
            batch_size,
            self.reference,
            kl_coef,
            norm_adv=cfg.norm_adv,
            estimator=self.estimator,
        )
        if self.reference is not None:
            metrics["train/kl_coef"] = kl_coef
            self.kl_ctl.update(metrics["train/kl_ref"], n_steps=int(buf.turn_mask.sum()))
        return metrics

    def _optimize(self, dataset: RolloutDataset, sampler: MinibatchSampler) -> dict[str, float]:
        """Minibatch steps of :func:`minibatch_loss`; returns its diagnostics averaged over
        training units (rows, or turns)."""
        cfg = self.config
        sums: dict[str, float] = {}
        weight = steps = 0
        self.policy.train()
        try:
            for index in sampler:
                batch = [{k: v.to(self.device) for k, v in part.items()} for part in dataset[index]]
                loss, metrics = minibatch_loss(
                    self.style, self.policy, batch, cfg.clip_coef, cfg.clip_vloss, cfg.vf_coef, cfg.ent_coef
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
            # Not held until the next update: every step's backward starts from None anyway.
            self.optimizer.zero_grad(set_to_none=True)
            if getattr(self.style, "prefix_memo", None) is not None:
                self.style.prefix_memo.clear()  # the weights changed (its own check would see it too)
        return {key: total / weight for key, total in sums.items()} | {"train/minibatch_steps": float(steps)}
