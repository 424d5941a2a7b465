"""Scored-action rollouts as tensors: every turn's candidates as prompt + candidate rows.

Layout (N turns, R candidate rows, S tokens): ``input_ids`` (R, S), right padded; row
``first_row[n] + k`` is the prompt of turn ``n`` (``prompt_lengths[n]`` tokens) followed by its
candidate ``k``. Minibatches (:func:`score_minibatch`) hold each prompt once. The
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

from llamagym_pl.buffer import RolloutBuffer, _padded
from llamagym_pl.chat import build_messages
from llamagym_pl.rollout import Episode
from llamagym_pl.scoring import ScoreNormalization, encode_candidates, row_layout, word_count


@dataclass
class ScoreBuffer:
    episodes: RolloutBuffer
    normalization: ScoreNormalization
    pad_token_id: int
    input_ids: Tensor  # (R, S)
    lengths: Tensor  # (R,)
    num_tokens: Tensor  # (R,)
    num_words: Tensor  # (R,)
    first_row: Tensor  # (N,)
    num_candidates: Tensor  # (N,)
    chosen: Tensor  # (N,) index of the played candidate
    prompt_lengths: Tensor  # (N,)
    turn_lengths: Tensor  # (N,) the longest row of the turn (minibatches group similar lengths)
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
        ValueError: if an episode lacks its candidates, or a turn's prompt is not the prefix of
            the row (of the episode buffer) that the turn's value is read from.
    """
    turns = [(e, t) for e, ep in enumerate(episodes) for t in range(ep.num_turns)]
    for ep in episodes:
        if len(ep.candidates) != ep.num_turns or len(ep.chosen) != ep.num_turns:
            raise ValueError("policy: score needs the candidates and choice of every turn (ScoringCollector)")
        for t, (cands, k) in enumerate(zip(ep.candidates, ep.chosen, strict=True)):
            if cands[k] != ep.responses[t]:
                raise ValueError(f"turn {t}: response {ep.responses[t]!r} is not its chosen candidate")
    # Each turn's prompt as the policy saw it: under a prompt budget, without the oldest turns
    # it dropped (Episode.prompt_start).
    starts = [episodes[e].prompt_start[t] if episodes[e].prompt_start else 0 for e, t in turns]
    conversations = [
        build_messages(tokenizer, ep.system_prompt, ep.observations[s : t + 1], ep.responses[s:t])
        for (e, t), s in zip(turns, starts, strict=True)
        for ep in [episodes[e]]
    ]
    candidates = [episodes[e].candidates[t] for e, t in turns]
    encoded = encode_candidates(tokenizer, conversations, candidates)
    for (e, t), enc in zip(turns, encoded, strict=True):
        row, start = int(episode_buffer.value_rows[e, t]), int(episode_buffer.value_positions[e, t]) + 1
        if episode_buffer.input_ids[row, :start].tolist() != enc.prompt_ids:
            raise ValueError(
                f"episode {e}, turn {t}: the generation prompt does not tokenize to the prefix of the "
                "episode's sequence (the chat template is not prefix-stable)"
            )
    rows = [(enc.prompt_ids, cand) for enc in encoded for cand in enc.candidate_ids]
    length = max(len(p) + len(c) for p, c in rows)
    counts = [len(enc.candidate_ids) for enc in encoded]
    row_turn, _ = row_layout(counts)
    lengths = torch.tensor([len(p) + len(c) for p, c in rows])
    return ScoreBuffer(
        episodes=episode_buffer,
        normalization=normalization,
        pad_token_id=tokenizer.pad_token_id,
        input_ids=_padded([p + c for p, c in rows], length, tokenizer.pad_token_id, torch.long),
        lengths=lengths,
        num_tokens=torch.tensor([len(c) for _, c in rows]),
        num_words=torch.tensor([word_count(c) for cands in candidates for c in cands]),
        first_row=torch.cumsum(torch.tensor(counts), 0) - torch.tensor(counts),
        num_candidates=torch.tensor(counts),
        chosen=torch.tensor([episodes[e].chosen[t] for e, t in turns]),
        prompt_lengths=torch.tensor([len(enc.prompt_ids) for enc in encoded]),
        turn_lengths=torch.zeros(len(turns), dtype=torch.long).scatter_reduce(0, row_turn, lengths, "amax"),
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
    prompt_len = buf.prompt_lengths[idx]  # (N,)
    p = int(prompt_len.max())
    # Left padding: column j of turn n reads token j - (P - prompt_len[n]) of its first row.
    col = torch.arange(p) - (p - prompt_len[:, None])  # (N, P)
    prompt_mask = col >= 0
    prompt_ids = buf.input_ids[buf.first_row[idx]].gather(1, col.clamp(min=0))
    cand_len = buf.lengths[rows] - prompt_len[row_turn]  # (R,)
    k = int(cand_len.max())
    cand_col = prompt_len[row_turn, None] + torch.arange(k)  # (R, K)
    cand_mask = torch.arange(k) < cand_len[:, None]
    cand_ids = buf.input_ids[rows].gather(1, cand_col.clamp(max=buf.input_ids.shape[1] - 1))
    pad = buf.pad_token_id
    batch = {
        "prompt_ids": torch.where(prompt_mask, prompt_ids, pad),
        "prompt_mask": prompt_mask.long(),
        "candidate_ids": torch.where(cand_mask, cand_ids, pad),
        "candidate_mask": cand_mask,
        "num_tokens": buf.num_tokens[rows],
        "num_words": buf.num_words[rows],
        "row_turn": row_turn,
        "row_slot": row_slot,
        "chosen": buf.chosen[idx],
    }
    episodes, e, t = buf.episodes, buf.turn_episode[idx], buf.turn_step[idx]
    if buf.old_logprobs is not None and episodes.advantages is not None:
        batch["old_logprobs"] = buf.old_logprobs[idx]
        batch["advantages"] = episodes.advantages[e, t]
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
