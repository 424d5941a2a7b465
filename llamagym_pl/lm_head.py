"""The LM's output layer, applied only where its logits are read.

A causal LM's forward ends with its output layer at every position: (B, L, V) logits. With a
32k vocabulary that is 32,000 floats per token, the largest activation of a small model (and in
training kept for backward), and for a 512-wide model as much compute as its 8 layers together.
PPO reads a generated reply's log-probs at the reply's tokens only, and a value needs the hidden
states alone. So :func:`last_hidden` runs the LM with ``logits_to_keep=1`` and returns its last
hidden states, and :func:`output_logits` applies the LM's own output layer to the few positions
read.

Exactness: some architectures transform the output layer's result: Gemma 2/3 soft-cap it
(``final_logit_softcapping``), Cohere scales it by ``logit_scale``, Granite divides it by
``logits_scaling``, Falcon-H1 multiplies it by ``lm_head_multiplier``. :func:`output_logits`
applies these, as their ``modeling_*.py`` do. Every :func:`last_hidden` call also checks, for
free, that it reproduces the LM's own logits at the last position bit for bit (the same layer on
the same tensor); an LM that transforms its logits in a way we do not know fails the check once,
with a warning naming its model type, and from then on its callers compute the full logits.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from llamagym_pl.lm_calls import base_model, lm_call_names

log = logging.getLogger(__name__)


def _cohere(model: nn.Module, logits: Tensor) -> Tensor:
    return logits * model.logit_scale


def _granite(model: nn.Module, logits: Tensor) -> Tensor:
    return logits / model.config.get_text_config().logits_scaling


def _falcon_h1(model: nn.Module, logits: Tensor) -> Tensor:
    return logits * model.model.lm_head_multiplier


# What these model types do to the output layer's result, before any soft-capping (transformers 5).
SCALINGS: dict[str, Callable[[nn.Module, Tensor], Tensor]] = {
    "cohere": _cohere,
    "cohere2": _cohere,
    "granite": _granite,
    "granitemoe": _granite,
    "granitemoeshared": _granite,
    "granitemoehybrid": _granite,
    "falcon_h1": _falcon_h1,
}

# LMs whose logits output_logits did not reproduce: their callers need the full logits.
_INEXACT: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def output_logits(lm: nn.Module, hidden: Tensor) -> Tensor:
    """``lm``'s logits from its last hidden states, as its own forward computes them: the output
    layer, then the known scaling or soft-capping of its architecture. ``(..., H) -> (..., V)``."""
    model = base_model(lm)
    logits = model.get_output_embeddings()(hidden)
    scaling = SCALINGS.get(getattr(model.config, "model_type", ""))
    if scaling is not None:
        logits = scaling(model, logits)
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap is not None:
        # Gemma 2/3's three steps, in their order (divide, tanh, multiply): the same bits.
        logits = (logits / cap).tanh() * cap
    return logits


def reads_hidden(lm: nn.Module) -> bool:
    """Whether :func:`last_hidden` serves ``lm``: it keeps only its last logits when asked, and
    :func:`output_logits` has not failed to reproduce them."""
    return lm_call_names(lm)[1] is not None and lm not in _INEXACT


def last_hidden(lm: nn.Module, **inputs: Any) -> Tensor | None:
    """``lm``'s last hidden states on ``inputs``, (B, L, H), its output layer run at the last
    position only; None when :func:`output_logits` does not give that position's logits (or
    ``lm`` cannot keep only the last ones): the caller then needs the LM's full logits."""
    if not reads_hidden(lm):
        return None
    keep = lm_call_names(lm)[1]
    out = lm(**inputs, output_hidden_states=True, **{keep: 1})
    hidden = out.hidden_states[-1]  # (B, L, H), as the output layer receives it
    with torch.no_grad():  # a comparison, no graph: the same kernels, the same bits
        ours = output_logits(lm, hidden[:, -1:])  # (B, 1, V): the slice the LM itself took
    if not _same(ours, out.logits):
        _INEXACT.add(lm)
        log.warning(
            "the logits of this %s model are not its output layer's (plus the scalings llamagym_pl "
            "knows): computing its full logits at every position instead, which costs more memory "
            "and time",
            getattr(getattr(base_model(lm), "config", None), "model_type", type(lm).__name__),
        )
        return None
    return hidden


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal shape, dtype and bits (NaN equal to NaN: a padded position may hold one)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())
