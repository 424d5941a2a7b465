"""Play text episodes in N Gymnasium envs at once, every active env's reply in one batch.

One call of :meth:`RolloutCollector.collect` is a pure function of (policy weights, seed,
epoch, rank): env seeds and sampling seeds are derived from those numbers rather than
carried in env state, so a resumed run replays exactly what an uninterrupted run would.

The turn itself, a batch of prompts answered and parsed into actions, is
:class:`~llamagym_pl.actor.Actor`'s: the imperative loop plays its turns with the same step.
"""

from __future__ import annotations

import math
import time
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from llamagym_pl.actions import ActionStyle
from llamagym_pl.actions.base import State
from llamagym_pl.actor import Actor
from llamagym_pl.checkpointing import raise_if_interrupted
from llamagym_pl.env_faults import EnvFaults, check_env_timeout, env_deadline
from llamagym_pl.episode import (
    Episode,
    InvalidActionPolicy,
    InvalidActions,
    PromptBudget,
    derive_seed,
    format_observation,
)
from llamagym_pl.guards import ConfigError, check_group_size, check_ranges
from llamagym_pl.stats import RolloutStats, discrete_action_names

RUNAWAY_FACTOR = 100
"""With a step budget and no time limit, an env that has played this many times its budget in one
rollout, its last episode still running, is taken to play an episode that never ends."""


