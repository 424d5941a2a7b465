"""Rows that share an encoded prefix, packed side by side: little padding, one forward.

A minibatch's rows (:mod:`llamagym_pl.actions.rows`) share their first ``c`` tokens (the system
prompt, encoded once) and differ in length. Run as padded batches they cost a forward per
length group (:func:`~llamagym_pl.minibatches.length_groups`) plus the padding. (On the CPU,
with a 2-layer model, packing measured no faster in CPU time: README "Packed rows"; fewer,
larger calls are for devices with a per-kernel cost.) Packed, the rows' own tokens (each
row's rest after the prefix) are laid end to end in ``P`` packs of about :data:`PACK_TOKENS`
tokens (:func:`pack_rows`: balanced, so padded to the widest they pad little), run as one
``(P, W)`` batch on the prefix's KV cache, with

- ``position_ids`` restarting at ``c`` for every row, so each token keeps its position;
- a 4D attention mask ``(P, 1, W, c + W)`` that lets a token see the prefix and the earlier
  tokens of its own row only, so each token attends to exactly what it did in its own row.

Each token's hidden state is then its row's, up to float rounding (other matmul shapes, as
between batch sizes). A row is never split; attention is ``W x (c + W)`` per pack, so bounded
packs keep its cost and the mask small (one pack per minibatch was slower than padded rows).

Transformers takes a 4D mask as given, so what a model does with it is checked once per model:
the first pack's rows also run alone, and a model whose packed hidden states differ (an
attention that ignores the mask, a layer of its own) runs padded batches from then on.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from llamagym_pl.policy import base_model
from llamagym_pl.prefix_cache import hidden_on_prefix, supports_prefix_cache

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


def packed_rests(
    lm: nn.Module, parts: Sequence[tuple[Tensor, Tensor]], c: int, prefix_cache: Any
) -> list[Tensor] | None:
    """Each part's rows' hidden states past the prefix, (B, L - c, H), zeros at padding, from one
    forward of packed rows on ``prefix_cache`` (one row's cache of the ``c`` shared tokens); None
    when the LM's logits cannot be read from hidden states, or it failed the packing check."""
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
    packs = [
        [order[i] for i in pack]
        for pack in pack_rows([sizes[r] for r in order], max(PACK_TOKENS, max(sizes)))
    ]
    width = max(sum(sizes[r] for r in pack) for pack in packs)
    # Where each pack's slots take their token from (-1: padding), and which row it is of.
    source = torch.full((len(packs), width), -1, dtype=torch.long)
    row = torch.full((len(packs), width), -1, dtype=torch.long)
    for p, pack in enumerate(packs):
        at = 0
        for r in pack:
            source[p, at : at + sizes[r]] = torch.arange(starts[r], starts[r] + sizes[r])
            row[p, at : at + sizes[r]] = r
            at += sizes[r]
    source, row = source.to(ids.device), row.to(ids.device)
    real = source >= 0
    pos_of = torch.cat([(m.long().cumsum(1) - 1)[m] for m in rests]) + c  # (T,) each token's position
    packed_ids = torch.where(real, ids[source.clamp(min=0)], ids[0])  # padding: any token, masked
    packed_pos = torch.where(real, pos_of[source.clamp(min=0)], c)
    hidden = _packed_forward(lm, packed_ids, packed_pos, row, c, prefix_cache)  # (P, W, H)
    if hidden is None:
        return None
    if lm not in _CHECKED:  # first use: the same rows run alone must give the same states
        _CHECKED[lm] = _agrees(lm, hidden[0], packed_ids[0], packed_pos[0], row[0], c, prefix_cache)
        if not _CHECKED[lm]:
            log.warning(
                "packing rows does not reproduce this %s model's hidden states: running its rows as "
                "padded batches instead, which costs more time",
                getattr(base_model(lm).config, "model_type", type(lm).__name__),
            )
            return None
    slot = torch.empty_like(pos_of)
    slot[source[real]] = torch.nonzero(real.flatten()).flatten()  # each token's slot in (P * W)
    flat = hidden.reshape(-1, hidden.shape[-1])[slot]  # (T, H): all rows' tokens in order
    out, start = [], 0
    for m in rests:
        n = int(m.sum())
        rest = flat.new_zeros(*m.shape, flat.shape[-1])
        out.append(rest.masked_scatter(m[..., None], flat[start : start + n]))
        start += n
    return out


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


def _packed_forward(
    lm: nn.Module, ids: Tensor, pos: Tensor, row: Tensor, c: int, prefix_cache: Any
) -> Tensor | None:
    """Hidden states (P, W, H) of packs (P, W) on one row's prefix cache; ``row`` -1 at padding,
    whose slots see the prefix only (a query that sees nothing would be NaN)."""
    p, w = ids.shape
    own = (row[:, :, None] == row[:, None, :]) & (pos[:, None, :] <= pos[:, :, None]) & (row[:, None, :] >= 0)
    allowed = torch.cat([own.new_ones(p, w, c), own], 2)[:, None]  # (P, 1, W, c + W)
    if _mask_kind(lm) == "eager":  # eager adds the mask to the scores; sdpa takes a boolean one
        dtype = next(lm.parameters()).dtype
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=ids.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return hidden_on_prefix(lm, ids, allowed, pos, prefix_cache)


@torch.no_grad()
def _agrees(
    lm: nn.Module, packed: Tensor, ids: Tensor, pos: Tensor, row: Tensor, c: int, prefix_cache: Any
) -> bool:
    """Whether each row of one pack (W,) has the hidden states of the row run alone on the prefix."""
    for r in row[row >= 0].unique():
        sel = row == r
        alone = hidden_on_prefix(
            lm,
            ids[sel][None],
            torch.ones(1, c + int(sel.sum()), dtype=torch.long, device=ids.device),
            pos[sel][None],
            prefix_cache,
        )
        if alone is None:
            return False
        # Rounding differs between shapes; a mask ignored mixes rows: far larger than this.
        scale = float(alone.abs().max().clamp(min=1.0))
        tol = (1e-4 if alone.dtype == torch.float32 else 5e-2) * scale
        if not torch.allclose(packed[sel].float(), alone[0].float(), rtol=0, atol=tol):
            return False
    return True
