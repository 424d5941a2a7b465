"""Scored-action rollouts as tensors: every turn's candidates as prompt + candidate rows.

Layout (N turns, R candidate rows, S tokens): ``input_ids``/``candidate_mask`` (R, S), right
padded; row ``first_row[n] + k`` is the prompt of turn ``n`` followed by its candidate ``k``. The
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
    input_ids: Tensor  # (R, S)
    candidate_mask: Tensor  # (R, S) True on the candidate's tokens
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
            its episode's sequence that the turn's value is read from.
    """
    turns = [(e, t) for e, ep in enumerate(episodes) for t in range(ep.num_turns)]
    for ep in episodes:
        if len(ep.candidates) != ep.num_turns or len(ep.chosen) != ep.num_turns:
            raise ValueError("policy: score needs the candidates and choice of every turn (ScoringCollector)")
        for t, (cands, k) in enumerate(zip(ep.candidates, ep.chosen, strict=True)):
            if cands[k] != ep.responses[t]:
                raise ValueError(f"turn {t}: response {ep.responses[t]!r} is not its chosen candidate")
    conversations = [
        build_messages(
            tokenizer, episodes[e].system_prompt, episodes[e].observations[: t + 1], episodes[e].responses[:t]
        )
        for e, t in turns
    ]
    candidates = [episodes[e].candidates[t] for e, t in turns]
    encoded = encode_candidates(tokenizer, conversations, candidates)
    for (e, t), enc in zip(turns, encoded, strict=True):
        start = int(episode_buffer.value_positions[e, t]) + 1
        if episode_buffer.input_ids[e, :start].tolist() != enc.prompt_ids:
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
        input_ids=_padded([p + c for p, c in rows], length, tokenizer.pad_token_id, torch.long),
        candidate_mask=_padded(
            [[False] * len(p) + [True] * len(c) for p, c in rows], length, False, torch.bool
        ),
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
    """Turns ``index`` with their candidate rows, trimmed to their longest row.

    Rows of turn ``n`` (``row_turn == n``) are consecutive; ``value_rows[n]`` is its first row
    and ``value_positions[n]`` its prompt's last token. Once the rollout is scored, the turns'
    ``old_logprobs``, ``advantages``, ``returns`` and ``old_values`` (N,) come too.
    """
    idx = torch.as_tensor(index, dtype=torch.long)
    counts = buf.num_candidates[idx]  # (N,)
    row_turn, row_slot = row_layout(counts.tolist())  # (R,), (R,)
    rows = buf.first_row[idx][row_turn] + row_slot  # (R,)
    length = int(buf.lengths[rows].max())
    batch = {
        "input_ids": buf.input_ids[rows, :length],
        "attention_mask": (torch.arange(length) < buf.lengths[rows, None]).long(),  # (R, S)
        "candidate_mask": buf.candidate_mask[rows, :length],
        "num_tokens": buf.num_tokens[rows],
        "num_words": buf.num_words[rows],
        "row_turn": row_turn,
        "row_slot": row_slot,
        "value_rows": torch.cumsum(counts, 0) - counts,
        "value_positions": buf.prompt_lengths[idx] - 1,
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
