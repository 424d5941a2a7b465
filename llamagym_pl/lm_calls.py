"""How to call a transformers LM whatever wraps it and whichever transformers version runs it:
the model inside a peft wrapper, and the names of its KV-cache and keep-last-logits arguments."""

from __future__ import annotations

import functools
import inspect

from torch import nn


@functools.cache
def _forward_parameters(lm_type: type) -> frozenset[str]:
    return frozenset(inspect.signature(lm_type.forward).parameters)


def base_model(lm: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (its LoRA layers included); ``lm`` itself
    otherwise: where its config, forward signature and output layer are."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def lm_call_names(lm: nn.Module) -> tuple[str, str | None]:
    """The names of the KV-cache and keep-last-logits arguments of this transformers version:
    ``cache`` and ``logits_to_keep`` now; ``past_key_values`` and ``num_logits_to_keep`` before."""
    params = _forward_parameters(type(base_model(lm)))
    keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    return ("cache" if "cache" in params else "past_key_values"), keep
