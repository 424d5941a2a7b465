"""Generation from our own settings only: a checkpoint's ``generation_config.json`` stays out.

PPO scores a reply with the plain softmax of the LM's logits, so the replies must be sampled from
exactly that distribution. Many checkpoints ship a ``generation_config.json`` with logits
processors (``repetition_penalty``, ``no_repeat_ngram_size``, ``min_new_tokens``,
``suppress_tokens``, ...), and passing our own ``GenerationConfig`` to ``generate`` does not
remove them: transformers fills every key that config leaves unset from the model's
``generation_config`` (``GenerationMixin._prepare_generation_config``). So for the duration of
one ``generate`` call the model's config is replaced by ours (:func:`own_generation_config`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationConfig

from llamagym_pl.lm_calls import lm_call_names
from llamagym_pl.prefix_cache import (
    PrefixMemo,
    encode_prefix,
    prefix_first,
    shared_prefix_length,
    supports_prefix_cache,
)

GENERATION_KEYS = frozenset(GenerationConfig().to_dict())
"""The settings a ``GenerationConfig`` has; any other key is a typo (``generate`` would reject it)."""

SAMPLING_KEYS = ("temperature", "top_k", "top_p")
"""Settings that shape the sampling distribution (ignored by greedy decoding)."""

TRUNCATION_OFF: dict[str, Any] = {"top_k": 0, "top_p": 1.0}
"""The values of ``top_k``/``top_p`` that sample from the whole softmax: the only ones PPO can train with."""

NEUTRAL_KEYS = frozenset(
    {
        "max_new_tokens",
        "max_length",
        "do_sample",
        "pad_token_id",
        "eos_token_id",
        "bos_token_id",
        "use_cache",
        "cache_implementation",
        "output_scores",
        "output_logits",
        "return_dict_in_generate",
    }
)
"""Settings that leave every token's distribution alone (length, stopping, ids, caching, outputs)."""


def build_generation_config(settings: Mapping[str, Any], what: str = "generation") -> GenerationConfig:
    """A ``GenerationConfig`` holding ``settings`` and nothing else (the rest are transformers' defaults,
    except that sampling without a ``top_k`` samples from the whole softmax).

    Raises:
        ValueError: a key that is not a ``GenerationConfig`` setting, named with ``what``.
    """
    unknown = sorted(set(settings) - GENERATION_KEYS)
    if unknown:
        raise ValueError(
            f"unknown {what} keys {unknown}: they are not transformers.GenerationConfig settings"
        )
    if settings.get("do_sample"):
        # Unset, top_k would not be off: transformers falls back to its global default, top_k=50.
        settings = {"top_k": 0, **settings}
    return GenerationConfig(**settings)


def refuse_truncation(settings: Mapping[str, Any], name: str) -> None:
    """Raise if ``settings`` sample from a top-k or top-p truncated distribution.

    PPO scores a reply with the full softmax, never the truncated one it was sampled from, so its
    ratios would be wrong. Greedy settings (``do_sample`` false) pass: the keys do nothing there.
    ``name`` formats a key as the user wrote it, e.g. ``"data.{}"``.
    """
    if not settings.get("do_sample", True):
        return
    for key, off in TRUNCATION_OFF.items():
        value = settings.get(key, off)
        if value != off:  # None too: for top_k, transformers would then fall back to 50
            raise ValueError(
                f"{name.format(key)}={value!r} samples from a truncated distribution that PPO never scores "
                f"(it scores the full softmax, so its ratios would be biased); remove {name.format(key)} "
                f"or set it to {off}"
            )


def off_policy_keys(settings: Mapping[str, Any]) -> list[str]:
    """The keys of ``settings`` that add a logits processor (repetition penalty, banned words ...):
    sampling with them is not the plain softmax PPO scores. Temperature/top-k/top-p not included."""
    return sorted(set(settings) - NEUTRAL_KEYS - set(SAMPLING_KEYS))


