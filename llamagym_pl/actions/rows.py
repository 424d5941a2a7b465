"""The forward pass over episode rows (generate mode): logits only where read, the shared prefix once.

Episode rows (:mod:`llamagym_pl.buffer`) are right padded, so a token's position is its column,
and every row of a rollout starts with the same system prompt. :func:`row_forward` gives the
logits at chosen positions (those that predict the reply tokens) and the values at every
position, with

- the LM's output layer at those N positions only, not at all B x L
  (:mod:`llamagym_pl.lm_head`): the values need the hidden states alone;
- the prefix all rows share encoded once, (1, c), and each row's rest on its KV cache
  (:mod:`llamagym_pl.prefix_cache`); the prefix's hidden states are the same in every row
  (attention is causal), so they are broadcast to fill the rows' first c positions. Whole rows
  when training with gradient checkpointing, which has no cache. Right padded, a row is laid out
  ``[prefix | rest | padding]``: no padding between its tokens (unlike generation's
  ``[prefix | padding | rest]``), so sliding-window layers see the same tokens as in the whole row.

Both give the log-probs, values and gradients of one forward of the whole rows with full logits,
up to float rounding; that path remains for an LM whose logits :mod:`llamagym_pl.lm_head` cannot
reproduce.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from llamagym_pl import ppo
from llamagym_pl.lm_head import last_hidden, output_logits, reads_hidden
from llamagym_pl.packing import packable, packed_rests
from llamagym_pl.prefix_cache import common_prefix_length, hidden_on_prefix, reuses_prefix, run_prefix

READ_CHUNK = 256
"""Positions per output-layer call in :func:`row_logprobs`: (256, 32k) fp32 logits are 33 MB."""

Rows = tuple[Tensor, Tensor, Tensor, Tensor]
"""One forward's ``(input_ids, attention_mask, rows, cols)``: right-padded rows (B, L) and the
positions (N,) whose logits are read."""


def row_forward(
    policy: Any, input_ids: Tensor, attention_mask: Tensor, rows: Tensor, cols: Tensor
) -> tuple[Tensor, Tensor]:
    """Logits (N, V) at positions ``(rows, cols)`` of right-padded rows (B, L), and the values at
    every position (B, L). ``policy``: its ``lm``, ``value_head`` and ``training`` mode (a
    :class:`~llamagym_pl.policy.PolicyWithValueHead`, or the reference's
    :meth:`~llamagym_pl.kl.ReferencePolicy.as_policy`)."""
    logits, values = row_forwards(policy, [(input_ids, attention_mask, rows, cols)])
    return logits, values[0]


def row_forwards(policy: Any, parts: Sequence[Rows]) -> tuple[Tensor, list[Tensor]]:
    """:func:`row_forward` over several forwards at once (a minibatch's length groups): the logits
    at every part's positions, concatenated in order, (sum N, V), and each part's values (B, L).
    The prefix all their rows share is encoded once for all of them, and the output layer runs
    once over all the positions read: the same numbers as one :func:`row_forward` per part."""
    hidden = rows_hidden(policy, [(ids, mask) for ids, mask, _, _ in parts])  # each (B, L, H)
    if hidden is None:  # an LM whose logits we cannot reproduce from its hidden states
        logits, values = [], []
        for ids, mask, rows, cols in parts:
            out = policy.lm(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
            logits.append(out.logits[rows, cols])  # (N, V)
            values.append(policy.value_head(out.hidden_states[-1]))  # (B, L)
        return torch.cat(logits), values
    read = torch.cat([h[rows, cols] for h, (_, _, rows, cols) in zip(hidden, parts, strict=True)])  # (N, H)
    return output_logits(policy.lm, read), [policy.value_head(h) for h in hidden]


def row_hidden(policy: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor | None:
    """The LM's last hidden states (B, L, H) of right-padded rows (:func:`rows_hidden` of one)."""
    hidden = rows_hidden(policy, [(input_ids, attention_mask)])
    return None if hidden is None else hidden[0]


def rows_hidden(policy: Any, parts: Sequence[tuple[Tensor, Tensor]]) -> list[Tensor] | None:
    """The LM's last hidden states (B, L, H) of each part's right-padded rows ``(input_ids,
    attention_mask)``, its output layer run at one position per row; None when its logits cannot
    be computed from them (:func:`~llamagym_pl.lm_head.last_hidden`). The prefix every row of
    every part shares runs once, its KV cache repeated for each part's rows."""
    lm = policy.lm
    if not reads_hidden(lm):
        return None
    # At most the shortest row's length minus one: every row keeps a token of its own to run.
    shortest = min(int(mask.sum(1).min()) for _, mask in parts)
    heads = torch.cat([ids[:, : shortest - 1] for ids, _ in parts])
    c = common_prefix_length(heads) if reuses_prefix(policy) else 0
    if c == 0:
        hidden = [last_hidden(lm, input_ids=ids, attention_mask=mask, use_cache=False) for ids, mask in parts]
        return None if any(h is None for h in hidden) else hidden
    prefix_cache, prefix = run_prefix(lm, parts[0][0][:1, :c], 1)  # prefix: (1, c, H)
    if packable(lm, max(ids.shape[1] for ids, _ in parts)):
        rests = packed_rests(lm, parts, c, prefix_cache)  # each (B, L - c, H), zeros at padding
        if rests is not None:
            return [torch.cat([prefix.expand(r.shape[0], -1, -1), r], 1) for r in rests]
    out = []
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
        out.append(torch.cat([prefix.expand(b, -1, -1), rest], 1))  # (B, L, H); the expand's gradient sums
    return out


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
    at ``(rows, cols)``, and its values (B, L), with the output layer run over at most ``chunk``
    positions at a time: a no-grad pass over many rows never holds all their (N, V) logits."""
    hidden = row_hidden(policy, input_ids, attention_mask)  # (B, L, H)
    if hidden is None:  # an LM whose logits we cannot reproduce from its hidden states
        logits, values = row_forward(policy, input_ids, attention_mask, rows, cols)
        return ppo.token_logprobs(logits / temperature, tokens), values
    read = hidden[rows, cols]  # (N, H)
    logprobs = [
        ppo.token_logprobs(output_logits(policy.lm, part) / temperature, part_tokens)
        for part, part_tokens in zip(read.split(chunk), tokens.split(chunk), strict=True)
    ]
    return torch.cat(logprobs) if logprobs else read.new_zeros(0), policy.value_head(hidden)
