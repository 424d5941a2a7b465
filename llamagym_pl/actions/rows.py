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

from typing import Any

import torch
from torch import Tensor

from llamagym_pl.lm_head import last_hidden, output_logits, reads_hidden
from llamagym_pl.policy import lm_call_names
from llamagym_pl.prefix_cache import common_prefix_length, reuses_prefix, run_prefix


def row_forward(
    policy: Any, input_ids: Tensor, attention_mask: Tensor, rows: Tensor, cols: Tensor
) -> tuple[Tensor, Tensor]:
    """Logits (N, V) at positions ``(rows, cols)`` of right-padded rows (B, L), and the values at
    every position (B, L). ``policy``: its ``lm``, ``value_head`` and ``training`` mode (a
    :class:`~llamagym_pl.policy.PolicyWithValueHead`, or the reference's
    :meth:`~llamagym_pl.kl.ReferencePolicy.as_policy`)."""
    hidden = row_hidden(policy, input_ids, attention_mask)  # (B, L, H)
    if hidden is None:  # an LM whose logits we cannot reproduce from its hidden states
        out = policy.lm(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True
        )
        return out.logits[rows, cols], policy.value_head(out.hidden_states[-1])  # (N, V), (B, L)
    return output_logits(policy.lm, hidden[rows, cols]), policy.value_head(hidden)  # (N, V), (B, L)


def row_hidden(policy: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor | None:
    """The LM's last hidden states (B, L, H) of right-padded rows, its output layer run at one
    position per row; None when its logits cannot be computed from them
    (:func:`~llamagym_pl.lm_head.last_hidden`)."""
    lm = policy.lm
    if not reads_hidden(lm):
        return None
    b, length = input_ids.shape
    # At most the shortest row's length minus one: every row keeps a token of its own to run.
    shortest = int(attention_mask.sum(1).min())
    c = common_prefix_length(input_ids[:, : shortest - 1]) if reuses_prefix(policy) else 0
    if c == 0:
        return last_hidden(lm, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    cache, prefix = run_prefix(lm, input_ids[:1, :c], b)  # prefix: (1, c, H)
    cache_kw, _ = lm_call_names(lm)
    rest = last_hidden(
        lm,
        input_ids=input_ids[:, c:],  # (B, L - c)
        attention_mask=attention_mask,  # (B, L): the prefix's c columns are ones, as in the cache
        position_ids=torch.arange(c, length, device=input_ids.device).expand(b, -1),
        use_cache=True,
        **{cache_kw: cache},
    )  # (B, L - c, H)
    if rest is None:
        return None
    return torch.cat([prefix.expand(b, -1, -1), rest], 1)  # (B, L, H); the expand's gradient sums
