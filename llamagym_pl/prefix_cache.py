"""The prompt prefix a batch shares (typically the system prompt), encoded once.

Every prompt of a rollout step usually starts with the same system prompt. A left-padded batch
runs it once per row; instead it runs once, as one ``(1, c)`` forward, and its KV cache rows are
repeated for the batch. Score mode then scores the rest of each prompt on that cache
(:mod:`llamagym_pl.actions.scoring`); generate mode hands it to Hugging Face ``generate``
(:func:`llamagym_pl.sampling.generate_from_settings`), which continues from it:

- given a cache, ``generate`` runs only the columns past its length (``GenerationMixin._prefill``);
- it computes position ids from the attention mask (cumsum - 1), and the causal mask from the
  cache length and the 2D mask, so padding may sit anywhere.

So the batch is laid out ``[prefix | padding | rest]`` (:func:`prefix_first`), the mask 1 on the
prefix, 0 on the padding, 1 on each row's rest: every real token keeps its position and attends
to the same tokens as in the left-padded batch, and the replies are the same tokens. The logits
agree up to float rounding (other matmul shapes), as they do between batch sizes anyway.
Architectures where this does not hold fall back to the plain call (:func:`supports_prefix_cache`).

The forwards that score actions with grad (both styles' preparation and training passes) run the
prefix with :func:`run_prefix` instead: ``index_select`` repeats its cache, so in training its
gradient sums over the rows, as if each row had run the prefix. Gradient checkpointing drops the
KV cache in training (transformers re-runs each layer in backward without it), so there the
sequences are encoded whole (:func:`reuses_prefix`).
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache, GenerationMixin
from transformers.cache_utils import get_layer_types_and_kwargs

from llamagym_pl.lm_calls import base_model, lm_call_names
from llamagym_pl.lm_head import last_hidden

WINDOWED_LAYERS = frozenset({"sliding_attention", "chunked_attention"})
"""Layers that see a window of cache *columns*: with the padding moved to the middle a window would
hold other tokens, so they are exact only when the window covers the whole sequence."""

EXACT_ATTENTION = frozenset({"eager", "sdpa"})
"""Attention kernels whose masked (mid-sequence) padding is tested exact; others fall back."""


def common_prefix_length(heads: Tensor) -> int:
    """How many first columns all N >= 2 rows of ``heads`` (N, k) share; 0 for a single row."""
    if heads.shape[0] < 2 or heads.shape[1] == 0:
        return 0
    return int((heads == heads[:1]).all(0).long().cumprod(0).sum())


def shared_prefix_length(ids: Tensor, mask: Tensor) -> int:
    """How many first tokens all N >= 2 left-padded prompts share (typically the system prompt),
    at most the shortest prompt's length minus one: every prompt keeps a token of its own, where
    its last logits and value are read. 0 for a single prompt."""
    lengths = mask.sum(1)  # (N,)
    k = max(int(lengths.min()) - 1, 0)
    cols = (ids.shape[1] - lengths)[:, None] + torch.arange(k, device=ids.device)  # (N, k)
    return common_prefix_length(ids.gather(1, cols))  # the first k real tokens of each prompt


def prefix_first(ids: Tensor, mask: Tensor, shared: int) -> tuple[Tensor, Tensor]:
    """Left-padded ``(N, P)`` prompts that share their first ``shared`` tokens, laid out
    ``[prefix | padding | rest]``: the same width, each row's last token still in the last column.

    Left padded, each prompt's rest is its last ``length - shared`` columns and its padding the
    first ``P - length``: the rest is ``ids[:, shared:]`` where ``mask[:, :P - shared]`` is 1, and
    the padding keeps the pad ids of ``ids[:, :P - shared]``.
    """
    n, p = ids.shape
    first = p - int(mask[0].sum())  # where row 0's prompt starts
    prefix = ids[:1, first : first + shared].expand(n, shared)  # (N, c)
    rest_mask = mask[:, : p - shared]  # (N, P - c)
    rest = torch.where(rest_mask.bool(), ids[:, shared:], ids[:, : p - shared])  # (N, P - c)
    return torch.cat([prefix, rest], 1), torch.cat([mask.new_ones(n, shared), rest_mask], 1)


def new_cache(lm: nn.Module) -> DynamicCache:
    """An empty KV cache built from the model config, as ``generate`` builds its own (sliding
    layers included)."""
    return DynamicCache(config=base_model(lm).config)


def run_prefix(lm: nn.Module, prefix: Tensor, n: int) -> tuple[DynamicCache, Tensor]:
    """Run ``prefix`` ``(1, c)`` once, at positions ``0 .. c - 1``: its KV cache repeated for ``n``
    rows, and its last hidden states (1, c, H), the same in every row (attention is causal). With
    grad when grad is enabled: the repeated cache's gradient sums over the rows."""
    cache_kw, keep_kw = lm_call_names(lm)
    cache = new_cache(lm)
    out = lm(
        input_ids=prefix,
        attention_mask=torch.ones_like(prefix),
        position_ids=torch.arange(prefix.shape[1], device=prefix.device)[None],
        use_cache=True,
        output_hidden_states=True,
        **{cache_kw: cache, **({keep_kw: 1} if keep_kw else {})},
    )
    cache.reorder_cache(torch.zeros(n, dtype=torch.long, device=prefix.device))  # (1, ...) -> (n, ...)
    return cache, out.hidden_states[-1]


