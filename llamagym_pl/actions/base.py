"""The seam between the two policy styles: how an action's log-probability is computed.

A generated reply is many actions, its tokens, each with its log-prob under the LM's softmax; a
scored reply is one action, a candidate chosen from the softmax over the candidates' scores.
Everything at turn level is common: GAE, penalties, the KL penalty as a per-turn reward, invalid
actions (:mod:`llamagym_pl.update`, :mod:`llamagym_pl.episode`), and what a value is (the value
head at the last token of each turn's prompt). A style only says how it replies, what it trains
on and how it scores its actions, old (no grad, once per rollout) and new (in the loss), with the
turn values its forward passes give on the way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import gymnasium as gym
import torch
from torch import Tensor
from torch.utils.data import Dataset

from llamagym_pl.buffer import RolloutBuffer
from llamagym_pl.chat import Message
from llamagym_pl.episode import Episode, Reply
from llamagym_pl.kl import ReferencePolicy
from llamagym_pl.minibatches import length_groups
from llamagym_pl.policy import PolicyWithValueHead
from llamagym_pl.stats import RolloutStats

Policy = PolicyWithValueHead
State = tuple[Any, dict[str, Any]]
"""An env's latest ``(observation, info)``: the state a reply acts in (candidates may depend on it)."""
Prompt = list[Message]
"""A conversation ending with a user message: what the policy replies to."""
Reference = ReferencePolicy | None
"""The initial policy, for the KL penalty (None: no penalty)."""


class ActionTerms(NamedTuple):
    """A minibatch's actions, aligned: what the PPO objective needs from the style.

    ``logprobs``/``old_logprobs``/``advantages``/``entropy`` are (N,) over its N actions (tokens
    of generated replies, or turns of scored ones); ``values`` are the new turn values, shaped
    as the batch's ``old_values``.
    """

    logprobs: Tensor
    old_logprobs: Tensor
    advantages: Tensor
    entropy: Tensor
    values: Tensor


class Prepared(NamedTuple):
    """What a style's no-grad pass over a rollout returns (it also fills ``buf.old_logprobs``)."""

    values: Tensor  # (E, T) each turn's value, 0 past an episode's turns
    next_value: Tensor  # (E,) the value of the state after a truncated episode (any, if terminated)
    kl: Tensor | None  # (E, T) each turn's KL penalty to the reference policy (None: no reference)
    metrics: dict[str, float]


class ActionStyle(Protocol):
    """How a policy chooses and scores its actions (``data.policy``: ``generate`` or ``score``)."""

    temperature: float  # replies are sampled from softmax(. / temperature), and scored under it

    def check(self, env: gym.Env) -> None:
        """Fail before any rollout if this style cannot play ``env`` (a one-line config error)."""

    def reply(
        self, policy: Policy, tokenizer: Any, prompts: Sequence[Prompt], states: Sequence[State], greedy: bool
    ) -> list[Reply]:
        """Choose an action for each of a batch of prompts (each ending with a user message)."""

    def encode(self, tokenizer: Any, episodes: Sequence[Episode], buf: RolloutBuffer) -> None:
        """Add to ``buf`` what this style trains on beyond the episode rows (``buf.actions``, whose
        ``lengths`` are then ``buf.train_lengths``: the units minibatches are drawn from)."""

    def minibatch(self, buf: RolloutBuffer, index: Sequence[int]) -> dict[str, Tensor]:
        """The tensors of training units ``index`` (rows, or turns)."""

    def prepare(self, policy: Policy, buf: RolloutBuffer, batch_size: int, reference: Reference) -> Prepared:
        """No grad, eval mode: the old log-probs of every action (into ``buf.old_logprobs``), each
        turn's value (as :meth:`logprobs` reads the new ones) and, with a reference, each turn's KL."""

    def logprobs(
        self, policy: Policy, parts: Sequence[dict[str, Tensor]], entropy_grad: bool = True
    ) -> list[ActionTerms]:
        """With grad: the new log-probs and entropies of a minibatch given as forwards over units
        of similar length (:meth:`minibatch` tensors each), aligned with its old ones: one
        :class:`ActionTerms` per part. Without ``entropy_grad`` the entropies may come without
        a graph (no entropy bonus: a diagnostic only)."""


def row_chunks(
    buf: RolloutBuffer, batch_size: int, rows: Sequence[int] | None = None
) -> Iterator[tuple[slice, Tensor, int]]:
    """``(chunk, take, length)`` for each ``batch_size`` of episode rows ``rows`` (default: all):
    ``take`` the buffer's row numbers, ``chunk`` their place in ``rows``, ``length`` their longest
    sequence (a forward runs ``buf.input_ids[take, :length]``). One forward per chunk keeps a
    pass over a rollout's rows at a peak memory that does not grow with the number of envs."""
    index = torch.arange(len(buf)) if rows is None else torch.as_tensor(rows, dtype=torch.long)
    for start in range(0, len(index), batch_size):
        take = index[start : start + batch_size]
        yield slice(start, start + len(take)), take, int(buf.lengths[take].max())


def read_rows(
    policy: Policy, buf: RolloutBuffer, batch_size: int, rows: Sequence[int] | None = None
) -> Tensor:
    """The value at every position of episode rows ``rows`` (default: all), ``(len(rows), L)``,
    one forward per ``batch_size`` rows; the LM computes the logits of each row's last position
    only: a value needs the hidden states alone."""
    device = next(policy.parameters()).device
    values = torch.zeros(len(buf) if rows is None else len(rows), buf.input_ids.shape[1])
    for chunk, take, length in row_chunks(buf, batch_size, rows):
        ids = buf.input_ids[take, :length].to(device)
        mask = buf.attention_mask[take, :length].to(device)
        _, v = policy(ids, mask, all_logits=False)  # (B, L)
        values[chunk, :length] = v.float().cpu()
    return values


class RolloutDataset(Dataset):
    """Index access to a prepared buffer: an item is a whole minibatch of the style's training units
    (rows or turns), as :class:`~llamagym_pl.minibatches.MinibatchSampler` draws their indices, as a
    list of forwards over units of similar length (:func:`~llamagym_pl.minibatches.length_groups`)."""

    def __init__(self, buffer: RolloutBuffer, style: ActionStyle) -> None:
        self.buffer = buffer
        self.style = style

    def __len__(self) -> int:
        return len(self.buffer.train_lengths)

    def __getitem__(self, index: list[int]) -> list[dict[str, Tensor]]:
        if not self.buffer.prepared:
            raise RuntimeError("the rollout buffer must be prepared (old log-probs, advantages) first")
        lengths = self.buffer.train_lengths[index].tolist()
        return [self.style.minibatch(self.buffer, [index[i] for i in g]) for g in length_groups(lengths)]


@dataclass
class Rollout:
    """One epoch's rollout as the module receives it from the DataModule: the one interface
    between the two (the module prepares it and trains on it)."""

    stats: RolloutStats  # the episodes played, and how
    buffer: RolloutBuffer  # their tensors, prepared by the module
    style: ActionStyle  # how their actions were chosen, and how their log-probs are computed
    transcripts: list[str] = field(default_factory=list)  # a few conversations to log as text
