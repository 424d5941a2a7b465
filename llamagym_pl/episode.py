"""Episodes and what every way of playing them shares: the record of a text episode, the prompt
each turn is answered from (under a token budget), the invalid-action policy and seeds (the
statistics of a rollout's episodes are :mod:`llamagym_pl.stats`).

A leaf module: the rollout, the imperative loop, the buffer and the action styles all build on
these types, and nothing here knows about them.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Literal

import gymnasium as gym
import numpy as np

from llamagym_pl.chat import Message, PromptBudgetError, build_messages, prompt_start, prompt_token_ids
from llamagym_pl.guards import ConfigError

InvalidActionPolicy = Literal["random", "fixed"]


def derive_seed(*parts: int) -> int:
    """A well-mixed 31-bit seed from integers (run seed, epoch, rank, env, episode ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


@dataclass
class Reply:
    """The policy's reply to one prompt, token in, token out: the prompt's token ids, the reply's
    (a generated reply as sampled, up to and including the end-of-sequence token only when it was
    sampled; a scored reply's candidate tokens) and its text. A reply chosen among candidate
    actions also keeps them, their tokens and the index chosen."""

    text: str
    prompt_ids: list[int]
    reply_ids: list[int]
    candidates: list[str] | None = None
    candidate_ids: list[list[int]] | None = None
    chosen: int | None = None


@dataclass
class Episode:
    """One episode as text, with its per-turn rewards.

    ``observations`` has one more entry than ``responses`` when the episode did not terminate
    (it was truncated): that last observation is the state to bootstrap the value from.
    """

    system_prompt: str
    observations: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)  # env reward of each turn
    invalid: list[bool] = field(default_factory=list)
    env_return: float = 0.0  # sum of raw env rewards (penalties excluded)
    terminated: bool = False
    truncated: bool = False
    # Per-turn format penalty (invalid replies). It is added to that turn's advantage only, never
    # discounted back into earlier turns: a malformed reply must not make the move that led to
    # its state look bad (hitting in Blackjack would, while the model still babbles).
    penalties: list[float] = field(default_factory=list)
    # The env action played each turn. After the fields above: episodes written by hand (tests)
    # give those by position.
    actions: list[Any] = field(default_factory=list)
    # Action scoring only (data.policy: score): each turn's candidate actions and the index of the
    # one played (its text is that turn's response). Empty for generated replies.
    candidates: list[list[str]] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)
    # With a prompt budget (data.max_prompt_tokens), per observation: how many of the oldest turns
    # its prompt dropped (the prompt held observations[s:] and responses[s:]). Training encodes
    # exactly those prompts. Empty: every prompt held the whole history.
    prompt_start: list[int] = field(default_factory=list)
    # Token in, token out: per observation played (and the state to bootstrap from), the token ids
    # the policy was fed; per turn, the token ids it produced (see Reply). Training scores exactly
    # these, never a re-tokenization of the decoded text. Score mode also keeps every candidate's
    # tokens. Empty for episodes built from text alone: :func:`llamagym_pl.buffer.build_buffer`
    # then encodes them with the chat template.
    prompt_ids: list[list[int]] = field(default_factory=list)
    response_ids: list[list[int]] = field(default_factory=list)
    candidate_ids: list[list[list[int]]] = field(default_factory=list)
    # Critic-free estimators (model.advantage_estimator: grpo, gigpo): episodes with equal keys
    # started from the same initial state (a group of data.group_size). None: a group of its own.
    group: Hashable | None = None

    @property
    def done(self) -> bool:
        """Whether the episode ended (terminated or truncated); a rollout returns only these."""
        return self.terminated or self.truncated

    @property
    def num_turns(self) -> int:
        return len(self.responses)

    def add_turn(self, reply: Reply, action: Any, invalid: bool, penalty: float) -> None:
        """Record the reply to the latest observation and the action it played (its reward comes
        from the env, after)."""
        self.prompt_ids.append(reply.prompt_ids)
        self.response_ids.append(reply.reply_ids)
        if reply.candidates is not None:
            self.candidates.append(reply.candidates)
            self.candidate_ids.append(reply.candidate_ids)
            self.chosen.append(reply.chosen)
        self.responses.append(reply.text)
        self.actions.append(action)
        self.invalid.append(invalid)
        self.penalties.append(penalty if invalid else 0.0)


def format_observation(agent: Any, observation: Any) -> str:
    """``agent.format_observation(observation)``, refused unless it is text."""
    text = agent.format_observation(observation)
    if not isinstance(text, str):
        raise TypeError(
            f"{type(agent).__name__}.format_observation returned {type(text).__name__} ({text!r}); it "
            "must return the observation as a str"
        )
    return text


