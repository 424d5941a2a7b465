"""Turn a list of text episodes into padded tensors, and serve PPO minibatches from them.

Layout (R rows, L tokens; E episodes, T turns):
- ``input_ids``/``attention_mask``/``action_mask``/``turn_index``: (R, L), right padded. A row is
  one token sequence holding a run of turns of one episode (``row_episode``): their prompts are
  prefixes of each other, so the row is encoded once per forward pass. Without a prompt budget
  every episode is one row, all its turns included. With one (``Episode.prompt_start``), a turn
  whose prompt dropped more of the oldest turns than the previous one starts a new row, which
  begins with that shorter history: every turn is trained on exactly the prompt the policy saw.
  ``turn_index`` is the episode's turn number of each action token (-1 elsewhere, including the
  replies a row holds as history).
- Turn arrays are per episode, so GAE runs over whole episodes whatever the rows:
  ``value_rows``/``value_positions``/``turn_mask``/``rewards``/``penalties``: (E, T) (the value
  of turn ``t`` is read at ``value_positions[e, t]`` of row ``value_rows[e, t]``);
  ``terminated``/``bootstrap_row``/``bootstrap_position``: (E,) (0 where there is nothing to
  bootstrap: the episode terminated).
- Rows that hold turns come first (``num_train_rows``, the ones minibatches are drawn from);
  after them, rows holding only the prompt of a cut episode's next state, when budgeting made
  it shorter than the episode's last row.
- After scoring (:class:`~llamagym_pl.module.PPOModule` fills them at each epoch start):
  ``old_logprobs`` (R, L) where ``old_logprobs[r, i]`` is log p(token i | tokens < i),
  ``old_values``/``advantages``/``returns`` (E, T).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from llamagym_pl.chat import EncodedEpisode, EpisodeText, encode_episodes
from llamagym_pl.rollout import Episode


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
    old_logprobs: Tensor | None = None
    old_values: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_train_rows(self) -> int:
        """Rows that hold turns: rows ``0 .. num_train_rows - 1``."""
        return int((self.row_num_turns > 0).sum())

    @property
    def train_lengths(self) -> Tensor:
        """Token lengths of the rows minibatches are drawn from (:class:`MinibatchSampler`)."""
        return self.lengths[: self.num_train_rows]

    @property
    def scored(self) -> bool:
        return self.advantages is not None


@dataclass
class _Row:
    """Row of episode ``episode``: ``observations[start : end + bootstrap]`` and
    ``responses[start:end]``, training turns ``first .. end - 1`` (earlier ones are history)."""

    episode: int
    start: int
    first: int
    end: int
    bootstrap: bool = False

    def text(self, ep: Episode) -> EpisodeText:
        observations = ep.observations[self.start : self.end + self.bootstrap]
        return ep.system_prompt, observations, ep.responses[self.start : self.end]


def _rows(e: int, ep: Episode) -> list[_Row]:
    """Split episode ``e`` where a turn's prompt starts later than the previous turn's."""
    starts = ep.prompt_start or [0] * len(ep.observations)
    if len(starts) != len(ep.observations) or any(not 0 <= s <= t for t, s in enumerate(starts)):
        raise ValueError(
            f"episode {e}: prompt_start {ep.prompt_start} needs one start per observation, each "
            "keeping its own observation"
        )
    rows: list[_Row] = []
    for t in range(ep.num_turns):
        if rows and starts[t] == rows[-1].start:
            rows[-1].end = t + 1
        else:
            rows.append(_Row(e, starts[t], t, t + 1))
    if len(ep.observations) > ep.num_turns:  # the state after the last turn, to bootstrap from
        if rows and starts[-1] == rows[-1].start:
            rows[-1].bootstrap = True
        else:
            rows.append(_Row(e, starts[-1], ep.num_turns, ep.num_turns, bootstrap=True))
    return rows


def build_buffer(tokenizer, episodes: Sequence[Episode]) -> RolloutBuffer:
    """Encode episodes with the chat template (see :func:`llamagym_pl.chat.encode_episodes`)."""
    if not episodes:
        raise ValueError("the rollout produced no episodes; raise steps_per_env or num_envs")
    rows = [row for e, ep in enumerate(episodes) for row in _rows(e, ep)]
    rows.sort(key=lambda row: row.first == row.end)  # stable: bootstrap-only rows last
    encoded = encode_episodes(tokenizer, [r.text(episodes[r.episode]) for r in rows])
    turn_index = [_train_only(enc, r) for enc, r in zip(encoded, rows, strict=True)]
    max_len = max(len(e.input_ids) for e in encoded)
    max_turns = max(ep.num_turns for ep in episodes)
    value_rows = [[0] * ep.num_turns for ep in episodes]
    value_positions = [[0] * ep.num_turns for ep in episodes]
    bootstrap_row, bootstrap_position = [0] * len(episodes), [0] * len(episodes)
    for i, (enc, r) in enumerate(zip(encoded, rows, strict=True)):
        for t in range(r.first, r.end):
            value_rows[r.episode][t] = i
            value_positions[r.episode][t] = enc.value_positions[t - r.start]
        if r.bootstrap:
            bootstrap_row[r.episode], bootstrap_position[r.episode] = i, enc.bootstrap_position
    # Rows are right padded as Python lists and become one tensor each: thousands of small
    # per-row tensors and slice assignments cost more than the whole list work.
    return RolloutBuffer(
        input_ids=_padded([e.input_ids for e in encoded], max_len, tokenizer.pad_token_id, torch.long),
        attention_mask=_padded([[1] * len(e.input_ids) for e in encoded], max_len, 0, torch.long),
        action_mask=_padded([[t >= 0 for t in row] for row in turn_index], max_len, False, torch.bool),
        turn_index=_padded(turn_index, max_len, -1, torch.long),
        row_episode=torch.tensor([r.episode for r in rows]),
        row_first_turn=torch.tensor([r.first for r in rows]),
        row_num_turns=torch.tensor([r.end - r.first for r in rows]),
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
        lengths=torch.tensor([len(e.input_ids) for e in encoded]),
    )


def _train_only(enc: EncodedEpisode, row: _Row) -> list[int]:
    """The row's turn index: the episode's turn number on the tokens of the turns it trains, -1
    on the replies it holds as history (they were trained in an earlier row, on their own prompt)."""
    history = row.first - row.start
    return [t + row.start if t >= history else -1 for t in enc.turn_index]


def _padded(rows: Sequence[Sequence], length: int, fill, dtype: torch.dtype) -> Tensor:
    """``(len(rows), length)`` tensor of ``rows``, each right padded with ``fill``."""
    return torch.tensor([[*row, *[fill] * (length - len(row))] for row in rows], dtype=dtype)


class MinibatchSampler(Sampler[list[int]]):
    """``update_epochs`` shuffled passes over the rows, each cut into ``num_minibatches``.

    ``lengths`` are the rows' token lengths (:attr:`RolloutBuffer.train_lengths`: one row per
    episode, or per run of turns under a prompt budget). The count of minibatches is fixed
    whatever the number of rows, so every DDP rank takes the same number of optimizer steps.
    Within a pass, rows of similar length go together (shuffle, then sort each chunk of
    ``num_minibatches`` neighbours... see ``_pass``) to keep padding low.
    """

    def __init__(self, lengths: Tensor, num_minibatches: int, update_epochs: int, seed: int) -> None:
        if len(lengths) < num_minibatches:
            raise ValueError(
                f"the rollout has {len(lengths)} sequences to train on (one per episode, more with "
                f"data.max_prompt_tokens), fewer than num_minibatches={num_minibatches}; "
                "lower model.num_minibatches or raise data.num_envs / data.steps_per_env (or "
                "data.episodes_per_env)"
            )
        self.lengths = lengths
        self.num_minibatches = num_minibatches
        self.update_epochs = update_epochs
        self.seed = seed

    def __len__(self) -> int:
        return self.num_minibatches * self.update_epochs

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(self.update_epochs):
            yield from self._pass(gen)

    def _pass(self, gen: torch.Generator) -> list[list[int]]:
        # Sort by length with random tie-breaking, deal into contiguous chunks (similar lengths
        # share a minibatch: little padding), then shuffle the order of the chunks.
        perm = torch.randperm(len(self.lengths), generator=gen)
        order = perm[torch.argsort(self.lengths[perm], stable=True)]
        chunks = [c.tolist() for c in torch.tensor_split(order, self.num_minibatches)]
        return [chunks[i] for i in torch.randperm(len(chunks), generator=gen).tolist()]


class RolloutDataset(Dataset):
    """Index access to a scored buffer; :func:`collate` slices whole minibatches at once."""

    def __init__(self, buffer: RolloutBuffer) -> None:
        self.buffer = buffer

    def __len__(self) -> int:
        return len(self.buffer)

    def __getitem__(self, index: list[int]) -> dict[str, Tensor]:
        return minibatch(self.buffer, index)


def minibatch(buf: RolloutBuffer, index: Sequence[int]) -> dict[str, Tensor]:
    """Gather rows ``index``, trimmed to their longest sequence and turn count.

    Turn tensors (B, T') hold each row's own turns, left aligned: its ``row_num_turns``
    turns from ``row_first_turn`` on (all of an episode's turns when a row is an episode).
    """
    if not buf.scored:
        raise RuntimeError("the rollout buffer must be scored (old log-probs, advantages) first")
    idx = torch.as_tensor(index, dtype=torch.long)
    episode = buf.row_episode[idx]  # (B,)
    length = int(buf.lengths[idx].max())
    turns = int(buf.row_num_turns[idx].max())
    turn_index = buf.turn_index[idx, :length]  # (B, L) the episode's turn numbers
    # Every response token of a turn carries that turn's advantage.
    token_adv = buf.advantages[episode].gather(1, turn_index.clamp(min=0)) * (turn_index >= 0)  # (B, L)
    k = torch.arange(turns)  # (T',)
    # Turn k of each row is turn row_first_turn + k of its episode; past the row's turns (masked
    # out) any valid index will do.
    step = (buf.row_first_turn[idx, None] + k).clamp(max=buf.turn_mask.shape[1] - 1)  # (B, T')
    return {
        "input_ids": buf.input_ids[idx, :length],
        "attention_mask": buf.attention_mask[idx, :length],
        "action_mask": buf.action_mask[idx, :length],
        "old_logprobs": buf.old_logprobs[idx, :length],
        "token_advantages": token_adv,
        "value_positions": buf.value_positions[episode[:, None], step],
        "turn_mask": k < buf.row_num_turns[idx, None],
        "old_values": buf.old_values[episode[:, None], step],
        "returns": buf.returns[episode[:, None], step],
    }
