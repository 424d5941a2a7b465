"""Rows that share a prefix, in one forward: the prefix once, and the rows' own tokens packed
side by side.

A minibatch's rows (:mod:`llamagym_pl.actions.rows`) share their first ``c`` tokens (the system
prompt) and differ in length. :func:`packed_states` runs them as one ``(R, W)`` batch:

- the rows' own tokens (each row's rest after the prefix) laid end to end in packs of about
  :data:`PACK_TOKENS` tokens (:func:`pack_rows`: balanced, so padded to the widest they pad
  little), ``position_ids`` restarting at ``c`` for every row, so each token keeps its position;
- the prefix, once, which unlike a row may be cut anywhere: in rows of its own if it needs them,
  then in the packs' free slots (:func:`layout`: the width that pads least);
- at every layer the keys and values the layer computed for the prefix's slots are put in front
  of every row's own (:class:`SharedPrefixLayer`, a KV-cache layer that holds nothing: it only
  rearranges what the layer computed), so every row attends to ``c + W`` columns;
- a 4D attention mask ``(R, 1, W, c + W)`` lets a prefix token see the prefix up to itself, and a
  row's token the prefix and the earlier tokens of its own row: each token attends to exactly
  what it did in its own row, and in training the gradient reaches the prefix from every row that
  read it.

Each token's hidden state is then its row's, up to float rounding (other matmul shapes, as
between batch sizes). One forward instead of two (the prefix, then the packs on its KV cache):
on a small model the per-call work of a forward and its backward is most of their cost (README
"Performance"). A row is never split; a pack's attention is ``W x (c + W)``, so bounded packs
keep its cost and the mask small (one pack per minibatch was slower than padded rows).

Transformers takes a 4D mask and a cache as given, so what a model does with them is checked once
per model: the prefix and one pack's rows also run the plain way (the prefix alone, each row on
its KV cache), and a model whose states differ (an attention that ignores the mask or the cache,
a layer of its own) runs its rows as padded batches from then on.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicLayer

from llamagym_pl.lm_calls import base_model, lm_call_names
from llamagym_pl.lm_head import last_hidden
from llamagym_pl.prefix_cache import hidden_on_prefix, new_cache, run_prefix, supports_prefix_cache

log = logging.getLogger(__name__)

PACK_TOKENS = 128
"""A pack's capacity in tokens (or the longest row's, if longer): its attention is (W, c + W) per
head, its mask as large."""

_CHECKED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
"""Per model, whether its packed forward gave its rows' hidden states (checked on first use)."""


def packable(lm: nn.Module, length: int) -> bool:
    """Whether ``lm`` may run packed rows of at most ``length`` tokens: a model whose attention
    takes a custom mask (eager, sdpa) and that continues a prefix cache exactly
    (:func:`~llamagym_pl.prefix_cache.supports_prefix_cache`), and that has not failed the check."""
    return _CHECKED.get(lm, True) and _mask_kind(lm) is not None and supports_prefix_cache(lm, length)


def _mask_kind(lm: nn.Module) -> str | None:
    config = base_model(lm).config.get_text_config(decoder=True)
    kind = getattr(config, "_attn_implementation", None)
    return kind if kind in ("sdpa", "eager") else None


class SharedPrefixLayer(DynamicLayer):
    """A KV-cache layer for :func:`packed_states`' batch: the keys (and values) a layer computed at
    the prefix's slots ``(rows, cols)`` (c,) are put in front of every row's own. It keeps nothing
    between calls."""

    def __init__(self, rows: Tensor, cols: Tensor) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._with_prefix(key_states), self._with_prefix(value_states)

    def _with_prefix(self, states: Tensor) -> Tensor:
        prefix = states[self.rows, :, self.cols].transpose(0, 1)  # (R, heads, W, dim) -> (heads, c, dim)
        return torch.cat([prefix.expand(states.shape[0], -1, -1, -1), states], 2)  # (R, heads, c + W, dim)


