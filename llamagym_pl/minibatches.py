"""Minibatches of a prepared rollout: random draws of its training units (:class:`MinibatchSampler`),
each run as forwards of similar length (:func:`length_groups`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Sampler


class MinibatchSampler(Sampler[list[int]]):
    """``update_epochs`` shuffled passes over the rows, each cut into ``num_minibatches``.

    ``lengths`` are the rows' token lengths (:attr:`RolloutBuffer.train_lengths`: one row per
    episode, or per run of turns under a prompt budget). The count of minibatches is fixed
    whatever the number of rows, so every DDP rank takes the same number of optimizer steps.
    Minibatches are drawn at random, never grouped by length: a row's length depends on the
    actions taken (reply lengths, turns), so a length grouping is an action-dependent one.
    Padding is kept low inside a minibatch instead (:func:`length_groups`).
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
        perm = torch.randperm(len(self.lengths), generator=gen)
        return [chunk.tolist() for chunk in torch.tensor_split(perm, self.num_minibatches)]


MAX_PADDING = 0.10
"""The largest share of padding tokens :func:`length_groups` lets into one forward."""


def length_groups(lengths: Sequence[int], max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Split one minibatch into forwards of similar length: positions into ``lengths``, sorted by
    length, cut wherever padding to the group's longest would exceed ``max_padding`` of its tokens.

    The loss still averages the whole minibatch (:func:`llamagym_pl.update.minibatch_loss`
    concatenates the groups' terms), so the gradient is the random minibatch's; only the padding
    goes. Blackjack rows come in four lengths (1-4 turns): one forward over all of them is ~25%
    padding.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    total = 0
    for i in order:
        group = groups[-1] if groups else None
        # Sorted ascending: row i is the longest of its group, so the group pads to its length.
        if (
            group is not None
            and (len(group) + 1) * lengths[i] - (total + lengths[i])
            <= max_padding * (len(group) + 1) * lengths[i]
        ):
            group.append(i)
            total += lengths[i]
        else:
            groups.append([i])
            total = lengths[i]
    return groups
