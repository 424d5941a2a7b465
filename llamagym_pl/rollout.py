"""Play text episodes in N Gymnasium envs at once with batched generation.

One call of :meth:`RolloutCollector.collect` is a pure function of (policy weights, seed,
epoch, rank): env seeds and sampling seeds are derived from those numbers rather than
carried in env state, so a resumed run replays exactly what an uninterrupted run would.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch

from llamagym_pl.agent import Agent
from llamagym_pl.chat import (
    Message,
    PromptBudgetError,
    UnknownWords,
    build_messages,
    left_pad,
    prompt_start,
    prompt_token_ids,
)
from llamagym_pl.guards import ConfigError, EnvFaults, check_context, raise_if_interrupted
from llamagym_pl.sampling import generate_from_settings

InvalidActionPolicy = Literal["random", "fixed"]

RUNAWAY_FACTOR = 100
"""With a step budget and no time limit, an env that has played this many times its budget in one
rollout, its last episode still running, is taken to play an episode that never ends."""


def derive_seed(*parts: int) -> int:
    """A well-mixed 31-bit seed from integers (run seed, epoch, rank, env, episode ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


@dataclass
class Episode:
    """One episode as text, with its per-turn rewards.

    ``observations`` has one more entry than ``responses`` when the episode did not terminate
    (it was truncated): that last observation is the state to bootstrap the value from.
    """

    system_prompt: str
    observations: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    actions: list[Any] = field(default_factory=list)  # the env action played each turn
    rewards: list[float] = field(default_factory=list)  # env reward of each turn
    invalid: list[bool] = field(default_factory=list)
    env_return: float = 0.0  # sum of raw env rewards (penalties excluded)
    terminated: bool = False
    truncated: bool = False
    # Per-turn format penalty (invalid replies). It is added to that turn's advantage only, never
    # discounted back into earlier turns: a malformed reply must not make the move that led to
    # its state look bad (hitting in Blackjack would, while the model still babbles).
    penalties: list[float] = field(default_factory=list)
    # Action scoring only (data.policy: score): each turn's candidate actions and the index of the
    # one played (its text is that turn's response). Empty for generated replies.
    candidates: list[list[str]] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)
    # With a prompt budget (data.max_prompt_tokens), per observation: how many of the oldest turns
    # its prompt dropped (the prompt held observations[s:] and responses[s:]). Training encodes
    # exactly those prompts. Empty: every prompt held the whole history.
    prompt_start: list[int] = field(default_factory=list)
    # Token in, token out: per observation played (and the state to bootstrap from), the token ids
    # the policy was fed; per turn, the token ids it produced (a generated reply as sampled, up to
    # and including the end-of-sequence token only when it was sampled; a scored reply's candidate
    # tokens). Training scores exactly these, never a re-tokenization of the decoded text. Score
    # mode also keeps every candidate's tokens. Empty for episodes built from text alone:
    # :func:`llamagym_pl.buffer.build_buffer` then encodes them with the chat template.
    prompt_ids: list[list[int]] = field(default_factory=list)
    response_ids: list[list[int]] = field(default_factory=list)
    candidate_ids: list[list[list[int]]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        """Whether the episode ended (terminated or truncated); a rollout returns only these."""
        return self.terminated or self.truncated

    @property
    def num_turns(self) -> int:
        return len(self.responses)


@dataclass
class Generated:
    """A batch of generated replies: the prompts' and the replies' token ids, and the reply texts."""

    prompt_ids: list[list[int]]
    reply_ids: list[list[int]]
    texts: list[str]


@dataclass
class RolloutStats:
    episodes: list[Episode]
    env_steps: int
    generated_tokens: int
    prompt_tokens: int
    generation_seconds: float
    env_seconds: float
    seconds: float
    env_errors: int = 0  # env faults: their episodes were dropped
    # A Discrete action space's action names (agent.action_names, else the action numbers): the
    # share of each parsed action is logged. None: any other space.
    action_names: list[str] | None = None
    action_start: int = 0  # the Discrete space's first action


def discrete_action_names(space: gym.Space, agent: Agent) -> list[str] | None:
    """Names of a ``Discrete`` space's actions for logging: the agent's ``action_names``, or the
    actions' numbers; None for other spaces."""
    if not isinstance(space, gym.spaces.Discrete):
        return None
    names = agent.action_names
    if names is not None and len(names) == space.n:
        return [str(n) for n in names]
    return [str(space.start + i) for i in range(space.n)]


class RolloutCollector:
    """Steps ``num_envs`` copies of an env, generating every active env's reply in one batch.

    Args:
        env_id: Gymnasium id, e.g. ``Blackjack-v1``.
        env_kwargs: keyword arguments for ``gym.make``.
        agent: the user's :class:`Agent` (formats observations, parses replies).
        num_envs: envs played side by side (the generation batch size).
        max_new_tokens: reply length limit.
        temperature, top_k, top_p: sampling settings when not greedy (``top_k=0`` is off). With
            ``max_new_tokens`` they are all that generation uses: the model's own
            ``generation_config.json`` (repetition penalty ...) is set aside
            (see :mod:`llamagym_pl.sampling`).
        invalid_action: what an unparsable or out-of-space reply does: ``random`` samples a
            seeded random action, ``fixed`` plays ``fallback_action``.
        fallback_action: the action for ``invalid_action="fixed"``.
        invalid_penalty: added to the turn's advantage when the reply was invalid (the logged
            env return excludes it).
        max_episode_steps: optional time limit (Gymnasium ``TimeLimit`` truncation).
        max_env_errors: env faults tolerated per :meth:`collect` call. A fault (``step`` or
            ``reset`` raising, or a non-finite reward) drops the episode it happened in (its
            turns are not trained on), resets that env with its next derived seed and is
            counted (``rollout/env_errors``, and logged); one more fault than this aborts the
            rollout with :class:`~llamagym_pl.guards.RunAborted`.
        max_prompt_tokens: prompt budget in tokens (None: none). A turn whose whole conversation
            renders longer drops its oldest (observation, reply) pairs until it fits; the system
            prompt and the current observation are always kept (see
            :func:`~llamagym_pl.chat.fit_to_budget`), and ``Episode.prompt_start`` records what
            was dropped.
    """

    def __init__(
        self,
        env_id: str,
        env_kwargs: dict[str, Any] | None,
        agent: Agent,
        num_envs: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        invalid_action: InvalidActionPolicy = "random",
        fallback_action: Any = None,
        invalid_penalty: float = 0.0,
        max_episode_steps: int | None = None,
        max_env_errors: int = 10,
        max_prompt_tokens: int | None = None,
    ) -> None:
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ValueError(f"data.max_prompt_tokens={max_prompt_tokens} must be >= 1 (or null: no budget)")
        self.max_prompt_tokens = max_prompt_tokens
        self.agent = agent
        self.env_id = env_id
        self.max_env_errors = max_env_errors
        self.num_envs = num_envs
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.invalid_action = invalid_action
        self.invalid_penalty = invalid_penalty
        self.envs = [make_env(env_id, env_kwargs, max_episode_steps) for _ in range(num_envs)]
        self.action_space = self.envs[0].action_space
        if invalid_action == "fixed" and not self.action_space.contains(fallback_action):
            raise ValueError(
                f"fallback_action={fallback_action!r} is not in the action space {self.action_space} "
                "of the env; set a valid fallback_action or use invalid_action: random"
            )
        self.fallback_action = fallback_action
        self.unknown_words = UnknownWords()  # warns once per word the tokenizer cannot read

    def close(self) -> None:
        for env in self.envs:
            env.close()

    @torch.no_grad()
    def collect(
        self,
        policy,
        tokenizer,
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
        start = time.perf_counter()
        torch.manual_seed(derive_seed(seed, epoch, rank, 1))
        rngs = [np.random.default_rng(derive_seed(seed, epoch, rank, i, 2)) for i in range(self.num_envs)]
        system = self.agent.get_system_prompt()
        turns = [0] * self.num_envs
        episodes_left = [episodes_per_env or 0] * self.num_envs
        episode_count = [0] * self.num_envs
        current: list[Episode | None] = [None] * self.num_envs
        finished: list[Episode] = []
        gen_s = env_s = 0.0
        env_steps = gen_tokens = prompt_tokens = 0
        faults = EnvFaults(self.env_id, self.max_env_errors)

        def start_episode(i: int) -> None:
            while True:  # a failed reset is a fault: retried with the next seed
                env_seed = derive_seed(seed, epoch, rank, i, 3, episode_count[i])
                episode_count[i] += 1
                try:
                    obs, _ = self.envs[i].reset(seed=env_seed)
                    break
                except Exception as err:  # noqa: BLE001 - any env failure is a counted fault
                    faults.record(f"reset(seed={env_seed}) of env {i}", err)
            current[i] = Episode(system_prompt=system, observations=[self._format(obs)])

        def has_budget(i: int) -> bool:  # may env i start another episode?
            return turns[i] < steps_per_env if steps_per_env is not None else episodes_left[i] > 0

        for i in range(self.num_envs):
            if has_budget(i):
                start_episode(i)

        was_training = policy.training
        policy.eval()
        try:
            while True:
                raise_if_interrupted()  # a deferred Ctrl-C (see guards.defer_interrupts)
                active = [i for i in range(self.num_envs) if current[i] is not None]
                if not active:
                    break
                conversations = [self._prompt(tokenizer, current[i]) for i in active]
                t0 = time.perf_counter()
                episodes = [current[i] for i in active]
                replies, n_prompt, n_gen = self._reply(
                    policy, tokenizer, conversations, greedy, active, episodes
                )
                gen_s += time.perf_counter() - t0
                prompt_tokens += n_prompt
                gen_tokens += n_gen
                t0 = time.perf_counter()
                for i, reply in zip(active, replies, strict=True):
                    ep = current[i]
                    action, invalid = self._parse(reply, rngs[i])
                    turns[i] += 1
                    try:
                        obs, reward, terminated, truncated = self._step(i, action)
                    except Exception as err:  # noqa: BLE001 - any env failure is a counted fault
                        faults.record(f"step({action!r}) of env {i}, turn {ep.num_turns}", err)
                        current[i] = None  # the episode is dropped
                        if has_budget(i):
                            start_episode(i)
                        continue
                    env_steps += 1
                    ep.responses.append(reply)
                    ep.actions.append(action)
                    ep.invalid.append(invalid)
                    ep.env_return += float(reward)
                    ep.rewards.append(float(reward))
                    ep.penalties.append(self.invalid_penalty if invalid else 0.0)
                    if terminated or truncated:
                        ep.terminated, ep.truncated = bool(terminated), bool(truncated) and not terminated
                        if truncated and not terminated:
                            ep.observations.append(self._format(obs))
                        finished.append(ep)
                        current[i] = None
                        episodes_left[i] -= 1
                        if has_budget(i):
                            start_episode(i)
                    else:
                        ep.observations.append(self._format(obs))
                        self._check_runaway(i, turns[i], steps_per_env)
                env_s += time.perf_counter() - t0
        finally:
            policy.train(was_training)
        self._bootstrap_prompts(tokenizer, finished)
        return RolloutStats(
            episodes=finished,
            env_steps=env_steps,
            generated_tokens=gen_tokens,
            prompt_tokens=prompt_tokens,
            generation_seconds=gen_s,
            env_seconds=env_s,
            seconds=time.perf_counter() - start,
            env_errors=faults.count,
            action_names=discrete_action_names(self.action_space, self.agent),
            action_start=int(getattr(self.action_space, "start", 0)),
        )

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

    def _prompt(self, tokenizer, ep: Episode) -> list[Message]:
        """The conversation the policy answers at ``ep``'s latest observation: the whole history,
        or with ``max_prompt_tokens`` its newest turns that fit (recorded in ``ep.prompt_start``)."""
        if self.max_prompt_tokens is None:
            return build_messages(tokenizer, ep.system_prompt, ep.observations, ep.responses)
        if len(ep.prompt_start) < len(ep.observations):
            # The previous prompt's start: a longer conversation never keeps more of its history.
            previous = ep.prompt_start[-1] if ep.prompt_start else 0
            budget = self.max_prompt_tokens
            try:
                start = prompt_start(
                    tokenizer, ep.system_prompt, ep.observations, ep.responses, budget, previous
                )
            except PromptBudgetError as err:
                raise ConfigError(
                    f"data.max_prompt_tokens={err.budget} cannot hold the system prompt ({err.system_tokens} "
                    f"tokens) and the current observation, which render to {err.needed} tokens: raise "
                    f"data.max_prompt_tokens to at least {err.needed}, or shorten the system prompt or "
                    "the observations"
                ) from err
            ep.prompt_start.append(start)
        start = ep.prompt_start[-1]
        return build_messages(tokenizer, ep.system_prompt, ep.observations[start:], ep.responses[start:])

    def _bootstrap_prompts(self, tokenizer, episodes: list[Episode]) -> None:
        """The prompt ids of the state after the last turn of each truncated or cut episode."""
        cut = [ep for ep in episodes if len(ep.observations) > ep.num_turns]
        conversations = [self._prompt(tokenizer, ep) for ep in cut]
        for ep, ids in zip(cut, prompt_token_ids(tokenizer, conversations), strict=True):
            ep.prompt_ids.append(ids)

    def _step(self, i: int, action: Any) -> tuple[Any, float, bool, bool]:
        obs, reward, terminated, truncated, _ = self.envs[i].step(action)
        if not math.isfinite(float(reward)):
            raise ValueError(f"the reward {reward!r} is not finite")
        return obs, float(reward), terminated, truncated

    def _format(self, observation: Any) -> str:
        text = self.agent.format_observation(observation)
        if not isinstance(text, str):
            raise TypeError(
                f"{type(self.agent).__name__}.format_observation returned {type(text).__name__} "
                f"({text!r}); it must return the observation as a str"
            )
        return text

    def _parse(self, reply: str, rng: np.random.Generator) -> tuple[Any, bool]:
        """Map a reply to an action; invalid replies get the fallback (counted, never dropped)."""
        try:
            action = self.agent.extract_action(reply)
            if self.action_space.contains(action):
                return action, False
        except Exception:  # noqa: BLE001 - any parse failure is an invalid action by contract
            pass
        if self.invalid_action == "fixed":
            return self.fallback_action, True
        return _sample_space(self.action_space, rng), True

    def _reply(
        self, policy, tokenizer, conversations, greedy: bool, envs: list[int], episodes: list[Episode]
    ) -> tuple[list[str], int, int]:
        """The reply step: one reply per active env, ``envs[k]`` playing ``episodes[k]`` and
        ``conversations[k]``. Returns (replies, prompt tokens, generated tokens). Generation here;
        :class:`~llamagym_pl.scoring_rollout.ScoringCollector` picks among candidate actions instead.
        Each episode records the prompt's and the reply's token ids."""
        out = self.generate(policy, tokenizer, conversations, greedy)
        for ep, prompt, reply in zip(episodes, out.prompt_ids, out.reply_ids, strict=True):
            ep.prompt_ids.append(prompt)
            ep.response_ids.append(reply)
        n_prompt = sum(len(p) for p in out.prompt_ids)
        return out.texts, n_prompt, sum(len(r) for r in out.reply_ids)

    def generate(self, policy, tokenizer, conversations: list[list[Message]], greedy: bool) -> Generated:
        """One batched ``generate`` for ``conversations`` (each ending with a user message).

        A reply is the sampled token ids up to the first end-of-sequence token (kept when sampled);
        its text is those ids decoded without special tokens, stripped.
        """
        prompts = prompt_token_ids(tokenizer, conversations)
        self.unknown_words.check(tokenizer, [m["content"] for conv in conversations for m in conv], prompts)
        input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id)  # (B, P) each
        check_context(policy, input_ids.shape[1], self.max_new_tokens)
        device = next(policy.parameters()).device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        sampling = (
            {"do_sample": False}
            if greedy
            else {
                "do_sample": True,
                "temperature": self.temperature,
                "top_k": self.top_k,
                "top_p": self.top_p,
            }
        )
        out = generate_from_settings(  # not policy.generate: the checkpoint's own settings stay out
            policy,
            input_ids,
            attention_mask,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
        new = out[:, input_ids.shape[1] :].cpu()  # (B, new)
        replies = [cut_at_eos(row, tokenizer.eos_token_id) for row in new.tolist()]
        texts = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in replies]
        return Generated(prompts, replies, texts)


def cut_at_eos(ids: list[int], eos_token_id: int | None) -> list[int]:
    """``ids`` up to and including the first ``eos_token_id``: ``generate`` pads what follows."""
    return ids[: ids.index(eos_token_id) + 1] if eos_token_id in ids else ids


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


def _sample_space(space: gym.Space, rng: np.random.Generator) -> Any:
    if isinstance(space, gym.spaces.Discrete):
        return int(space.start + rng.integers(space.n))
    space.seed(int(rng.integers(2**31)))
    return space.sample()


def rollout_totals(stats: RolloutStats) -> dict[str, float]:
    """Additive per-rollout sums: reduce them across DDP ranks, then :func:`metrics_from_totals`."""
    done = [ep for ep in stats.episodes if ep.done]
    actions = {}
    if stats.action_names is not None:  # the same keys on every rank: DDP reduces them as a vector
        counts = [0.0] * len(stats.action_names)
        for ep in stats.episodes:
            for action, invalid in zip(ep.actions, ep.invalid, strict=False):
                if not invalid:
                    counts[int(action) - stats.action_start] += 1.0
        actions = {f"action/{name}": n for name, n in zip(stats.action_names, counts, strict=True)}
    return {
        "episodes": float(len(done)),
        "return_sum": float(sum(ep.env_return for ep in done)),
        "length_sum": float(sum(ep.num_turns for ep in done)),
        "turns": float(sum(ep.num_turns for ep in stats.episodes)),
        "invalid": float(sum(sum(ep.invalid) for ep in stats.episodes)),
        "env_steps": float(stats.env_steps),
        "generated_tokens": float(stats.generated_tokens),
        "seconds": stats.seconds,
        "generation_seconds": stats.generation_seconds,
        "env_seconds": stats.env_seconds,
        "env_errors": float(stats.env_errors),
        **actions,
    }


def metrics_from_totals(totals: dict[str, float], world_size: int = 1) -> dict[str, float]:
    """Logged rollout metrics; returns are over episodes the env ended.

    With ``world_size`` ranks the totals are sums over ranks (timings too): throughput is the
    summed work over the mean wall time, i.e. the whole job's rate.
    """
    seconds = max(totals["seconds"] / world_size, 1e-9)
    gen_seconds = max(totals["generation_seconds"] / world_size, 1e-9)
    metrics = {
        "rollout/episodes": totals["episodes"],
        "rollout/env_steps": totals["env_steps"],
        "rollout/invalid_action_rate": totals["invalid"] / max(totals["turns"], 1.0),
        "rollout/env_steps_per_s": totals["env_steps"] / seconds,
        "rollout/generated_tokens_per_s": totals["generated_tokens"] / gen_seconds,
        "rollout/generation_s": totals["generation_seconds"] / world_size,
        "rollout/env_s": totals["env_seconds"] / world_size,
        "rollout/env_errors": totals["env_errors"],
        # Mean reply length: generated tokens per turn (score mode: the chosen candidate's tokens).
        "rollout/reply_tokens": totals["generated_tokens"] / max(totals["turns"], 1.0),
    }
    for key, count in totals.items():  # the share of turns that played each (valid) action
        if key.startswith("action/"):
            metrics[f"rollout/action_frac/{key.removeprefix('action/')}"] = count / max(totals["turns"], 1.0)
    if totals["episodes"] > 0:
        metrics["rollout/return_mean"] = totals["return_sum"] / totals["episodes"]
        metrics["rollout/episode_length"] = totals["length_sum"] / totals["episodes"]
    return metrics


def rollout_metrics(stats: RolloutStats) -> dict[str, float]:
    """Logged metrics of one process's rollout (see :func:`metrics_from_totals`)."""
    return metrics_from_totals(rollout_totals(stats))