def repeat_cache(cache: DynamicCache, n: int) -> DynamicCache:
    """A new cache whose ``n`` rows are each ``cache``'s one row (a prefix from :func:`run_prefix`
    with ``n=1``); ``cache`` stays as it is, so one encoded prefix serves several forwards. The
    rows are expanded views (the next forward's concatenation copies them), and in training their
    gradient sums into the one row, as :func:`run_prefix`'s repeated rows do."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in out.layers:
        if layer.is_initialized:
            layer.keys = layer.keys.expand(n, *layer.keys.shape[1:])
            layer.values = layer.values.expand(n, *layer.values.shape[1:])
    return out


def hidden_on_prefix(
    lm: nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, prefix_cache: DynamicCache
) -> Tensor | None:
    """The last hidden states (B, T, H) of ``input_ids`` (B, T) run on ``prefix_cache`` (one row's
    cache, :func:`run_prefix` with ``n=1``) repeated for their B rows; None when the LM's logits
    cannot be read from its hidden states (:func:`~llamagym_pl.lm_head.last_hidden`)."""
    cache_kw, _ = lm_call_names(lm)
    return last_hidden(
        lm,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        **{cache_kw: repeat_cache(prefix_cache, input_ids.shape[0])},
    )


@torch.no_grad()
def encode_prefix(lm: nn.Module, prefix: Tensor, n: int) -> DynamicCache:
    """The KV cache of ``prefix`` ``(1, c)``, run once and repeated for ``n`` rows, for
    ``generate`` to continue on the cache it would have made (:func:`new_cache`)."""
    return run_prefix(lm, prefix, n)[0]


class PrefixMemo:
    """The KV cache of a prompt prefix, kept from one ``generate`` call to the next while the weights
    stay as they are: the imperative loop replies to one prompt per call, every prompt starting with
    the same system prompt, and the weights change only at its PPO updates.

    It holds the first tokens the prompts seen since it was filled share; the first time, those a
    prompt shares with the one before it. A prompt sharing fewer re-encodes that shorter prefix.
    It is dropped by :meth:`clear` (after an optimizer step), and never served once any parameter
    was changed in place (its version counter moved), replaced, or the LM switched mode.
    """

    def __init__(self) -> None:
        self.ids: list[int] = []  # the prefix cached
        self.cache: DynamicCache | None = None
        self.weights: tuple | None = None  # what the cache was computed with
        self.last: list[int] = []  # the previous prompt: where the next one's shared prefix ends

    def clear(self) -> None:
        self.ids, self.cache, self.weights = [], None, None

    def cache_for(self, lm: nn.Module, prompt: list[int]) -> tuple[DynamicCache, int] | None:
        """A KV cache of ``prompt``'s first c tokens (0 < c < its length) for one row, the memo's own
        left intact, and c; None when no prefix is known to be shared."""
        weights = _weights_key(lm)
        if weights != self.weights:
            self.clear()
        known, self.last = (self.ids or self.last), prompt
        c = _shared(known, prompt[:-1])  # the prompt keeps a token of its own
        if c == 0:
            return None
        if c != len(self.ids):
            device = next(lm.parameters()).device
            self.cache = encode_prefix(lm, torch.tensor([prompt[:c]], device=device), 1)
            self.ids, self.weights = prompt[:c], weights
        return repeat_cache(self.cache, 1), c


def _shared(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _weights_key(lm: nn.Module) -> tuple:
    """Changes whenever a parameter of ``lm`` is modified in place (an optimizer step, a load) or
    replaced, or ``lm`` changes mode."""
    return lm.training, tuple((p.data_ptr(), p._version) for p in lm.parameters())


def checkpointing(lm: nn.Module) -> bool:
    """Whether ``lm`` recomputes activations in backward (the flag was renamed in transformers 5)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(lm), name) or hasattr(lm, name):
            return bool(getattr(lm, name))
    return False