class RolloutCollector:
    """Steps ``num_envs`` copies of an env, replying in every active env in one batch.

    Args:
        env_id: Gymnasium id, e.g. ``Blackjack-v1``.
        env_kwargs: keyword arguments for ``gym.make``.
        agent: the user's :class:`~llamagym_pl.agent.Agent` (formats observations, parses replies).
        num_envs: envs played side by side (the reply batch size).
        style: how the policy replies (:class:`~llamagym_pl.actions.GenerateStyle` or
            :class:`~llamagym_pl.actions.ScoreStyle`).
        invalid_action, fallback_action, invalid_penalty: the invalid-action policy
            (:class:`~llamagym_pl.episode.InvalidActions`).
        max_episode_steps: optional time limit (Gymnasium ``TimeLimit`` truncation).
        max_env_errors: env faults tolerated per :meth:`collect` call. A fault (``step`` or
            ``reset`` raising, or a non-finite reward) drops the episode it happened in (its
            turns are not trained on), resets that env with its next derived seed and is
            counted (``rollout/env_errors``, and logged); one more fault than this aborts the
            rollout with :class:`~llamagym_pl.guards.RunAborted`.
        max_prompt_tokens: prompt budget in tokens (None: none), see
            :class:`~llamagym_pl.episode.PromptBudget`.
        env_timeout_s: seconds an ``env.step``/``env.reset`` may take (None: no limit); one that
            takes longer is interrupted (SIGALRM: Unix, main thread) and is a fault, as if it
            raised.
        group_size: envs ``g * group_size .. (g + 1) * group_size - 1`` form group ``g``: their
            ``k``-th episodes start from the same reset seed (one initial state), and each has
            ``Episode.group = (g, k)``, for the critic-free estimators
            (:mod:`llamagym_pl.estimators`). A group's envs play equally many episodes: one
            whose budget ran out plays on while a group mate has started more. 1: no groups.
    """

    def __init__(
        self,
        env_id: str,
        env_kwargs: dict[str, Any] | None,
        agent: Any,
        num_envs: int,
        style: ActionStyle,
        invalid_action: InvalidActionPolicy = "random",
        fallback_action: Any = None,
        invalid_penalty: float = 0.0,
        max_episode_steps: int | None = None,
        max_env_errors: int = 10,
        max_prompt_tokens: int | None = None,
        env_timeout_s: float | None = None,
        group_size: int = 1,
    ) -> None:
        check_ranges(
            "data.{}",
            num_envs=num_envs,
            group_size=group_size,
            max_prompt_tokens=max_prompt_tokens,
            max_env_errors=max_env_errors,
            env_timeout_s=env_timeout_s,
        )
        check_group_size(num_envs, group_size)
        self.env_timeout_s = env_timeout_s
        self.group_size = group_size
        self.agent = agent
        self.env_id = env_id
        self.num_envs = num_envs
        self.max_env_errors = max_env_errors
        self.envs = [make_env(env_id, env_kwargs, max_episode_steps) for _ in range(num_envs)]
        self.action_space = self.envs[0].action_space
        invalid = InvalidActions(agent, self.action_space, invalid_action, fallback_action, invalid_penalty)
        self.actor = Actor(style, invalid, PromptBudget(max_prompt_tokens))
        style.check(self.envs[0])

    @property
    def style(self) -> ActionStyle:
        return self.actor.style

    def close(self) -> None:
        for env in self.envs:
            env.close()

    @torch.no_grad()
    def collect(
        self,
        policy: Any,
        tokenizer: Any,
        seed: int,
        epoch: int,
        rank: int = 0,
        steps_per_env: int | None = None,
        episodes_per_env: int | None = None,
        greedy: bool = False,
    ) -> RolloutStats:
        """Play whole episodes: each env starts episodes until it has taken ``steps_per_env`` turns
        (the episode running then plays to its end) or finished ``episodes_per_env`` of them.

        Every returned episode is done (terminated, or truncated by ``max_episode_steps`` and
        returned with its next observation to bootstrap from): the rollout cuts none, so every
        state of an episode can be trained on. An env whose episodes may never end needs
        ``max_episode_steps``; with a step budget and no time limit, an env that plays more than
        ``RUNAWAY_FACTOR`` times its budget raises :class:`~llamagym_pl.guards.ConfigError`.
        """
        if (steps_per_env is None) == (episodes_per_env is None):
            raise ValueError("give exactly one of steps_per_env and episodes_per_env")
        check_env_timeout(self.env_timeout_s)
        torch.manual_seed(derive_seed(seed, epoch, rank, 1))
        play = _Play(self, (seed, epoch, rank), steps_per_env, episodes_per_env)
        self.actor.reset_counts()
        was_training = policy.training
        policy.eval()
        try:
            while play.active():
                raise_if_interrupted()  # a deferred Ctrl-C (see checkpointing.defer_interrupts)
                self._turn(policy, tokenizer, play, greedy)
        finally:
            policy.train(was_training)
        self.actor.budget.add_bootstrap_prompts(tokenizer, play.finished)
        return play.stats()

    def _turn(self, policy: Any, tokenizer: Any, play: _Play, greedy: bool) -> None:
        """Every active env replies (one batch), then steps with its action."""
        active = play.active()
        episodes = [play.current[i] for i in active]
        states = [play.state[i] for i in active]
        rngs = [play.rngs[i] for i in active]
        actions = self.actor.act(policy, tokenizer, episodes, states, rngs, greedy)
        start = time.perf_counter()
        for i, ep, action in zip(active, episodes, actions, strict=True):
            play.turns[i] += 1
            try:
                obs, reward, terminated, truncated, info = self._step(i, action)
            except Exception as err:  # noqa: BLE001 - any env failure is a counted fault
                play.faults.record(f"step({action!r}) of env {i}, turn {ep.num_turns - 1}", err)
                play.drop(i)
                continue
            play.env_steps += 1
            ep.env_return += reward
            ep.rewards.append(reward)
            play.state[i] = (obs, info)
            if terminated or truncated:
                ep.terminated, ep.truncated = bool(terminated), bool(truncated) and not terminated
                if ep.truncated:
                    ep.observations.append(format_observation(self.agent, obs))
                play.finish(i)
            else:
                ep.observations.append(format_observation(self.agent, obs))
                self._check_runaway(i, play.turns[i], play.steps_per_env)
        play.env_seconds += time.perf_counter() - start

    def _step(self, i: int, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        with env_deadline(self.env_timeout_s, f"step({action!r}) of env {i}"):
            obs, reward, terminated, truncated, info = self.envs[i].step(action)
        if not math.isfinite(float(reward)):
            raise ValueError(f"the reward {reward!r} is not finite")
        return obs, float(reward), terminated, truncated, info

    def _check_runaway(self, i: int, turns: int, steps_per_env: int | None) -> None:
        """Raise if env ``i``, without a time limit, has played its episode past ``RUNAWAY_FACTOR``
        times its step budget: an episode that never ends would keep the rollout going forever."""
        if steps_per_env is None or turns <= RUNAWAY_FACTOR * steps_per_env:
            return
        spec = self.envs[i].spec
        if spec is not None and spec.max_episode_steps is not None:
            return  # a TimeLimit ends the episode
        raise ConfigError(
            f"env {i} of {self.env_id!r} has played {turns} turns in one rollout, more than "
            f"{RUNAWAY_FACTOR} x steps_per_env={steps_per_env}, and its episode has not ended: "
            "rollouts play whole episodes, so set data.max_episode_steps (a time limit) for an env "
            "whose episodes may never end"
        )


class _Play:
    """One rollout's progress: each env's running episode, budget, seeds and faults."""

    def __init__(
        self,
        collector: RolloutCollector,
        run: tuple[int, int, int],
        steps_per_env: int | None,
        episodes_per_env: int | None,
    ) -> None:
        n = collector.num_envs
        self.collector, self.run = collector, run
        self.steps_per_env = steps_per_env
        self.start = time.perf_counter()
        self.rngs = [np.random.default_rng(derive_seed(*run, i, 2)) for i in range(n)]
        self.turns, self.episode_count = [0] * n, [0] * n
        self.episodes_left = [episodes_per_env or 0] * n
        self.current: list[Episode | None] = [None] * n
        self.state: list[State | None] = [None] * n
        self.finished: list[Episode] = []
        self.faults = EnvFaults(collector.env_id, collector.max_env_errors)
        self.env_steps, self.env_seconds = 0, 0.0
        self.system = collector.agent.get_system_prompt()
        for i in range(n):
            if self.current[i] is None and self.has_budget(i):  # a group mate may have started it
                self.start_episode(i)

    def active(self) -> list[int]:
        return [i for i, ep in enumerate(self.current) if ep is not None]

    def group_mates(self, i: int) -> range:
        """The envs of env ``i``'s group (itself included)."""
        size = self.collector.group_size
        return range(i - i % size, i - i % size + size)

    def has_budget(self, i: int) -> bool:
        """May env ``i`` start another episode? Also when a group mate has started more: a
        group's episodes come in full sets."""
        if max(self.episode_count[j] for j in self.group_mates(i)) > self.episode_count[i]:
            return True
        if self.steps_per_env is not None:
            return self.turns[i] < self.steps_per_env
        return self.episodes_left[i] > 0

    def start_episode(self, i: int) -> None:
        env, size = self.collector.envs[i], self.collector.group_size
        while True:  # a failed reset is a fault: retried with the next seed
            # A group shares its seeds (with group_size 1, each env is its own group).
            env_seed = derive_seed(*self.run, i // size, 3, self.episode_count[i])
            self.episode_count[i] += 1
            try:
                with env_deadline(self.collector.env_timeout_s, f"reset(seed={env_seed}) of env {i}"):
                    obs, info = env.reset(seed=env_seed)
                break
            except Exception as err:  # noqa: BLE001 - any env failure is a counted fault
                self.faults.record(f"reset(seed={env_seed}) of env {i}", err)
        self.current[i] = Episode(
            system_prompt=self.system,
            observations=[format_observation(self.collector.agent, obs)],
            group=(i // size, self.episode_count[i] - 1) if size > 1 else None,
        )
        self.state[i] = (obs, info)
        for j in self.group_mates(i):  # wake group mates whose budget ran out: they play this seed too
            if self.current[j] is None and self.episode_count[j] < self.episode_count[i]:
                self.start_episode(j)

    def finish(self, i: int) -> None:
        self.finished.append(self.current[i])
        self.episodes_left[i] -= 1
        self.drop(i)

    def drop(self, i: int) -> None:
        """Env ``i``'s episode is over (finished, or dropped after a fault): start its next one."""
        self.current[i] = None
        if self.has_budget(i):
            self.start_episode(i)

    def stats(self) -> RolloutStats:
        actor, space = self.collector.actor, self.collector.action_space
        return RolloutStats(
            episodes=self.finished,
            env_steps=self.env_steps,
            generated_tokens=actor.reply_tokens,
            prompt_tokens=actor.prompt_tokens,
            generation_seconds=actor.seconds,
            env_seconds=self.env_seconds,
            seconds=time.perf_counter() - self.start,
            env_errors=self.faults.count,
            action_names=discrete_action_names(space, self.collector.agent),
            action_start=int(getattr(space, "start", 0)),
        )


def make_env(env_id: str, env_kwargs: dict[str, Any] | None, max_episode_steps: int | None) -> gym.Env:
    """``gym.make`` with errors that name the bad id or keyword argument."""
    kwargs = dict(env_kwargs or {})
    if max_episode_steps is not None:
        kwargs["max_episode_steps"] = max_episode_steps
    try:
        return gym.make(env_id, **kwargs)
    except gym.error.Error as err:
        raise ValueError(
            f"cannot make env {env_id!r}: {err}. Check data.env_id against gymnasium.registry "
            "(and that the package registering it is imported)"
        ) from err
    except TypeError as err:
        raise ValueError(f"env {env_id!r} rejected env_kwargs={kwargs}: {err}") from err
