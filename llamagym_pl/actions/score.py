"""The scoring policy (``data.policy: score``, GLAM / TWOSOME): the LM picks among candidate actions.

Every step the agent's ``candidate_actions(observation, info)`` are scored as replies to the
prompt (:mod:`llamagym_pl.actions.scoring`) and one is drawn from ``softmax(score / temperature)``
(greedy: the argmax, the first on ties). The chosen text is the turn's reply, so episodes look
exactly like generated ones; a turn is one action, its log-prob that of the candidate
distribution, which also gives the entropy and the KL penalty.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import torch
from torch import Tensor

from llamagym_pl import ppo
from llamagym_pl.actions.base import ActionTerms, Policy, Prepared, Prompt, Reference, State, read_rows
from llamagym_pl.actions.candidates import (
    ScoreNormalization,
    candidate_kl,
    candidate_logprobs,
    candidate_minibatch,
    chosen_logprob,
    encode_turns,
    normalize_scores,
    prompt_logits,
)
from llamagym_pl.actions.scoring import candidate_forward, candidate_logprob_sums
from llamagym_pl.buffer import RolloutBuffer
from llamagym_pl.chat import UnknownWords
from llamagym_pl.episode import Episode, Reply
from llamagym_pl.guards import check_context
from llamagym_pl.spans import encode_candidates


class ScoreStyle:
    """A softmax over the agent's candidate actions' scores.

    Args:
        agent: gives each step's candidates (:meth:`~llamagym_pl.agent.Agent.candidate_actions`).
        normalization: ``token``, ``word`` or ``sum`` (see :mod:`llamagym_pl.actions.scoring`).
        temperature: divides the scores, in sampling and in every distribution PPO scores.
    """

    def __init__(
        self, agent: Any, normalization: ScoreNormalization = "token", temperature: float = 1.0
    ) -> None:
        normalize_scores(torch.zeros(1), torch.ones(1), torch.ones(1), normalization)  # validates it
        self.agent = agent
        self.normalization = normalization
        self.temperature = temperature
        self.unknown_words = UnknownWords()  # warns once per word the tokenizer cannot read

    def check(self, env: gym.Env) -> None:
        """The agent's action names must name the env's ``Discrete`` actions; without names, the
        candidates of the env's first state (from its info, by default) must be valid."""
        agent, names = type(self.agent).__name__, self.agent.action_names
        if names is not None:
            if not names or not all(isinstance(n, str) and n.strip() for n in names):
                raise ValueError(f"{agent}.action_names must be non-empty strings: {names!r}")
            if len(set(names)) != len(names):
                raise ValueError(f"{agent}.action_names has duplicates: {names!r}")
            space = env.action_space
            if isinstance(space, gym.spaces.Discrete) and len(names) != space.n:
                raise ValueError(
                    f"{agent}.action_names names {len(names)} actions but the env's action space {space} "
                    f"has {space.n}"
                )
            return
        try:
            state = env.reset(seed=0)
        except Exception:  # noqa: BLE001 - a failing reset is the rollout's counted env fault
            return
        self.candidates(state)

    def candidates(self, state: State) -> list[str]:
        cands = self.agent.candidate_actions(*state)
        if not cands or not all(isinstance(c, str) and c for c in cands):
            raise ValueError(
                f"{type(self.agent).__name__}.candidate_actions must return a non-empty list of "
                f"non-empty strings, got {cands!r}"
            )
        return list(cands)

    @torch.no_grad()
    def reply(
        self, policy: Policy, tokenizer: Any, prompts: Sequence[Prompt], states: Sequence[State], greedy: bool
    ) -> list[Reply]:
        """Score every prompt's candidates (each prompt encoded once) and pick one per prompt."""
        candidates = [self.candidates(state) for state in states]
        encoded = encode_candidates(tokenizer, prompts, candidates)
        texts = [m["content"] for conv in prompts for m in conv] + [c for cs in candidates for c in cs]
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
        return [
            Reply(cands[k], enc.prompt_ids, enc.candidate_ids[k], cands, enc.candidate_ids, k)
            for cands, enc, k in zip(candidates, encoded, chosen, strict=True)
        ]

    def encode(self, tokenizer: Any, episodes: Sequence[Episode], buf: RolloutBuffer) -> None:
        """Every turn with its candidates (:class:`~llamagym_pl.actions.candidates.CandidateTurns`)."""
        buf.actions = encode_turns(episodes, tokenizer.pad_token_id)

    def minibatch(self, buf: RolloutBuffer, index: Sequence[int]) -> dict[str, Tensor]:
        """Turns ``index`` with their candidates (:func:`.candidates.candidate_minibatch`)."""
        return candidate_minibatch(buf, index)

    @torch.no_grad()
    def prepare(self, policy: Policy, buf: RolloutBuffer, batch_size: int, reference: Reference) -> Prepared:
        """One candidate forward per turn, ``batch_size`` turns at a time, gives the chosen
        candidates' old log-probs and the turn values (the value head at each prompt's last token,
        as :meth:`logprobs` reads the new ones); only a truncated episode's next state needs a
        forward of its own (its row's hidden states, no logits).

        With a ``reference`` policy, each turn's KL penalty comes from the candidate distributions
        the policy acts with: ``log pi(a) - log pi_ref(a)`` of the chosen candidate (its
        expectation over a is the KL, and, unlike the KL itself, it depends on the action, so it
        pulls each choice toward the reference); ``train/kl_ref`` logs the mean exact
        ``KL(pi || pi_ref)`` over the candidates of each turn (>= 0).
        """
        device, turns = next(policy.parameters()).device, buf.actions
        old_logprobs, entropy, values = (torch.zeros(len(turns)) for _ in range(3))
        chosen_kl, exact_kl = torch.zeros(len(turns)), torch.zeros(len(turns))
        for start in range(0, len(turns), batch_size):
            index = list(range(start, min(start + batch_size, len(turns))))
            batch = {k: v.to(device) for k, v in candidate_minibatch(buf, index).items()}
            sums, turn_value = candidate_forward(policy, batch)  # (R,), (N,)
            values[index] = turn_value.float().cpu()
            logp = candidate_logprobs(batch, sums, self.normalization, self.temperature)  # (N, C)
            old_logprobs[index] = chosen_logprob(logp, batch).cpu()  # (N,)
            entropy[index] = ppo.entropy_from_logits(logp).cpu()
            if reference is not None:
                with reference.as_policy(device) as initial:
                    ref_sums = candidate_forward(initial, batch)[0]  # (R,)
                ref_logp = candidate_logprobs(batch, ref_sums, self.normalization, self.temperature)  # (N, C)
                chosen_kl[index] = (chosen_logprob(logp, batch) - chosen_logprob(ref_logp, batch)).cpu()
                exact_kl[index] = candidate_kl(logp, ref_logp).cpu()
        buf.old_logprobs = old_logprobs
        turn_values = torch.zeros_like(buf.rewards)  # (E, T)
        turn_values[turns.turn_episode, turns.turn_step] = values
        next_value = self.bootstrap_values(policy, buf, batch_size)
        metrics = {"rollout/candidate_entropy": float(entropy.mean())}
        if reference is None:
            return Prepared(turn_values, next_value, None, metrics)
        metrics["train/kl_ref"] = float(exact_kl.mean())
        kl = torch.zeros_like(buf.rewards)  # (E, T)
        kl[turns.turn_episode, turns.turn_step] = chosen_kl
        return Prepared(turn_values, next_value, kl, metrics)

    @staticmethod
    def bootstrap_values(policy: Policy, buf: RolloutBuffer, batch_size: int) -> Tensor:
        """(E,) the value of each truncated episode's next state, read at the end of the row that
        ends with its prompt; 0 for a terminated episode (which bootstraps nothing)."""
        next_value = torch.zeros(len(buf.terminated))
        truncated = (~buf.terminated).nonzero().squeeze(1)  # (E',)
        if len(truncated) and policy.has_critic:  # a critic-free policy's values are all 0
            rows = read_rows(policy, buf, batch_size, rows=buf.bootstrap_row[truncated])  # (E', L)
            next_value[truncated] = rows[torch.arange(len(truncated)), buf.bootstrap_position[truncated]]
        return next_value

    def logprobs(
        self, policy: Policy, parts: Sequence[dict[str, Tensor]], entropy_grad: bool = True
    ) -> list[ActionTerms]:
        """All candidates of every turn scored again, with grad, one batched forward per part: a
        turn's log-prob is its chosen candidate's, its entropy the candidate distribution's
        (detached without ``entropy_grad``)."""
        return [self._terms(policy, part, entropy_grad) for part in parts]

    def _terms(self, policy: Policy, batch: dict[str, Tensor], entropy_grad: bool) -> ActionTerms:
        sums, values = candidate_forward(policy, batch)  # (R,), (N,)
        logp = candidate_logprobs(batch, sums, self.normalization, self.temperature)  # (N, C)
        return ActionTerms(
            logprobs=chosen_logprob(logp, batch),
            old_logprobs=batch["old_logprobs"],
            advantages=batch["advantages"],
            entropy=ppo.entropy_from_logits(logp if entropy_grad else logp.detach()),
            values=values,
        )