def packed_states(
    lm: nn.Module, parts: Sequence[tuple[Tensor, Tensor]], c: int
) -> tuple[Tensor, list[Tensor]] | None:
    """The last hidden states of each part's right-padded rows ``(input_ids, attention_mask)``
    (B, L), which all share their first ``c`` tokens, from one forward: a table (S, H) of states,
    and for each part the row of the table that holds each position's state (B, L) (any row at
    padding). None when the LM's logits cannot be read from hidden states, or it failed the check.
    """
    rests = [mask[:, c:].bool() for _, mask in parts]  # (B, L - c): each row's own tokens
    ids = torch.cat([part_ids[:, c:][m] for (part_ids, _), m in zip(parts, rests, strict=True)])  # (T,)
    sizes = torch.cat([m.sum(1) for m in rests]).tolist()  # tokens of each row, all parts' rows
    starts = [0, *itertools.accumulate(sizes)][:-1]  # where each row's tokens start in ``ids``
    # Rows in an order of their own (longest first, then by tokens): the same rows make the same
    # packs in whatever order they come, so a row is computed alike in the preparation pass and
    # in any minibatch holding the same rows (the PPO ratio before an update is exactly 1).
    order = sorted(
        range(len(sizes)), key=lambda r: (-sizes[r], ids[starts[r] : starts[r] + sizes[r]].tolist())
    )
    packs, width, prefix_rows = layout([sizes[r] for r in order], c, max(PACK_TOKENS, max(sizes)))
    # Each slot (flat, row after row) takes its token from ``source`` (-1: the prefix or padding),
    # and is of row ``row``. The prefix fills its rows, then the packs' free slots.
    source = torch.full(((prefix_rows + len(packs)) * width,), -1, dtype=torch.long)
    row = torch.full_like(source, -1)
    prefix_slots = [torch.arange(prefix_rows * width)]
    for p, pack in enumerate(packs, prefix_rows):
        at = p * width
        for i in pack:
            r = order[i]
            source[at : at + sizes[r]] = torch.arange(starts[r], starts[r] + sizes[r])
            row[at : at + sizes[r]] = r
            at += sizes[r]
        prefix_slots.append(torch.arange(at, (p + 1) * width))
    device = ids.device
    slots = torch.cat(prefix_slots)[:c].to(device)  # (c,) the prefix's slots, in order
    source, row = source.to(device), row.to(device)
    real = source >= 0
    pos_of = torch.cat([(m.long().cumsum(1) - 1)[m] for m in rests]) + c  # (T,) each token's position
    packed_ids = torch.where(real, ids[source.clamp(min=0)], ids[0])  # padding: any token, masked
    packed_pos = torch.where(real, pos_of[source.clamp(min=0)], c)
    packed_ids[slots] = parts[0][0][0, :c]
    packed_pos[slots] = torch.arange(c, device=device)
    shape = (prefix_rows + len(packs), width)
    packed_ids, packed_pos, row = packed_ids.view(shape), packed_pos.view(shape), row.view(shape)
    hidden = _packed_forward(lm, packed_ids, packed_pos, row, slots)  # (R, W, H)
    if hidden is None:
        return None
    if lm not in _CHECKED:  # first use: the prefix alone and a pack's rows alone must agree
        _CHECKED[lm] = _agrees(lm, hidden, packed_ids, packed_pos, row, slots)
        if not _CHECKED[lm]:
            log.warning(
                "packing rows does not reproduce this %s model's hidden states: running its rows as "
                "padded batches instead, which costs more time",
                getattr(base_model(lm).config, "model_type", type(lm).__name__),
            )
            return None
    slot = torch.empty_like(pos_of)
    slot[source[real]] = torch.nonzero(real).flatten()  # each row token's table row
    index, start = [], 0
    for m in rests:
        n = int(m.sum())
        rest = torch.zeros(m.shape, dtype=torch.long, device=device)
        rest[m] = slot[start : start + n]
        index.append(torch.cat([slots.expand(m.shape[0], -1), rest], 1))
        start += n
    return hidden.flatten(0, 1), index