class PromptBudget:
    """The conversation the policy answers at an episode's latest observation: its whole history,
    or with ``max_tokens`` its newest turns that fit (the system prompt and the current observation
    are always kept; what was dropped is recorded in ``Episode.prompt_start``).

    ``name`` is the setting as the user wrote it, for the error when the budget cannot hold the
    system prompt and the current observation.
    """

    def __init__(self, max_tokens: int | None, name: str = "data.max_prompt_tokens") -> None:
        self.max_tokens = max_tokens
        self.name = name

    def messages(self, tokenizer, ep: Episode) -> list[Message]:
        if self.max_tokens is None:
            return build_messages(tokenizer, ep.system_prompt, ep.observations, ep.responses)
        if len(ep.prompt_start) < len(ep.observations):
            # The previous prompt's start: a longer conversation never keeps more of its history.
            previous = ep.prompt_start[-1] if ep.prompt_start else 0
            try:
                start = prompt_start(
                    tokenizer, ep.system_prompt, ep.observations, ep.responses, self.max_tokens, previous
                )
            except PromptBudgetError as err:
                raise ConfigError(
                    f"{self.name}={err.budget} cannot hold the system prompt ({err.system_tokens} tokens) "
                    f"and the current observation, which render to {err.needed} tokens: raise "
                    f"{self.name} to at least {err.needed}, or shorten the system prompt or the observations"
                ) from err
            ep.prompt_start.append(start)
        start = ep.prompt_start[-1]
        return build_messages(tokenizer, ep.system_prompt, ep.observations[start:], ep.responses[start:])

    def add_bootstrap_prompts(self, tokenizer, episodes: list[Episode]) -> None:
        """Record the prompt ids of the state after the last turn of each truncated episode."""
        cut = [ep for ep in episodes if len(ep.observations) > ep.num_turns]
        conversations = [self.messages(tokenizer, ep) for ep in cut]
        for ep, ids in zip(cut, prompt_token_ids(tokenizer, conversations), strict=True):
            ep.prompt_ids.append(ids)


def sample_space(space: gym.Space, rng: np.random.Generator) -> Any:
    """A random action of ``space`` drawn from ``rng`` (seeded per env: rollouts replay exactly)."""
    if isinstance(space, gym.spaces.Discrete):
        return int(space.start + rng.integers(space.n))
    space.seed(int(rng.integers(2**31)))
    return space.sample()


class InvalidActions:
    """The invalid-action policy: a reply becomes an env action, always a valid one.

    ``agent.extract_action`` parses the reply; a reply it rejects (raises) or maps outside
    ``space`` plays a fallback (counted by the caller, never dropped, so turns and rewards stay in
    step): ``random`` draws from the space, ``fixed`` plays ``fallback_action``; ``penalty`` is
    added to that turn's advantage. A reply chosen among candidates that is one of
    ``agent.action_names`` plays that name's index in a ``Discrete`` space. ``space`` may be None
    (the imperative loop without an action space): any parsed action is then valid.
    """

    def __init__(
        self,
        agent: Any,
        space: gym.Space | None,
        invalid_action: InvalidActionPolicy = "random",
        fallback_action: Any = None,
        penalty: float = 0.0,
    ) -> None:
        if invalid_action not in ("random", "fixed"):
            raise ValueError(f"invalid_action={invalid_action!r} must be 'random' or 'fixed'")
        if invalid_action == "fixed" and space is not None and not space.contains(fallback_action):
            raise ValueError(
                f"fallback_action={fallback_action!r} is not in the action space {space} of the env; "
                "set a valid fallback_action or use invalid_action: random"
            )
        self.agent = agent
        self.space = space
        self.invalid_action = invalid_action
        self.fallback_action = fallback_action
        self.penalty = penalty

    def parse(self, reply: Reply, rng: np.random.Generator) -> tuple[Any, bool]:
        """``(action, invalid)`` of ``reply``."""
        names = self.agent.action_names
        if reply.candidates is not None and names is not None and isinstance(self.space, gym.spaces.Discrete):
            if reply.text in names:
                return int(self.space.start) + names.index(reply.text), False
        try:
            action = self.agent.extract_action(reply.text)
            if self.space is None or self.space.contains(action):
                return action, False
        except Exception as err:  # noqa: BLE001 - any parse failure is an invalid action by contract
            return self.fallback(rng, reply.text, err), True
        return self.fallback(rng, reply.text), True

    def fallback(self, rng: np.random.Generator, reply: str, err: Exception | None = None) -> Any:
        if self.invalid_action == "fixed" and (self.space is not None or self.fallback_action is not None):
            return self.fallback_action
        if self.space is None:
            raise RuntimeError(
                f"{type(self.agent).__name__}.extract_action failed on the reply {reply!r}, and no action "
                "space is known to pick a fallback action from: pass ppo_config_dict={'action_space': "
                "env.action_space} (or set agent.action_space), or invalid_action='fixed' with a "
                "fallback_action"
            ) from err
        return sample_space(self.space, rng)