@contextmanager
def own_generation_config(lm: nn.Module, config: GenerationConfig) -> Iterator[None]:
    """Make ``config`` the ``generation_config`` of ``lm`` (and of every module inside it) for the block.

    Every module inside ``lm`` that holds its own ``generation_config`` is swapped, not only ``lm``:
    under a peft wrapper that is the wrapped transformers model, whose config ``generate`` reads
    (the wrapper only forwards the attribute to it). The originals come back on exit, also after an
    error, so the user's model is left as it was.
    """
    saved = [
        (module, module.__dict__["generation_config"])
        for module in lm.modules()
        if isinstance(module.__dict__.get("generation_config"), GenerationConfig)
    ]
    try:
        for module, _ in saved:
            module.generation_config = config
        yield
    finally:
        for module, original in saved:
            module.generation_config = original


def generate_from_settings(
    policy: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    share_prefix: bool = True,
    memo: PrefixMemo | None = None,
    **settings: Any,
) -> Any:
    """``policy.generate`` with exactly ``settings``: the LM's own generation config is set aside.
    The settings PPO trains with (plain softmax sampling at a temperature, or greedy) run on our
    own loop (:meth:`~llamagym_pl.policy.PolicyWithValueHead.generate`).

    ``policy`` is a :class:`~llamagym_pl.policy.PolicyWithValueHead` (its ``lm`` is the causal LM);
    ``input_ids`` and ``attention_mask`` are left padded, ``(B, P)``. With ``share_prefix``, the
    first tokens all prompts share (the system prompt) are encoded once and generation continues
    from their KV cache (:mod:`llamagym_pl.prefix_cache`): the same tokens, fewer forward FLOPs.
    It falls back to the plain call where that is not known to be exact (:func:`continues_prefix`).
    A single prompt shares no prefix within its batch; with a ``memo``
    (:class:`~llamagym_pl.prefix_cache.PrefixMemo`) it continues the cache of the prefix it shares
    with the prompts of earlier calls, as long as the weights have not changed.
    Returns what ``generate`` returns: ``(B, P + new)`` token ids unless ``settings`` ask for more.
    """
    config = build_generation_config(settings)
    width = input_ids.shape[1]

    def run(ids: Tensor, mask: Tensor, cache: Any = None) -> Any:
        kwargs = {} if cache is None else {lm_call_names(policy.lm)[0]: cache}
        return policy.generate(ids, mask, generation_config=config, **kwargs)

    with own_generation_config(policy.lm, config):
        single = input_ids.shape[0] == 1 and bool(attention_mask.all())
        if memo is not None and share_prefix and single:
            # One prompt: the prefix it shares with the prompts before it, kept in ``memo``.
            if continues_prefix(policy.lm, config, settings, width):
                found = memo.cache_for(policy.lm, input_ids[0].tolist())
                if found is not None:
                    return run(input_ids, attention_mask, found[0])
        shared = shared_prefix_length(input_ids, attention_mask) if share_prefix else 0
        if shared and continues_prefix(policy.lm, config, settings, width):
            ids, mask = prefix_first(input_ids, attention_mask, shared)  # (B, P) each
            out = run(ids, mask, encode_prefix(policy.lm, ids[:1, :shared], ids.shape[0]))  # (B, P + new)
            # The prompts as given, not as laid out for the cache: callers may read them back.
            return torch.cat([input_ids, out[:, width:]], 1)
        return run(input_ids, attention_mask)


def continues_prefix(
    lm: nn.Module, config: GenerationConfig, settings: Mapping[str, Any], width: int
) -> bool:
    """Whether ``generate`` with ``config`` may continue a prefix cache for ``(B, width)`` prompts.

    Only plain sampling or greedy decoding, one sequence per prompt, returning token ids: beams
    and returned sequences would need the cache expanded, and a logits processor (repetition
    penalty, n-gram ban, ...) reads the prompt ids, whose padding the cache layout moves. Then the
    model must support it (:func:`~llamagym_pl.prefix_cache.supports_prefix_cache`).
    """
    if (
        off_policy_keys(settings)
        or config.use_cache is False  # None: transformers' default, True
        or config.cache_implementation not in (None, "dynamic")
        or config.return_dict_in_generate
        or (config.max_new_tokens is None and config.max_length is None)  # a length we would guess
    ):
        return False
    length = config.max_length if config.max_new_tokens is None else width + config.max_new_tokens
    return supports_prefix_cache(lm, length)