def reuses_prefix(policy: Any) -> bool:
    """Whether a forward of ``policy`` (its ``lm``, in its mode) can run a shared prefix once: not
    when it trains with gradient checkpointing, which has no KV cache."""
    return not (checkpointing(policy.lm) and policy.training and torch.is_grad_enabled())


def supports_prefix_cache(lm: nn.Module, length: int) -> bool:
    """Whether ``generate`` on ``lm`` continues a prefix cache exactly, for sequences of at most
    ``length`` tokens (prompt and reply). False, so the plain call runs, for anything untested:

    - peft prompt learning (its virtual tokens are a cache of their own), encoder-decoders, models
      without a dynamic cache (state-space, xlnet ...) or without ``position_ids`` (their positions
      would count the moved padding), or whose ``prepare_inputs_for_generation`` is their own;
    - attention kernels other than eager and sdpa;
    - layers that are not plain attention (linear, convolutional, shared KV), and sliding or
      chunked ones whose window is shorter than ``length``: it would hold other columns.
    """
    peft_config = getattr(lm, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return False
    base = base_model(lm)
    config = base.config.get_text_config(decoder=True)
    if (
        base.config.is_encoder_decoder
        or not isinstance(base, GenerationMixin)
        or not base._supports_default_dynamic_cache()
        or "position_ids" not in inspect.signature(base.forward).parameters
        or type(base).prepare_inputs_for_generation is not GenerationMixin.prepare_inputs_for_generation
        or getattr(config, "_attn_implementation", None) not in EXACT_ATTENTION
    ):
        return False
    layer_types, _ = get_layer_types_and_kwargs(config)
    if any(kind != "full_attention" and kind not in WINDOWED_LAYERS for kind in layer_types):
        return False
    return windows_cover(lm, length)


def windows_cover(lm: nn.Module, length: int) -> bool:
    """Whether every sliding or chunked attention layer of ``lm`` sees at least ``length`` columns,
    so that padding moved between a prefix and the rest (``[prefix | padding | rest]``) cannot
    push real tokens out of a window: a window counts cache columns, padding included."""
    config = base_model(lm).config.get_text_config(decoder=True)
    layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
    return all(
        kind not in WINDOWED_LAYERS or kwargs["sliding_window"] >= length
        for kind, kwargs in zip(layer_types, layer_kwargs, strict=True)
    )
