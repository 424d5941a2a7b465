"""The candidate distributions of score mode, and a rollout's turns in the layout that scores them.

Layout of N turns and their R candidate rows (row ``r`` is candidate ``row_slot[r]`` of turn
``row_turn[r]``): scores are (R,), candidate distributions (N, C) with ``-inf`` past a turn's
candidates, C the most candidates of any turn. A rollout's turns (:class:`CandidateTurns`) hold
each turn's prompt once: ``prompt_ids``/``prompt_mask`` (N, P) left padded,
``candidate_ids``/``candidate_mask`` (R, K) right padded; row ``first_row[n] + k`` is candidate
``k`` of turn ``n``, and turn ``n`` is turn ``turn_step[n]`` of episode ``turn_episode[n]`` of the
rollout buffer, whose episode rows give the turn values and advantages, exactly as for generated
replies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from llamagym_pl.episode import Episode
from llamagym_pl.spans import EncodedCandidates

if TYPE_CHECKING:
    from llamagym_pl.buffer import RolloutBuffer

ScoreNormalization = Literal["token", "word", "sum"]


def word_count(text: str) -> int:
    """Words of a candidate (whitespace separated, at least 1): TWOSOME's word normalization."""
    return max(len(text.split()), 1)


def normalize_scores(
    logprob_sums: Tensor, num_tokens: Tensor, num_words: Tensor, normalization: ScoreNormalization
) -> Tensor:
    """A candidate's score from its summed token log-probs. All (R,) -> (R,) float32."""
    sums = logprob_sums.float()
    if normalization == "sum":
        return sums
    if normalization == "token":
        return sums / num_tokens.to(sums)
    if normalization == "word":
        return sums / num_words.to(sums)
    raise ValueError(f"score_normalization={normalization!r} is not one of token, word, sum")


def candidate_logits(scores: Tensor, row_turn: Tensor, row_slot: Tensor, num_turns: int) -> Tensor:
    """Scatter (R,) candidate scores into (N, C) logits, ``-inf`` where a turn has no candidate.

    ``log_softmax(., -1)`` of the result is each turn's candidate distribution, and
    :func:`llamagym_pl.ppo.entropy_from_logits` its entropy.
    """
    num_slots = int(row_slot.max()) + 1 if row_slot.numel() else 1
    logits = scores.new_full((num_turns, num_slots), float("-inf"))  # (N, C)
    return logits.index_put((row_turn, row_slot), scores)  # out of place: keeps the graph


def prompt_logits(
    sums: Tensor,
    encoded: Sequence[EncodedCandidates],
    candidates: Sequence[Sequence[str]],
    normalization: ScoreNormalization,
) -> Tensor:
    """(B, C) candidate logits of B prompts from their candidates' (R,) log-prob sums."""
    num_tokens = torch.tensor([len(c) for e in encoded for c in e.candidate_ids])
    num_words = torch.tensor([word_count(c) for cands in candidates for c in cands])
    scores = normalize_scores(sums, num_tokens, num_words, normalization)
    return candidate_logits(scores, *row_layout([len(c) for c in candidates]), len(candidates))


def row_layout(num_candidates: Sequence[int]) -> tuple[Tensor, Tensor]:
    """``(row_turn, row_slot)`` (R,) for turns with ``num_candidates`` candidates each."""
    counts = torch.as_tensor(list(num_candidates), dtype=torch.long)
    row_turn = torch.repeat_interleave(torch.arange(len(counts)), counts)  # (R,)
    first = torch.cumsum(counts, 0) - counts  # (N,) first row of each turn
    return row_turn, torch.arange(len(row_turn)) - first[row_turn]


def candidate_batch(encoded: Sequence[EncodedCandidates], pad_token_id: int) -> dict[str, Tensor]:
    """The shared-prompt layout of B prompts and their R candidates (see :func:`candidate_forward`).

    ``prompt_ids``/``prompt_mask`` (B, P) left padded; ``candidate_ids``/``candidate_mask``
    (R, K) right padded; ``row_turn`` (R,) the prompt of each candidate row.
    """
    prompts = [e.prompt_ids for e in encoded]
    cands = [c for e in encoded for c in e.candidate_ids]
    p, k = max(len(x) for x in prompts), max(len(c) for c in cands)
    return {
        "prompt_ids": torch.tensor([[pad_token_id] * (p - len(x)) + x for x in prompts]),
        "prompt_mask": torch.tensor([[0] * (p - len(x)) + [1] * len(x) for x in prompts]),
        "candidate_ids": torch.tensor([c + [pad_token_id] * (k - len(c)) for c in cands]),
        "candidate_mask": torch.tensor([[True] * len(c) + [False] * (k - len(c)) for c in cands]),
        "row_turn": row_layout([len(e.candidate_ids) for e in encoded])[0],
    }


def turn_distribution(batch: dict[str, Tensor], sums: Tensor, normalization: ScoreNormalization) -> Tensor:
    """(N, C) candidate logits of the batch's turns from their rows' log-prob sums (R,)."""
    scores = normalize_scores(sums, batch["num_tokens"], batch["num_words"], normalization)
    return candidate_logits(scores, batch["row_turn"], batch["row_slot"], batch["chosen"].shape[0])


def candidate_logprobs(
    batch: dict[str, Tensor], sums: Tensor, normalization: ScoreNormalization, temperature: float
) -> Tensor:
    """(N, C) log-probabilities of each turn's candidates, ``log_softmax(scores / temperature)``
    (``-inf`` past a turn's candidates)."""
    return torch.log_softmax(turn_distribution(batch, sums, normalization) / temperature, -1)


