"""Scored-action rollouts as tensors: every turn's prompt once, then its candidates.

Layout (N turns, R candidate rows): :func:`~llamagym_pl.scoring.candidate_batch`'s, each prompt
once: ``prompt_ids``/``prompt_mask`` (N, P) left padded, ``candidate_ids``/``candidate_mask``
(R, K) right padded; row ``first_row[n] + k`` is candidate ``k`` of turn ``n``. The
episode sequences of the same rollout (:class:`~llamagym_pl.buffer.RolloutBuffer`) give the
turn values and advantages, exactly as for generated replies; turn ``n`` is turn
``turn_step[n]`` of episode ``turn_episode[n]`` there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from llamagym_pl.buffer import RolloutBuffer, add_token_ids
from llamagym_pl.rollout import Episode
from llamagym_pl.scoring import EncodedCandidates, ScoreNormalization, candidate_batch, row_layout, word_count


@dataclass
class ScoreBuffer:
    episodes: RolloutBuffer
    normalization: ScoreNormalization
    prompt_ids: Tensor  # (N, P) left padded
    prompt_mask: Tensor  # (N, P)
    candidate_ids: Tensor  # (R, K) right padded
    candidate_mask: Tensor  # (R, K) bool
    num_words: Tensor  # (R,)
    first_row: Tensor  # (N,)
    num_candidates: Tensor  # (N,)
    chosen: Tensor  # (N,) index of the played candidate
    turn_lengths: Tensor  # (N,) prompt + longest candidate (minibatches group similar lengths)
    turn_episode: Tensor  # (N,)
    turn_step: Tensor  # (N,)
    old_logprobs: Tensor | None = None  # (N,) log pi(chosen), filled by score_update.score_candidates

    def __len__(self) -> int:
        return self.chosen.shape[0]


def build_score_buffer(
    tokenizer,
    episodes: Sequence[Episode],
    episode_buffer: RolloutBuffer,
    normalization: ScoreNormalization,
) -> ScoreBuffer:
    """Encode every turn's candidates; ``episode_buffer`` is ``build_buffer(tokenizer, episodes)``.

    Raises:
        ValueError: if an episode lacks its candidates or its reply is not its chosen candidate.
    """
    turns = [(e, t) for e, ep in enumerate(episodes) for t in range(ep.num_turns)]
    for ep in episodes:
        if len(ep.candidates) != ep.num_turns or len(ep.chosen) != ep.num_turns:
            raise ValueError("policy: score needs the candidates and choice of every turn (ScoringCollector)")
        for t, (cands, k) in enumerate(zip(ep.candidates, ep.chosen, strict=True)):
            if cands[k] != ep.responses[t]:
                raise ValueError(f"turn {t}: response {ep.responses[t]!r} is not its chosen candidate")
    add_token_ids(tokenizer, episodes)  # a no-op for rollouts, which record them
    # Each turn's prompt and candidates as the policy scored them (under a prompt budget, without
    # the oldest turns it dropped): the episode rows' prefixes, by construction.
    encoded = [EncodedCandidates(episodes[e].prompt_ids[t], episodes[e].candidate_ids[t]) for e, t in turns]
    candidates = [episodes[e].candidates[t] for e, t in turns]
    layout = candidate_batch(encoded, tokenizer.pad_token_id)
    counts = torch.tensor([len(enc.candidate_ids) for enc in encoded])
    longest = torch.zeros(len(turns), dtype=torch.long).scatter_reduce(
        0, layout["row_turn"], layout["candidate_mask"].sum(1), "amax"
    )
    return ScoreBuffer(
        episodes=episode_buffer,
        normalization=normalization,
        prompt_ids=layout["prompt_ids"],
        prompt_mask=layout["prompt_mask"],
        candidate_ids=layout["candidate_ids"],
        candidate_mask=layout["candidate_mask"],
        num_words=torch.tensor([word_count(c) for cands in candidates for c in cands]),
        first_row=torch.cumsum(counts, 0) - counts,
        num_candidates=counts,
        chosen=torch.tensor([episodes[e].chosen[t] for e, t in turns]),
        turn_lengths=layout["prompt_mask"].sum(1) + longest,
        turn_episode=torch.tensor([e for e, _ in turns]),
        turn_step=torch.tensor([t for _, t in turns]),
    )


def score_minibatch(buf: ScoreBuffer, index: Sequence[int]) -> dict[str, Tensor]:
    """Turns ``index`` in the shared-prompt layout of :func:`~llamagym_pl.scoring.candidate_batch`.

    ``prompt_ids``/``prompt_mask`` (N, P) hold each turn's prompt once, left padded;
    ``candidate_ids``/``candidate_mask`` (R, K) its candidates, right padded; rows of turn ``n``
    (``row_turn == n``) are consecutive. Once the rollout is scored, the turns'
    ``old_logprobs``, ``advantages``, ``returns`` and ``old_values`` (N,) come too.
    """
    idx = torch.as_tensor(index, dtype=torch.long)
    counts = buf.num_candidates[idx]  # (N,)
    row_turn, row_slot = row_layout(counts.tolist())  # (R,), (R,)
    rows = buf.first_row[idx][row_turn] + row_slot  # (R,)
    # Trim to this minibatch's longest prompt (left padded: its last columns) and candidate.
    prompt_mask = buf.prompt_mask[idx]
    p = int(prompt_mask.sum(1).max())
    candidate_mask = buf.candidate_mask[rows]
    k = int(candidate_mask.sum(1).max())
    batch = {
        "prompt_ids": buf.prompt_ids[idx, -p:],
        "prompt_mask": prompt_mask[:, -p:],
        "candidate_ids": buf.candidate_ids[rows, :k],
        "candidate_mask": candidate_mask[:, :k],
        "num_tokens": candidate_mask.sum(1),
        "num_words": buf.num_words[rows],
        "row_turn": row_turn,
        "row_slot": row_slot,
        "chosen": buf.chosen[idx],
    }
    episodes, e, t = buf.episodes, buf.turn_episode[idx], buf.turn_step[idx]
    if buf.old_logprobs is not None and episodes.advantages is not None:
        batch["old_logprobs"] = buf.old_logprobs[idx]
        batch["advantages"] = episodes.pg_advantages[e, t]  # normalized once per rollout
        batch["returns"] = episodes.returns[e, t]
        batch["old_values"] = episodes.old_values[e, t]
    return batch


class ScoreDataset(Dataset):
    """Index access to a scored :class:`ScoreBuffer`: one item is one minibatch of turns."""

    def __init__(self, buffer: ScoreBuffer) -> None:
        self.buffer = buffer

    def __len__(self) -> int:
        return len(self.buffer)

    def __getitem__(self, index: list[int]) -> dict[str, Tensor]:
        if self.buffer.old_logprobs is None:
            raise RuntimeError("the score buffer must be scored (old log-probs, advantages) first")
        return score_minibatch(self.buffer, index)