def layout(sizes: Sequence[int], c: int, capacity: int) -> tuple[list[list[int]], int, int]:
    """Where :func:`packed_states` puts rows of ``sizes`` tokens and a ``c``-token prefix:
    ``(packs, width, prefix_rows)``. The rows are packed (:func:`pack_rows`) into ``packs`` of
    ``width`` slots; the prefix, which unlike a row may be cut anywhere, fills ``prefix_rows``
    rows of its own (as few as it needs), then the packs' free slots. Of the widths that give the
    fewest rows of at most ``capacity`` tokens (or up to two rows more), the one with the fewest
    slots."""
    total, low = sum(sizes) + c, max(sizes)
    fewest = -(-total // capacity)
    best: tuple[int, list[list[int]], int, int] | None = None
    for rows in range(fewest, fewest + 3):
        packs = pack_rows(sizes, max(low, -(-total // rows)))
        # Balanced packs may hold a little more than they were cut for: the widest sets the width.
        width = max(max(sum(sizes[i] for i in pack) for pack in packs), -(-total // rows))
        free = len(packs) * width - sum(sizes)
        prefix_rows = -(-max(c - free, 0) // width)
        slots = (prefix_rows + len(packs)) * width
        if best is None or slots < best[0]:
            best = (slots, packs, width, prefix_rows)
    assert best is not None
    return best[1], best[2], best[3]


def pack_rows(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of ``sizes`` tokens into as many packs as first fit (longest first) needs for packs of
    ``capacity`` tokens, then balanced: longest row first, each into the pack that holds the
    fewest tokens, so that the packs, padded to the widest, pad little. The indices of each
    pack's rows, in their original order."""
    room: list[int] = []
    for size in sorted(sizes, reverse=True):  # first fit: how many packs
        k = next((k for k, free in enumerate(room) if free >= size), None)
        if k is None:
            room.append(capacity - size)
        else:
            room[k] -= size
    packs: list[list[int]] = [[] for _ in room]
    held = [0] * len(room)
    for r in sorted(range(len(sizes)), key=lambda r: -sizes[r]):
        k = min(range(len(packs)), key=lambda k: held[k])
        packs[k].append(r)
        held[k] += sizes[r]
    return [sorted(pack) for pack in packs]


def _packed_forward(lm: nn.Module, ids: Tensor, pos: Tensor, row: Tensor, slots: Tensor) -> Tensor | None:
    """Hidden states (R, W, H) of the batch (R, W) whose prefix is at flat ``slots`` (c,). ``row``
    is -1 on the prefix and at padding; a padding slot sees the whole prefix (a query that sees
    nothing would be NaN)."""
    c, width = len(slots), ids.shape[1]
    # The prefix columns: a prefix token sees the prefix up to itself, a row's token all of it.
    prefix = torch.arange(c, device=ids.device) <= pos[:, :, None]  # (R, W, c)
    own = (row[:, :, None] == row[:, None, :]) & (pos[:, None, :] <= pos[:, :, None]) & (row[:, None, :] >= 0)
    allowed = torch.cat([prefix, own], 2)[:, None]  # (R, 1, W, c + W)
    if _mask_kind(lm) == "eager":  # eager adds the mask to the scores; sdpa takes a boolean one
        dtype = next(lm.parameters()).dtype
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=ids.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    cache = new_cache(lm)
    cache.layers = [SharedPrefixLayer(slots // width, slots % width) for _ in cache.layers]
    return last_hidden(
        lm,
        input_ids=ids,
        attention_mask=allowed,
        position_ids=pos,
        use_cache=True,
        **{lm_call_names(lm)[0]: cache},
    )


@torch.no_grad()
def _agrees(lm: nn.Module, hidden: Tensor, ids: Tensor, pos: Tensor, row: Tensor, slots: Tensor) -> bool:
    """Whether the packed forward's states (R, W, H) are those of the prefix (at flat ``slots``) run
    alone, and of the rows of one pack run alone on the prefix's KV cache."""
    c = len(slots)
    cache, prefix = run_prefix(lm, ids.flatten()[slots][None], 1)  # (1, c, H)
    if not _close(hidden.flatten(0, 1)[slots], prefix[0]):
        return False
    p = int((row >= 0).any(1).nonzero()[0])  # the first pack with rows
    for r in row[p][row[p] >= 0].unique():
        sel = row[p] == r
        alone = hidden_on_prefix(
            lm,
            ids[p][sel][None],
            torch.ones(1, c + int(sel.sum()), dtype=torch.long, device=ids.device),
            pos[p][sel][None],
            cache,
        )
        if alone is None or not _close(hidden[p][sel], alone[0]):
            return False
    return True


def _close(packed: Tensor, alone: Tensor) -> bool:
    # Rounding differs between shapes; a mask or cache ignored mixes rows: far larger than this.
    scale = float(alone.abs().max().clamp(min=1.0))
    tol = (1e-4 if alone.dtype == torch.float32 else 5e-2) * scale
    return torch.allclose(packed.float(), alone.float(), rtol=0, atol=tol)
