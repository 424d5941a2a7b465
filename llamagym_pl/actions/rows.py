"""The forward pass over episode rows (generate mode): logits only where read, the shared prefix once.

Episode rows (:mod:`llamagym_pl.buffer`) are right padded, so a token's position is its column,
and every row of a rollout starts with the same system prompt. :func:`row_forwards` gives the
logits at chosen positions (those that predict the reply tokens) and the values at chosen
positions (the turns' value positions), with

- the LM's output layer at those N positions only, not at all B x L
  (:mod:`llamagym_pl.lm_head`): the values need the hidden states alone;
- the prefix all rows share encoded once: as rows of the same forward as the rows' own tokens,
  packed (:mod:`llamagym_pl.packing`), or, for a model that cannot be packed, as a ``(1, c)``
  forward whose KV cache each row's rest continues (:mod:`llamagym_pl.prefix_cache`). Whole rows
  when training with gradient checkpointing, which has no cache. Right padded, a row is laid out
  ``[prefix | rest | padding]``: no padding between its tokens (unlike generation's
  ``[prefix | padding | rest]``), so sliding-window layers see the same tokens as in the whole row.

The hidden states come as a table and, for each row position, the table row that holds its state
(:class:`RowStates`): the prefix's states once, each row's where its forward left them, so reading
N positions gathers N states, without rebuilding (B, L, H) rows. All give the log-probs, values
and gradients of one forward of the whole rows with full logits, up to float rounding; that path
remains for an LM whose logits :mod:`llamagym_pl.lm_head` cannot reproduce.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from llamagym_pl import ppo
from llamagym_pl.lm_head import last_hidden, output_logits, reads_hidden
from llamagym_pl.packing import packable, packed_states
from llamagym_pl.prefix_cache import common_prefix_length, hidden_on_prefix, reuses_prefix, run_prefix

READ_CHUNK = 256
"""Positions per output-layer call in :func:`row_logprobs`: (256, 32k) fp32 logits are 33 MB."""


class Rows(NamedTuple):
    """One forward's right-padded rows and what is read of them."""

    input_ids: Tensor  # (B, L)
    attention_mask: Tensor  # (B, L)
    rows: Tensor  # (N,) with cols: the positions whose logits are read
    cols: Tensor  # (N,)
    value_positions: Tensor | None = None  # (B, K) the columns whose values are read; None: all


class RowStates(NamedTuple):
    """The LM's last hidden states of several forwards' rows: ``table`` (S, H), and for each
    forward ``index`` (B, L), the table row that holds each position's state (any at padding)."""

    table: Tensor
    index: list[Tensor]

    def at(self, part: int, rows: Tensor, cols: Tensor) -> Tensor:
        """The states (N, H) of positions ``(rows, cols)`` of forward ``part``."""
        return self.table[self.index[part][rows, cols]]

    def hidden(self, part: int) -> Tensor:
        """All of forward ``part``'s states, (B, L, H)."""
        return self.table[self.index[part]]


def row_forward(
    policy: Any, input_ids: Tensor, attention_mask: Tensor, rows: Tensor, cols: Tensor
) -> tuple[Tensor, Tensor]:
    """Logits (N, V) at positions ``(rows, cols)`` of right-padded rows (B, L), and the values at
    every position (B, L). ``policy``: its ``lm``, ``value_head`` and ``training`` mode (a
    :class:`~llamagym_pl.policy.PolicyWithValueHead`, or the reference's
    :meth:`~llamagym_pl.kl.ReferencePolicy.as_policy`)."""
    logits, values = row_forwards(policy, [Rows(input_ids, attention_mask, rows, cols)])
    return logits, values[0]


def row_forwards(policy: Any, parts: Sequence[Rows]) -> tuple[Tensor, list[Tensor]]:
    """:func:`row_forward` over several forwards at once (a minibatch's length groups): the logits
    at every part's positions, concatenated in order, (sum N, V), and each part's values at its
    ``value_positions`` (B, K), or everywhere (B, L). The prefix all their rows share is encoded
    once for all of them, and the output layer runs once over all the positions read: the same
    numbers as one :func:`row_forward` per part."""
    states = row_states(policy, [(part.input_ids, part.attention_mask) for part in parts])
    if states is None:  # an LM whose logits we cannot reproduce from its hidden states
        logits, values = [], []
        for part in parts:
            out = policy.lm(
                input_ids=part.input_ids,
                attention_mask=part.attention_mask,
                use_cache=False,
                output_hidden_states=True,
            )
            logits.append(out.logits[part.rows, part.cols])  # (N, V)
            v = policy.value_head(out.hidden_states[-1])  # (B, L)
            values.append(v if part.value_positions is None else v.gather(1, part.value_positions))
        return torch.cat(logits), values
    read = torch.cat([states.at(k, part.rows, part.cols) for k, part in enumerate(parts)])  # (N, H)
    values = [
        policy.value_head(
            states.hidden(k)
            if part.value_positions is None
            else states.table[states.index[k].gather(1, part.value_positions)]
        )
        for k, part in enumerate(parts)
    ]
    return output_logits(policy.lm, read), values


