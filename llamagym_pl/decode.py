"""Token-by-token decoding for the settings PPO trains with: the plain softmax at a temperature
(or greedy), a length limit, end-of-sequence. Any other setting goes to Hugging Face ``generate``
(:meth:`llamagym_pl.policy.PolicyWithValueHead.generate` decides, with :func:`plain_decoding`).

Why not ``generate`` for these too: on the policies this library runs on a CPU, a reply's time is
per-call cost rather than arithmetic. ``generate`` checks and copies its config, builds its
processors and stopping criteria and keeps its bookkeeping at every step (11.4 ms for an 8-token
reply of a 0.66M-parameter Llama, against 8.7 ms for these forwards alone); and its sampler,
``torch.multinomial``, draws an exponential variate for every vocabulary entry (5.6 ms for 64 rows
of a 4,096-token vocabulary, 2 CPU threads) where inverting the cumulative distribution needs one
uniform number per row (0.2 ms): :func:`sample_tokens`.

The forwards are those ``generate`` makes (``GenerationMixin.prepare_inputs_for_generation`` and
``_update_model_kwargs_for_generation``): position ids from the attention mask (``cumsum - 1``, 0
at padding), the mask grown by a column of ones per step, the KV cache continued, the output layer
at the last position only; so greedy replies are ``generate``'s, token for token, and sampled ones
come from the same distribution (``tests/test_decode.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import GenerationConfig

from llamagym_pl.lm_calls import lm_call_names
from llamagym_pl.prefix_cache import new_cache, supports_prefix_cache

PLAIN_KEYS = frozenset(
    {"do_sample", "max_new_tokens", "temperature", "top_k", "top_p"}
    | {"pad_token_id", "eos_token_id", "use_cache"}
)
"""The settings :func:`decode` runs itself (given values that leave the softmax whole)."""


def plain_decoding(lm: nn.Module, config: GenerationConfig, width: int) -> bool:
    """Whether :func:`decode` gives what ``generate`` would with ``config`` for ``(B, width)``
    prompts: sampling from the whole softmax at a temperature, or greedy; a ``max_new_tokens``; the
    KV cache on; a model whose generation is the default one
    (:func:`~llamagym_pl.prefix_cache.supports_prefix_cache`). Anything else (top-k/top-p, logits
    processors, beams, returned scores ...) is ``generate``'s."""
    changed = set(config.to_diff_dict()) - {"transformers_version"}  # what differs from the defaults
    if changed - PLAIN_KEYS or config.max_new_tokens is None or config.use_cache is False:
        return False
    if config.do_sample and (config.top_k not in (None, 0) or config.top_p not in (None, 1.0)):
        return False
    return supports_prefix_cache(lm, width + config.max_new_tokens)


def decode_with_config(
    lm: nn.Module, input_ids: Tensor, attention_mask: Tensor, config: GenerationConfig, cache: Any = None
) -> Tensor:
    """:func:`decode` with the settings of ``config`` (one that :func:`plain_decoding` accepts)."""
    return decode(
        lm,
        input_ids,
        attention_mask,
        config.max_new_tokens,
        do_sample=bool(config.do_sample),
        temperature=1.0 if config.temperature is None else config.temperature,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        cache=cache,
    )


def sample_tokens(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """One token id per row of ``logits`` (B, V), drawn from ``softmax(logits / temperature)``.

    The probabilities are those ``generate`` samples from (float32 logits divided by the
    temperature, softmax); the draw inverts their cumulative sum, taken in float64 so that its
    rounding (~1e-16 a step) stays far below any probability that matters: a uniform ``u`` in
    ``[0, total)`` picks the first token whose cumulative probability exceeds it, so token ``i`` is
    drawn with probability ``p_i`` and a token of probability 0 never.

    Raises:
        ValueError: logits that give no distribution (NaN, or +inf), as ``torch.multinomial`` would.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    cdf = probs.double().cumsum(-1)  # (B, V)
    total = cdf[:, -1:]  # (B, 1): 1 up to rounding
    if not bool(torch.isfinite(total).all()):
        raise ValueError(
            "the policy's logits are not finite (NaN or inf): there is no distribution to sample a reply "
            "from; the weights have diverged (see train/nonfinite_steps) or the model is broken"
        )
    u = torch.rand(total.shape, dtype=torch.float64, device=logits.device) * total
    # Rounding can make u equal the total (probability ~1e-16): the last token, not one past it.
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1).squeeze(1)  # (B,)


def gathers_weights(lm: nn.Module) -> bool:
    """Whether a forward of ``lm`` gathers sharded weights from other processes (FSDP 1 or 2 in a
    process group of 2+), so that every rank must run it equally often."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(
        isinstance(m, FullyShardedDataParallel) or getattr(m, "_is_fsdp_managed_module", False)
        for m in lm.modules()
    )


@torch.no_grad()
def decode(
    lm: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    *,
    do_sample: bool,
    temperature: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    cache: Any = None,
) -> Tensor:
    """Continue prompts ``input_ids`` (B, P) with at most ``max_new_tokens`` tokens each: sampled
    (:func:`sample_tokens`) or greedy (``argmax``). Returns ``(B, P + n)``, the prompts and ``n``
    new columns; a row that wrote an end-of-sequence token (kept) is padded with ``pad_token_id``
    (``generate``'s default: the first end-of-sequence id) after it, and decoding stops when every
    row has ended or ``max_new_tokens`` were written.

    ``attention_mask`` (B, P) marks the real tokens (padding anywhere, e.g. left, or between a
    shared prefix and the rest: :func:`~llamagym_pl.prefix_cache.prefix_first`). ``cache``: a KV
    cache of the first columns of every row (a shared prefix,
    :func:`~llamagym_pl.prefix_cache.encode_prefix`), continued in place; None starts an empty one.
    """
    cache_kw, keep_kw = lm_call_names(lm)
    cache = new_cache(lm) if cache is None else cache
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    eos_ids = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill_(attention_mask == 0, 0)  # (B, P)
    done = cache.get_seq_length()
    step_ids, step_positions, mask = input_ids[:, done:], positions[:, done:], attention_mask
    running = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    lockstep = gathers_weights(lm)
    new: list[Tensor] = []
    for step in range(max_new_tokens):
        out = lm(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=step_positions,
            use_cache=True,
            **{cache_kw: cache, **({keep_kw: 1} if keep_kw else {})},
        )
        logits = out.logits[:, -1].float()  # (B, V)
        token = sample_tokens(logits, temperature) if do_sample else logits.argmax(-1)  # (B,)
        if eos:
            token = torch.where(running, token, pad)
            running &= ~torch.isin(token, eos_ids)
        new.append(token)
        if step + 1 == max_new_tokens or (not lockstep and not bool(running.any())):
            break
        step_ids, step_positions = token[:, None], step_positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    return torch.cat([input_ids, *(t[:, None] for t in new)], 1)
