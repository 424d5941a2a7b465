"""Turn a list of text episodes into padded tensors, and serve PPO minibatches from them.

Layout (E episodes, L tokens, T turns):
- ``input_ids``/``attention_mask``/``action_mask``/``turn_index``: (E, L), right padded; one
  episode is one sequence, all its turns included, so it is encoded once per forward pass.
- ``value_positions``/``turn_mask``/``rewards``: (E, T); ``bootstrap_position``: (E,)
  (0 where there is nothing to bootstrap: the episode terminated).
- After scoring (:class:`~llamagym_pl.module.PPOModule` fills them at each epoch start):
  ``old_logprobs`` (E, L) where ``old_logprobs[e, i]`` is log p(token i | tokens < i),
  ``old_values``/``advantages``/``returns`` (E, T).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from llamagym_pl.chat import encode_episodes
from llamagym_pl.rollout import Episode


@dataclass
class RolloutBuffer:
    input_ids: Tensor
    attention_mask: Tensor
    action_mask: Tensor
    turn_index: Tensor
    value_positions: Tensor
    turn_mask: Tensor
    rewards: Tensor
    penalties: Tensor
    terminated: Tensor
    bootstrap_position: Tensor
    lengths: Tensor
    old_logprobs: Tensor | None = None
    old_values: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def scored(self) -> bool:
        return self.advantages is not None


def build_buffer(tokenizer, episodes: Sequence[Episode]) -> RolloutBuffer:
    """Encode episodes with the chat template (see :func:`llamagym_pl.chat.encode_episodes`)."""
    if not episodes:
        raise ValueError("the rollout produced no episodes; raise steps_per_env or num_envs")
    encoded = encode_episodes(
        tokenizer, [(ep.system_prompt, ep.observations, ep.responses) for ep in episodes]
    )
    max_len = max(len(e.input_ids) for e in encoded)
    max_turns = max(ep.num_turns for ep in episodes)
    # Rows are right padded as Python lists and become one tensor each: thousands of small
    # per-row tensors and slice assignments cost more than the whole list work.
    return RolloutBuffer(
        input_ids=_padded([e.input_ids for e in encoded], max_len, tokenizer.pad_token_id, torch.long),
        attention_mask=_padded([[1] * len(e.input_ids) for e in encoded], max_len, 0, torch.long),
        action_mask=_padded([e.action_mask for e in encoded], max_len, False, torch.bool),
        turn_index=_padded([e.turn_index for e in encoded], max_len, -1, torch.long),
        value_positions=_padded([e.value_positions for e in encoded], max_turns, 0, torch.long),
        turn_mask=_padded([[True] * ep.num_turns for ep in episodes], max_turns, False, torch.bool),
        rewards=_padded([ep.rewards for ep in episodes], max_turns, 0.0, torch.float32),
        penalties=_padded(
            [ep.penalties or [0.0] * ep.num_turns for ep in episodes], max_turns, 0.0, torch.float32
        ),
        terminated=torch.tensor([ep.terminated for ep in episodes]),
        # 0 where there is nothing to bootstrap (the episode terminated)
        bootstrap_position=torch.tensor([e.bootstrap_position or 0 for e in encoded], dtype=torch.long),
        lengths=torch.tensor([len(e.input_ids) for e in encoded]),
    )


def _padded(rows: Sequence[Sequence], length: int, fill, dtype: torch.dtype) -> Tensor:
    """``(len(rows), length)`` tensor of ``rows``, each right padded with ``fill``."""
    return torch.tensor([[*row, *[fill] * (length - len(row))] for row in rows], dtype=dtype)


class MinibatchSampler(Sampler[list[int]]):
    """``update_epochs`` shuffled passes over the episodes, each cut into ``num_minibatches``.

    The count of minibatches is fixed whatever the number of episodes, so every DDP rank takes
    the same number of optimizer steps. Within a pass, episodes of similar length go together
    (shuffle, then sort each chunk of ``num_minibatches`` neighbours... see ``_pass``) to keep
    padding low.
    """

    def __init__(self, lengths: Tensor, num_minibatches: int, update_epochs: int, seed: int) -> None:
        if len(lengths) < num_minibatches:
            raise ValueError(
                f"the rollout has {len(lengths)} episodes, fewer than num_minibatches={num_minibatches}; "
                "lower model.num_minibatches or raise data.num_envs / data.steps_per_env"
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
    """Gather episodes ``index``, trimmed to their longest sequence and turn count."""
    if not buf.scored:
        raise RuntimeError("the rollout buffer must be scored (old log-probs, advantages) first")
    idx = torch.as_tensor(index, dtype=torch.long)
    length = int(buf.lengths[idx].max())
    turns = int(buf.turn_mask[idx].sum(1).max())
    turn_index = buf.turn_index[idx, :length]  # (B, L)
    advantages = buf.advantages[idx, :turns]  # (B, T)
    # Every response token of a turn carries that turn's advantage.
    token_adv = advantages.gather(1, turn_index.clamp(min=0)) * (turn_index >= 0)  # (B, L)
    return {
        "input_ids": buf.input_ids[idx, :length],
        "attention_mask": buf.attention_mask[idx, :length],
        "action_mask": buf.action_mask[idx, :length],
        "old_logprobs": buf.old_logprobs[idx, :length],
        "token_advantages": token_adv,
        "value_positions": buf.value_positions[idx, :turns],
        "turn_mask": buf.turn_mask[idx, :turns],
        "old_values": buf.old_values[idx, :turns],
        "returns": buf.returns[idx, :turns],
    }