def rows_hidden(policy: Any, parts: Sequence[tuple[Tensor, Tensor]]) -> list[Tensor] | None:
    """The LM's last hidden states (B, L, H) of each part's right-padded rows (:func:`row_states`)."""
    states = row_states(policy, parts)
    return None if states is None else [states.hidden(k) for k in range(len(parts))]


def row_states(policy: Any, parts: Sequence[tuple[Tensor, Tensor]]) -> RowStates | None:
    """The LM's last hidden states of each part's right-padded rows ``(input_ids, attention_mask)``,
    its output layer run at one position per row at most; None when its logits cannot be computed
    from them (:func:`~llamagym_pl.lm_head.last_hidden`). The prefix every row of every part
    shares runs once: packed with the rows' own tokens where the model allows
    (:func:`~llamagym_pl.packing.packed_states`), else as a forward whose KV cache every row
    continues."""
    lm = policy.lm
    if not reads_hidden(lm):
        return None
    # At most the shortest row's length minus one: every row keeps a token of its own to run.
    shortest = min(int(mask.sum(1).min()) for _, mask in parts)
    heads = torch.cat([ids[:, : shortest - 1] for ids, _ in parts])
    c = common_prefix_length(heads) if reuses_prefix(policy) else 0
    if c == 0:
        hidden = [last_hidden(lm, input_ids=ids, attention_mask=mask, use_cache=False) for ids, mask in parts]
        return None if any(h is None for h in hidden) else _stacked(None, hidden)
    if packable(lm, max(ids.shape[1] for ids, _ in parts)):
        packed = packed_states(lm, parts, c)
        if packed is not None:
            return RowStates(*packed)
    prefix_cache, prefix = run_prefix(lm, parts[0][0][:1, :c], 1)  # prefix: (1, c, H)
    rests = []
    for ids, mask in parts:
        b, length = ids.shape
        rest = hidden_on_prefix(
            lm,
            ids[:, c:],  # (B, L - c)
            mask,  # (B, L): the prefix's c columns are ones, as in the cache
            torch.arange(c, length, device=ids.device).expand(b, -1),
            prefix_cache,
        )  # (B, L - c, H)
        if rest is None:
            return None
        rests.append(rest)
    return _stacked(prefix[0], rests)


def _stacked(prefix: Tensor | None, parts: list[Tensor]) -> RowStates:
    """:class:`RowStates` of ``parts`` (B, L', H) each, the last L' columns of their rows, after
    an optional shared ``prefix`` (c, H) that fills their first c columns: one table, in order."""
    c = 0 if prefix is None else prefix.shape[0]
    index, start = [], c
    for hidden in parts:
        b, width, _ = hidden.shape
        own = start + torch.arange(b * width, device=hidden.device).view(b, width)
        index.append(torch.cat([torch.arange(c, device=hidden.device).expand(b, -1), own], 1))
        start += b * width
    shared = [] if prefix is None else [prefix]
    return RowStates(torch.cat([*shared, *(h.flatten(0, 1) for h in parts)]), index)


def row_logprobs(
    policy: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    rows: Tensor,
    cols: Tensor,
    tokens: Tensor,
    temperature: float,
    chunk: int = READ_CHUNK,
) -> tuple[Tensor, Tensor]:
    """:func:`row_forward`'s log-probs of ``tokens`` (N,) under ``softmax(logits / temperature)``
    at ``(rows, cols)`` (:func:`~llamagym_pl.ppo.logprobs_and_logsoftmax`, as the loss computes
    them), and its values (B, L), with the output layer run over at most ``chunk`` positions at a
    time: a no-grad pass over many rows never holds all their (N, V) logits."""
    states = row_states(policy, [(input_ids, attention_mask)])
    if states is None:  # an LM whose logits we cannot reproduce from its hidden states
        logits, values = row_forward(policy, input_ids, attention_mask, rows, cols)
        return ppo.logprobs_and_logsoftmax(tempered(logits, temperature), tokens)[0], values
    read = states.at(0, rows, cols)  # (N, H)
    logprobs = [
        ppo.logprobs_and_logsoftmax(tempered(output_logits(policy.lm, part), temperature), part_tokens)[0]
        for part, part_tokens in zip(read.split(chunk), tokens.split(chunk), strict=True)
    ]
    return torch.cat(logprobs) if logprobs else read.new_zeros(0), policy.value_head(states.hidden(0))


def tempered(logits: Tensor, temperature: float) -> Tensor:
    """``logits / temperature``; at temperature 1 the logits themselves (the same bits, no copy)."""
    return logits if temperature == 1 else logits / temperature