def chosen_logprob(logp: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """(N,) log-probability of each turn's chosen candidate from (N, C) ``logp``."""
    return logp.gather(1, batch["chosen"][:, None]).squeeze(1)


def candidate_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Exact ``KL(pi || pi_ref) = sum_k pi_k (log pi_k - log ref_k)`` per turn, (N, C) -> (N,);
    slots past a turn's candidates (``-inf`` in both) contribute 0."""
    valid = torch.isfinite(logp)
    diff = torch.where(valid, logp - ref_logp, 0.0)
    return (logp.exp() * diff).sum(-1)


@dataclass
class CandidateTurns:
    """Every turn of a rollout with its candidates (see the module docstring for the layout)."""

    prompt_ids: Tensor  # (N, P) left padded
    prompt_mask: Tensor  # (N, P)
    candidate_ids: Tensor  # (R, K) right padded
    candidate_mask: Tensor  # (R, K) bool
    num_words: Tensor  # (R,)
    first_row: Tensor  # (N,)
    num_candidates: Tensor  # (N,)
    chosen: Tensor  # (N,) index of the played candidate
    lengths: Tensor  # (N,) prompt + longest candidate (a minibatch's forwards group similar lengths)
    turn_episode: Tensor  # (N,)
    turn_step: Tensor  # (N,)

    def __len__(self) -> int:
        return self.chosen.shape[0]


def encode_turns(episodes: Sequence[Episode], pad_token_id: int) -> CandidateTurns:
    """Lay out every turn's recorded prompt and candidate token ids.

    Raises:
        ValueError: if an episode lacks its candidates or its reply is not its chosen candidate.
    """
    turns = [(e, t) for e, ep in enumerate(episodes) for t in range(ep.num_turns)]
    for ep in episodes:
        if len(ep.candidates) != ep.num_turns or len(ep.chosen) != ep.num_turns:
            raise ValueError("policy: score needs the candidates and choice of every turn (ScoreStyle)")
        for t, (cands, k) in enumerate(zip(ep.candidates, ep.chosen, strict=True)):
            if cands[k] != ep.responses[t]:
                raise ValueError(f"turn {t}: response {ep.responses[t]!r} is not its chosen candidate")
    # Each turn's prompt and candidates as the policy scored them (under a prompt budget, without
    # the oldest turns it dropped): the episode rows' prefixes, by construction.
    encoded = [EncodedCandidates(episodes[e].prompt_ids[t], episodes[e].candidate_ids[t]) for e, t in turns]
    candidates = [episodes[e].candidates[t] for e, t in turns]
    layout = candidate_batch(encoded, pad_token_id)
    counts = torch.tensor([len(enc.candidate_ids) for enc in encoded])
    longest = torch.zeros(len(turns), dtype=torch.long).scatter_reduce(
        0, layout["row_turn"], layout["candidate_mask"].sum(1), "amax"
    )
    return CandidateTurns(
        prompt_ids=layout["prompt_ids"],
        prompt_mask=layout["prompt_mask"],
        candidate_ids=layout["candidate_ids"],
        candidate_mask=layout["candidate_mask"],
        num_words=torch.tensor([word_count(c) for cands in candidates for c in cands]),
        first_row=torch.cumsum(counts, 0) - counts,
        num_candidates=counts,
        chosen=torch.tensor([episodes[e].chosen[t] for e, t in turns]),
        lengths=layout["prompt_mask"].sum(1) + longest,
        turn_episode=torch.tensor([e for e, _ in turns]),
        turn_step=torch.tensor([t for _, t in turns]),
    )


def candidate_minibatch(buf: RolloutBuffer, index: Sequence[int]) -> dict[str, Tensor]:
    """Turns ``index`` of ``buf.actions`` (:class:`CandidateTurns`) in the shared-prompt layout of
    :func:`candidate_batch`: each turn's prompt once, trimmed to the longest; its candidates
    after, rows of turn ``n`` (``row_turn == n``) consecutive. Once the rollout is prepared, the
    turns' ``old_logprobs``, ``advantages``, ``returns``, ``old_values`` and ``turn_mask`` (N,) too.
    """
    turns: CandidateTurns = buf.actions
    idx = torch.as_tensor(index, dtype=torch.long)
    counts = turns.num_candidates[idx]  # (N,)
    row_turn, row_slot = row_layout(counts.tolist())  # (R,), (R,)
    rows = turns.first_row[idx][row_turn] + row_slot  # (R,)
    # Trim to this minibatch's longest prompt (left padded: its last columns) and candidate.
    prompt_mask = turns.prompt_mask[idx]
    p = int(prompt_mask.sum(1).max())
    candidate_mask = turns.candidate_mask[rows]
    k = int(candidate_mask.sum(1).max())
    batch = {
        "prompt_ids": turns.prompt_ids[idx, -p:],
        "prompt_mask": prompt_mask[:, -p:],
        "candidate_ids": turns.candidate_ids[rows, :k],
        "candidate_mask": candidate_mask[:, :k],
        "num_tokens": candidate_mask.sum(1),
        "num_words": turns.num_words[rows],
        "row_turn": row_turn,
        "row_slot": row_slot,
        "chosen": turns.chosen[idx],
    }
    if buf.prepared:
        e, t = turns.turn_episode[idx], turns.turn_step[idx]
        batch["old_logprobs"] = buf.old_logprobs[idx]
        batch["advantages"] = buf.pg_advantages[e, t]  # normalized once per rollout
        batch["returns"] = buf.returns[e, t]
        batch["old_values"] = buf.old_values[e, t]
        batch["turn_mask"] = torch.ones(len(idx), dtype=torch.bool)  # one action, one value per turn
    return batch
