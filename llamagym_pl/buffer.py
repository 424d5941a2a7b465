"""Turn a rollout's episodes into padded tensors, and serve PPO minibatches from them.

Token in, token out: rows are built from the token ids the policy was fed and produced
(``Episode.prompt_ids``/``response_ids``), never from a re-tokenization of the decoded text, so
the tokens trained on are the tokens sampled, each scored on exactly the prompt it was sampled
from.

Layout (R rows, L tokens; E episodes, T turns):
- ``input_ids``/``attention_mask``/``action_mask``/``turn_index``: (R, L), right padded. A row is
  one token sequence holding a run of turns of one episode (``row_episode``) whose prompts extend
  each other: turn ``t + 1``'s prompt starts with turn ``t``'s prompt and reply, so the row is
  encoded once per forward pass. Usually an episode is one row. A turn whose prompt does not
  extend the previous one (a prompt budget dropped old turns, or the sampled reply differs from
  how its text re-tokenizes in the next prompt, e.g. a reply cut before its end of turn) starts
  a new row with its own prompt. ``turn_index`` is the episode's turn number of each action
  token (-1 elsewhere, including the replies a row holds as history); ``action_mask`` is
  exactly the tokens the policy produced.
- Turn arrays are per episode, so GAE runs over whole episodes whatever the rows:
  ``value_rows``/``value_positions``/``turn_mask``/``rewards``/``penalties``: (E, T) (the value
  of turn ``t`` is read at ``value_positions[e, t]`` of row ``value_rows[e, t]``);
  ``terminated``/``bootstrap_row``/``bootstrap_position``: (E,) (0 where there is nothing to
  bootstrap: the episode terminated).
- Rows that hold turns come first (``num_train_rows``, the ones minibatches are drawn from);
  after them, rows holding only the prompt of a cut episode's next state, when budgeting made
  it shorter than the episode's last row.
- ``group``: (E,) each episode's group (episodes from one initial state, ``Episode.group``);
  ``anchor``: (E, T) each turn's anchor state (its group and observation text); what the
  critic-free estimators compare (:mod:`llamagym_pl.estimators`).
- ``actions``: what the action style trains on beyond the rows (score mode: every turn's
  candidates, :class:`~llamagym_pl.actions.candidates.CandidateTurns`); None when it trains on
  the rows themselves (generated replies).
- Once prepared (:func:`~llamagym_pl.update.prepare_rollout`, at each epoch start):
  ``old_logprobs``, the style's action log-probs (generated replies: (R, L) where
  ``old_logprobs[r, i]`` is log p(token i | tokens < i) at the reply tokens, ``action_mask``, and 0
  elsewhere; scored actions: (N,) per turn),
  ``old_values``/``advantages``/``returns`` (E, T), and ``pg_advantages`` (E, T): the advantages
  the policy loss uses, normalized once over the whole rollout (all DDP ranks), never per
  minibatch (a row's length depends on the actions taken, so any grouping by length would make a
  minibatch mean an action-dependent baseline).

What the DataModule hands the module each epoch, the buffer with its statistics and the style
that scores its actions, is :class:`~llamagym_pl.actions.base.Rollout`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from llamagym_pl.chat import build_messages, prompt_token_ids
from llamagym_pl.episode import Episode
from llamagym_pl.estimators import group_ids
from llamagym_pl.spans import encode_candidates


@dataclass
class RolloutBuffer:
    input_ids: Tensor
    attention_mask: Tensor
    action_mask: Tensor
    turn_index: Tensor
    row_episode: Tensor  # (R,)
    row_first_turn: Tensor  # (R,) the first turn the row trains
    row_num_turns: Tensor  # (R,) how many (0: a bootstrap-only row)
    value_rows: Tensor
    value_positions: Tensor
    turn_mask: Tensor
    rewards: Tensor
    penalties: Tensor
    terminated: Tensor
    bootstrap_row: Tensor
    bootstrap_position: Tensor
    lengths: Tensor
    temperature: float = 1.0  # the sampling temperature: log-probs are scored at the same one
    actions: Any = None  # the style's own tensors (score mode: CandidateTurns), None: the rows
    group: Tensor | None = None  # (E,) each episode's group (same initial state), for grpo/gigpo
    anchor: Tensor | None = None  # (E, T) each turn's anchor state (group and observation), for gigpo
    old_logprobs: Tensor | None = None
    old_values: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None
    pg_advantages: Tensor | None = None  # the advantages the policy loss uses (normalized once per rollout)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_train_rows(self) -> int:
        """Rows that hold turns: rows ``0 .. num_train_rows - 1``."""
        return int((self.row_num_turns > 0).sum())

    @property
    def train_lengths(self) -> Tensor:
        """Token lengths of the units minibatches are drawn from
        (:class:`~llamagym_pl.minibatches.MinibatchSampler`): the style's own (``actions.lengths``,
        score mode: one per turn), else the rows that hold turns."""
        if self.actions is not None:
            return self.actions.lengths
        return self.lengths[: self.num_train_rows]

    @property
    def prepared(self) -> bool:
        """Whether :func:`~llamagym_pl.update.prepare_rollout` has filled the old log-probs, values
        and advantages."""
        return self.pg_advantages is not None


@dataclass
class _Row:
    """Row of episode ``episode``: the token ids of the prompt of its last turn (or of the state
    after it, when ``bootstrap``) and that turn's reply. It trains turns ``first ..
    first + len(starts) - 1``, whose replies start at ``starts`` (earlier replies in the row are
    history: they were trained in an earlier row, on their own prompt)."""

    episode: int
    first: int
    ids: list[int]
    starts: list[int]
    bootstrap: bool = False


def _extends(prompt: list[int], row: list[int]) -> bool:
    return len(prompt) > len(row) and prompt[: len(row)] == row


def _rows(e: int, ep: Episode) -> list[_Row]:
    """Split episode ``e`` where a turn's prompt does not extend the previous prompt and reply.

    A prompt extends the previous one unless a prompt budget dropped old turns, the chat template
    rewrote history, or the reply's sampled tokens differ from how its text re-tokenizes in the
    next prompt (a reply cut without its end of turn, a non-canonical tokenization).
    """
    if len(ep.response_ids) != ep.num_turns or len(ep.prompt_ids) != len(ep.observations):
        raise ValueError(
            f"episode {e}: {len(ep.prompt_ids)} prompts and {len(ep.response_ids)} replies as token ids for "
            f"{len(ep.observations)} observations and {ep.num_turns} turns"
        )
    rows: list[_Row] = []
    for t, (prompt, reply) in enumerate(zip(ep.prompt_ids, ep.response_ids, strict=False)):
        if rows and _extends(prompt, rows[-1].ids):
            rows[-1].ids = prompt + reply
            rows[-1].starts.append(len(prompt))
        else:
            rows.append(_Row(e, t, prompt + reply, [len(prompt)]))
    if len(ep.observations) > ep.num_turns:  # the state after the last turn, to bootstrap from
        prompt = ep.prompt_ids[-1]
        if rows and _extends(prompt, rows[-1].ids):
            rows[-1].ids, rows[-1].bootstrap = list(prompt), True
        else:
            rows.append(_Row(e, ep.num_turns, list(prompt), [], bootstrap=True))
    return rows


def add_token_ids(tokenizer, episodes: Sequence[Episode]) -> None:
    """Give episodes built from text alone their token ids, as the chat template renders them.

    Rollouts record the ids the policy saw and produced (``Episode.prompt_ids`` ...); an episode
    written by hand has only text: each turn's prompt is its conversation (from
    ``prompt_start[t]`` on, under a prompt budget) rendered with the generation prompt, and its
    reply the tokens that rendering the reply adds, end of turn included (as a scored candidate).
    """
    todo = [ep for ep in episodes if not ep.prompt_ids]
    conversations, replies, bootstrap = [], [], []
    for ep in todo:
        starts = ep.prompt_start or [0] * len(ep.observations)
        if len(starts) != len(ep.observations) or any(not 0 <= s <= t for t, s in enumerate(starts)):
            raise ValueError(
                f"prompt_start {ep.prompt_start} needs one start per observation, each keeping its own"
            )
        for t, s in enumerate(starts):
            messages = build_messages(
                tokenizer, ep.system_prompt, ep.observations[s : t + 1], ep.responses[s:t]
            )
            if t < ep.num_turns:
                conversations.append(messages)
                replies.append(ep.candidates[t] if ep.candidates else [ep.responses[t]])
            else:
                bootstrap.append(messages)
    encoded = iter(encode_candidates(tokenizer, conversations, replies))
    bootstrap_ids = iter(prompt_token_ids(tokenizer, bootstrap))
    for ep in todo:
        for t in range(ep.num_turns):
            enc = next(encoded)
            ep.prompt_ids.append(enc.prompt_ids)
            if ep.candidates:
                ep.candidate_ids.append(enc.candidate_ids)
            ep.response_ids.append(enc.candidate_ids[ep.chosen[t] if ep.candidates else 0])
        if len(ep.observations) > ep.num_turns:
            ep.prompt_ids.append(next(bootstrap_ids))


def build_buffer(tokenizer, episodes: Sequence[Episode], temperature: float = 1.0) -> RolloutBuffer:
    """Pad the episodes' token ids into rows (see the module docstring); ``tokenizer`` gives the
    pad id, and encodes episodes that only have text (:func:`add_token_ids`). ``temperature``
    is the one the replies were sampled at."""
    if not episodes:
        raise ValueError("the rollout produced no episodes; raise steps_per_env or num_envs")
    add_token_ids(tokenizer, episodes)
    rows = [row for e, ep in enumerate(episodes) for row in _rows(e, ep)]
    rows.sort(key=lambda row: not row.starts)  # stable: bootstrap-only rows last
    max_len = max(len(r.ids) for r in rows)
    max_turns = max(ep.num_turns for ep in episodes)
    value_rows = [[0] * ep.num_turns for ep in episodes]
    value_positions = [[0] * ep.num_turns for ep in episodes]
    bootstrap_row, bootstrap_position = [0] * len(episodes), [0] * len(episodes)
    turn_index = []
    for i, r in enumerate(rows):
        index = [-1] * len(r.ids)
        for k, start in enumerate(r.starts):
            t = r.first + k
            value_rows[r.episode][t], value_positions[r.episode][t] = i, start - 1
            index[start : start + len(episodes[r.episode].response_ids[t])] = [t] * len(
                episodes[r.episode].response_ids[t]
            )
        turn_index.append(index)
        if r.bootstrap:
            bootstrap_row[r.episode], bootstrap_position[r.episode] = i, len(r.ids) - 1
    group = group_ids([ep.group for ep in episodes])
    # Rows are right padded as Python lists and become one tensor each: thousands of small
    # per-row tensors and slice assignments cost more than the whole list work.
    return RolloutBuffer(
        input_ids=_padded([r.ids for r in rows], max_len, tokenizer.pad_token_id, torch.long),
        attention_mask=_padded([[1] * len(r.ids) for r in rows], max_len, 0, torch.long),
        action_mask=_padded([[t >= 0 for t in row] for row in turn_index], max_len, False, torch.bool),
        turn_index=_padded(turn_index, max_len, -1, torch.long),
        row_episode=torch.tensor([r.episode for r in rows]),
        row_first_turn=torch.tensor([r.first for r in rows]),
        row_num_turns=torch.tensor([len(r.starts) for r in rows]),
        value_rows=_padded(value_rows, max_turns, 0, torch.long),
        value_positions=_padded(value_positions, max_turns, 0, torch.long),
        turn_mask=_padded([[True] * ep.num_turns for ep in episodes], max_turns, False, torch.bool),
        rewards=_padded([ep.rewards for ep in episodes], max_turns, 0.0, torch.float32),
        penalties=_padded(
            [ep.penalties or [0.0] * ep.num_turns for ep in episodes], max_turns, 0.0, torch.float32
        ),
        terminated=torch.tensor([ep.terminated for ep in episodes]),
        bootstrap_row=torch.tensor(bootstrap_row, dtype=torch.long),
        bootstrap_position=torch.tensor(bootstrap_position, dtype=torch.long),
        lengths=torch.tensor([len(r.ids) for r in rows]),
        temperature=temperature,
        group=group,
        anchor=_padded(_anchors(episodes, group.tolist()), max_turns, -1, torch.long),
    )


def _anchors(episodes: Sequence[Episode], group: list[int]) -> list[list[int]]:
    """Each turn's anchor-state group: turns of one group whose observation text is identical."""
    played = [ep.observations[: ep.num_turns] for ep in episodes]
    keys = [(g, obs) for g, observations in zip(group, played, strict=True) for obs in observations]
    numbers = iter(group_ids(keys).tolist())
    return [[next(numbers) for _ in range(ep.num_turns)] for ep in episodes]


def _padded(rows: Sequence[Sequence], length: int, fill, dtype: torch.dtype) -> Tensor:
    """``(len(rows), length)`` tensor of ``rows``, each right padded with ``fill``."""
    return torch.tensor([[*row, *[fill] * (length - len(row))] for row in rows], dtype=dtype)
