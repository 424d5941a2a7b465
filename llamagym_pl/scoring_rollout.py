"""Rollouts where the policy picks among candidate actions instead of generating (``policy: score``).

Everything but the reply step is :class:`~llamagym_pl.rollout.RolloutCollector`'s: seeding,
budgets, env faults, invalid actions. The chosen candidate's text becomes the turn's reply, so
episodes look exactly like generated ones; each turn also records its candidates and the
chosen index (``Episode.candidates``/``Episode.chosen``).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from llamagym_pl.agent import Agent
from llamagym_pl.guards import check_context
from llamagym_pl.rollout import Episode, RolloutCollector
from llamagym_pl.scoring import (
    ScoreNormalization,
    candidate_logprob_sums,
    encode_candidates,
    normalize_scores,
    prompt_logits,
)


class LastStep(gym.Wrapper):
    """Remembers the latest observation and info: candidate actions may depend on both."""

    last_observation: Any = None
    last_info: dict[str, Any] = {}

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        self.last_observation, self.last_info = super().reset(**kwargs)
        return self.last_observation, self.last_info

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        out = super().step(action)
        self.last_observation, self.last_info = out[0], out[4]
        return out


class ScoringCollector(RolloutCollector):
    """A :class:`RolloutCollector` whose policy is a softmax over candidate actions' scores.

    Candidates come from ``agent.candidate_actions(observation, info)`` every step. Sampling
    draws from ``softmax(score / temperature)``; greedy play takes the argmax (the first on ties).
    ``top_k``/``top_p``/``max_new_tokens`` do not apply. A chosen text that is one of
    ``agent.action_names`` plays its index in a Discrete space; any other goes through
    ``agent.extract_action`` and the invalid-action policy.

    Args:
        normalization: ``token``, ``word`` or ``sum`` (see :mod:`llamagym_pl.scoring`).
        *args, **kwargs: as for :class:`RolloutCollector`.
    """

    def __init__(self, *args: Any, normalization: ScoreNormalization = "token", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        normalize_scores(torch.zeros(1), torch.ones(1), torch.ones(1), normalization)  # validates it
        self.normalization = normalization
        self.envs = [LastStep(env) for env in self.envs]
        if self.agent.action_names is not None:
            self._check_action_names(self.agent.action_names)
        elif type(self.agent).candidate_actions is Agent.candidate_actions:
            self._probe_candidates()

    def _check_action_names(self, names: list[str]) -> None:
        agent = type(self.agent).__name__
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise ValueError(f"{agent}.action_names must be non-empty strings: {names!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"{agent}.action_names has duplicates: {names!r}")
        space = self.action_space
        if isinstance(space, gym.spaces.Discrete) and len(names) != space.n:
            raise ValueError(
                f"{agent}.action_names names {len(names)} actions but the env's action space {space} "
                f"has {space.n}"
            )

    def _probe_candidates(self) -> None:
        """Fail when the collector is built (a one-line config error), not mid-rollout, if the
        candidates must come from the env's info and its first reset has none."""
        try:
            self.envs[0].reset(seed=0)
        except Exception:  # noqa: BLE001 - a failing reset is the rollout's counted env fault
            return
        self._candidates(0)

    def _candidates(self, i: int) -> list[str]:
        env = self.envs[i]
        cands = self.agent.candidate_actions(env.last_observation, env.last_info)
        if not cands or not all(isinstance(c, str) and c for c in cands):
            raise ValueError(
                f"{type(self.agent).__name__}.candidate_actions must return a non-empty list of "
                f"non-empty strings, got {cands!r}"
            )
        return list(cands)

    def _reply(
        self, policy, tokenizer, conversations, greedy: bool, envs: list[int], episodes: list[Episode]
    ) -> tuple[list[str], int, int]:
        candidates = [self._candidates(i) for i in envs]
        encoded = encode_candidates(tokenizer, conversations, candidates)
        texts = [m["content"] for conv in conversations for m in conv] + [c for cs in candidates for c in cs]
        ids = [e.prompt_ids for e in encoded] + [c for e in encoded for c in e.candidate_ids]
        self.unknown_words.check(tokenizer, texts, ids)
        longest = max(len(c) for e in encoded for c in e.candidate_ids)
        check_context(policy, max(len(e.prompt_ids) for e in encoded), longest)
        sums = candidate_logprob_sums(policy, encoded, tokenizer.pad_token_id)  # (R,)
        logits = prompt_logits(sums, encoded, candidates, self.normalization)  # (B, C)
        if greedy:
            chosen = logits.argmax(-1).tolist()
        else:
            chosen = torch.multinomial(torch.softmax(logits / self.temperature, -1), 1).squeeze(1).tolist()
        for ep, cands, enc, k in zip(episodes, candidates, encoded, chosen, strict=True):
            ep.candidates.append(cands)
            ep.chosen.append(k)
            ep.prompt_ids.append(enc.prompt_ids)
            ep.candidate_ids.append(enc.candidate_ids)
            ep.response_ids.append(enc.candidate_ids[k])
        replies = [cands[k] for cands, k in zip(candidates, chosen, strict=True)]
        n_prompt = sum(len(e.prompt_ids) for e in encoded)
        n_gen = sum(len(e.candidate_ids[k]) for e, k in zip(encoded, chosen, strict=True))
        return replies, n_prompt, n_gen

    def _parse(self, reply: str, rng: np.random.Generator) -> tuple[Any, bool]:
        names = self.agent.action_names
        if names is not None and isinstance(self.action_space, gym.spaces.Discrete) and reply in names:
            return int(self.action_space.start) + names.index(reply), False
        return super()._parse(reply, rng)
