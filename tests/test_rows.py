"""Generate mode's forward over episode rows (:mod:`llamagym_pl.actions.rows`): the output layer
at the reply tokens only and the shared prefix encoded once give the log-probs, entropies, values
and gradients of whole rows with full logits, on every architecture; the preparation pass (old
and reference log-probs) runs the output layer at the reply tokens too; and logits transformed in a
way we do not know fall back to full logits, exactly."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from model_helpers import FAMILIES, build_family_model, episodes, perturb_trainable, scored_batch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from llamagym_pl import ppo
from llamagym_pl.actions import GenerateStyle
from llamagym_pl.actions.generate import row_minibatch
from llamagym_pl.actions.rows import row_forward, row_logprobs
from llamagym_pl.buffer import build_buffer
from llamagym_pl.kl import ReferencePolicy
from llamagym_pl.loading import build_policy, load_tokenizer
from llamagym_pl.packing import PACK_TOKENS, layout
from llamagym_pl.policy import PolicyWithValueHead
from llamagym_pl.update import minibatch_loss, prepare_rollout

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEMPERATURE = 0.7  # not 1: the tempered distribution is the one trained on


@pytest.fixture(scope="module", params=sorted({**FAMILIES, "gemma2": "nosystem_tokenizer"}))
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test families, and a Gemma 2 (soft-capped logits, a sliding-window layer)."""
    tokenizer: PreTrainedTokenizerBase = request.getfixturevalue(
        FAMILIES.get(request.param, "nosystem_tokenizer")
    )
    return build_family_model(request.param, tokenizer, tmp_path_factory.mktemp(request.param))


@contextmanager
def recorded(policy: PolicyWithValueHead) -> Iterator[tuple[list, list]]:
    """``(lm_calls, head_inputs)``: the ``input_ids`` shape of every LM forward and the input shape
    of every output-layer forward in the block."""
    lm_calls: list[tuple[int, ...]] = []
    head_inputs: list[tuple[int, ...]] = []
    hooks = [
        policy.lm.register_forward_pre_hook(
            lambda _m, _a, kwargs: lm_calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
        ),
        policy.lm.get_output_embeddings().register_forward_pre_hook(
            lambda _m, args: head_inputs.append(tuple(args[0].shape))
        ),
    ]
    try:
        yield lm_calls, head_inputs
    finally:
        for hook in hooks:
            hook.remove()


def full_logits_terms(policy: PolicyWithValueHead, batch: dict) -> tuple[torch.Tensor, ...]:
    """By hand, as before: full logits (B, L, V) of the whole rows, read at the reply tokens."""
    logits, values = policy(batch["input_ids"], batch["attention_mask"])  # (B, L, V), (B, L)
    rows, cols = batch["action_mask"].nonzero(as_tuple=True)
    step = logits[rows, cols - 1] / TEMPERATURE  # (N, V)
    logprobs = ppo.token_logprobs(step, batch["input_ids"][rows, cols])
    return logprobs, ppo.entropy_from_logits(step), values.gather(1, batch["value_positions"])


def reply_terms(policy: PolicyWithValueHead, batch: dict) -> tuple[torch.Tensor, ...]:
    (terms,) = GenerateStyle(temperature=TEMPERATURE).logprobs(policy, [batch])
    return terms.logprobs, terms.entropy, terms.values


def terms_and_grads(
    policy: PolicyWithValueHead, batch: dict, terms: Callable
) -> tuple[Any, dict, list, list]:
    """The terms of one path, the gradients of a sum of them, and the forwards it ran."""
    policy.zero_grad(set_to_none=True)
    with recorded(policy) as (lm_calls, head_inputs):
        logprobs, entropy, values = terms(policy, batch)
    # Distinct weights, so that no term's gradient can hide another's.
    (logprobs.sum() + 0.3 * entropy.sum() + 2.0 * (values * batch["turn_mask"]).sum()).backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return (logprobs.detach(), entropy.detach(), values.detach()), grads, lm_calls, head_inputs


def shared_prefix_by_hand(batch: dict) -> int:
    """The first tokens all rows share, leaving the shortest row a token of its own (0 for one row)."""
    rows = [
        ids[: int(n)].tolist()
        for ids, n in zip(batch["input_ids"], batch["attention_mask"].sum(1), strict=True)
    ]
    c = 0
    while len(rows) > 1 and c < min(map(len, rows)) - 1 and all(row[c] == rows[0][c] for row in rows):
        c += 1
    return c


def packed_shape(own: torch.Tensor, c: int) -> tuple[int, int]:
    """The (rows, width) of the one forward of a ``c``-token prefix and rows with ``own`` tokens
    past it (:func:`~llamagym_pl.packing.layout`: the rows packed, the prefix in the free slots
    or rows of its own)."""
    sizes = sorted(own.tolist(), reverse=True)
    packs, width, prefix_rows = layout(sizes, c, max(PACK_TOKENS, max(sizes)))
    return prefix_rows + len(packs), width


def assert_same_terms_and_grads(new: tuple, old: tuple) -> None:
    (terms, grads, *_), (old_terms, old_grads, *_) = new, old
    for got, expected in zip(terms, old_terms, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert grads.keys() == old_grads.keys() and len(grads) > 3
    for name, grad in grads.items():
        # Float32 rounding of sums in another order: relative to the gradient's scale (the
        # embeddings' reach ~30), since elements near 0 are sums of large terms that cancel.
        scale = float(old_grads[name].abs().max().clamp(min=1.0))
        torch.testing.assert_close(grad, old_grads[name], rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_reply_logits_and_shared_prefix_equal_full_logits_of_whole_rows(family_dir: Path) -> None:
    tokenizer, policy = load_tokenizer(str(family_dir)), build_policy(str(family_dir))
    batch = scored_batch(policy, tokenizer)  # 4 two-turn episodes, one row each
    policy.train()
    new = terms_and_grads(policy, batch, reply_terms)
    old = terms_and_grads(policy, batch, full_logits_terms)
    assert_same_terms_and_grads(new, old)
    (b, length), n = batch["input_ids"].shape, int(batch["action_mask"].sum())
    c, hidden = shared_prefix_by_hand(batch), policy.lm.config.get_text_config().hidden_size
    lm_calls, head_inputs = new[2], new[3]
    assert c > 10, "the rows share the system prompt"
    # One forward of the prefix and the rows' own tokens packed (packing), or, where packing is
    # not known exact (sliding windows), the prefix, then the rows' rests as a padded batch on
    # its KV cache.
    if "gemma2" not in family_dir.name:
        packed = packed_shape(batch["attention_mask"].sum(1) - c, c)
        assert lm_calls == [packed], "the prefix once, in the rows' forward"
        # The output layer: the forward's last positions (the LM's own, then our check of it),
        # then the N positions that predict the reply tokens; not B x L.
        assert head_inputs == [(packed[0], 1, hidden), (packed[0], 1, hidden), (n, hidden)]
    else:
        assert lm_calls == [(1, c), (b, length - c)], "the prefix once, then the rows' rests on its cache"
        assert head_inputs == [(1, 1, hidden), (b, 1, hidden), (b, 1, hidden), (n, hidden)]
    assert old[3] == [(b, length, hidden)]


def test_a_prefix_that_covers_a_reply_is_read_from_the_prefix(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Four envs dealt the same first hand and replying the same: the rows share their whole first
    turn, so its value and reply log-probs are read from the prefix's hidden states."""
    same_start = [replace(ep, observations=["your sum is 12 .", *ep.observations[1:]]) for ep in episodes(4)]
    buf = build_buffer(tiny_tokenizer, same_start)
    prepare_rollout(tiny_policy, buf, GenerateStyle(), gamma=1.0, gae_lambda=0.95, batch_size=4)
    batch = row_minibatch(buf, [0, 1, 2, 3])
    c = shared_prefix_by_hand(batch)
    assert batch["action_mask"][:, :c].all(0).any(), "every row's first reply is in the prefix"
    new = terms_and_grads(tiny_policy.train(), batch, reply_terms)
    assert_same_terms_and_grads(new, terms_and_grads(tiny_policy, batch, full_logits_terms))
    assert new[2] == [packed_shape(batch["attention_mask"].sum(1) - c, c)]


def test_gradient_checkpointing_runs_whole_rows_with_the_same_result(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Gradient checkpointing has no KV cache in training: whole rows, same terms and gradients."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same value head
        policy = build_policy(str(tiny_model_dir), gradient_checkpointing=checkpointing)
        batch = scored_batch(policy, tiny_tokenizer)
        results.append(terms_and_grads(policy.train(), batch, reply_terms))
    assert_same_terms_and_grads(results[1], results[0])
    b, length = batch["input_ids"].shape
    assert results[1][2] == [(b, length)]
    c = shared_prefix_by_hand(batch)
    assert results[0][2] == [packed_shape(batch["attention_mask"].sum(1) - c, c)]


def test_prepare_runs_the_output_layer_at_reply_tokens_only(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Old log-probs, values and the reference's log-probs (LoRA: the same LM, adapter off), in
    chunks of 3 rows: each chunk's prefix once, the output layer at its reply tokens."""
    policy = build_policy(str(tiny_model_dir), lora_r=4)
    perturb_trainable(policy)  # the policy moved away from the reference
    reference = ReferencePolicy(policy)
    buf = build_buffer(tiny_tokenizer, episodes(4))
    # Once before: the first packed forward of a model is checked against the rows run alone.
    prepare_rollout(policy, buf, GenerateStyle(), 1.0, 0.95, batch_size=3, reference=reference, kl_coef=0.1)
    with recorded(policy) as (lm_calls, head_inputs):
        prepare_rollout(
            policy, buf, GenerateStyle(), 1.0, 0.95, batch_size=3, reference=reference, kl_coef=0.1
        )
    hidden = policy.lm.config.hidden_size
    expected_calls, expected_head = [], []
    for take in ([0, 1, 2], [3]):
        b, n, rest = len(take), int(buf.action_mask[take].sum()), int(buf.lengths[take].max())
        c = shared_prefix_by_hand(
            {"input_ids": buf.input_ids[take], "attention_mask": buf.attention_mask[take]}
        )
        # Several rows: the prefix once and their rests packed, one forward; one row: itself.
        own = packed_shape(buf.lengths[take] - c, c) if b > 1 else (b, rest)
        for _ in ("policy", "reference"):
            expected_calls += [own]
            expected_head += [(own[0], 1, hidden), (own[0], 1, hidden), (n, hidden)]
    assert lm_calls == expected_calls and head_inputs == expected_head
    # The same old log-probs and values as full logits of whole rows, 0 off the reply tokens.
    with torch.no_grad():
        logits, values = policy.eval()(buf.input_ids, buf.attention_mask)  # (R, L, V), (R, L)
    direct = ppo.token_logprobs(logits[:, :-1], buf.input_ids[:, 1:])  # (R, L - 1)
    expected = torch.where(buf.action_mask[:, 1:], direct, 0.0)
    torch.testing.assert_close(buf.old_logprobs[:, 1:], expected, rtol=0, atol=1e-5)
    turn_values = values[buf.value_rows, buf.value_positions] * buf.turn_mask
    torch.testing.assert_close(buf.old_values, turn_values, rtol=0, atol=1e-5)


class ScaledLogits(LlamaForCausalLM):
    """A Llama whose logits are scaled after its output layer: an architecture we do not know."""

    @functools.wraps(LlamaForCausalLM.forward)  # keeps the signature: it accepts logits_to_keep
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 1.5
        return out


def test_unknown_logit_transform_falls_back_to_full_logits_once_warned(
    tiny_tokenizer: PreTrainedTokenizerBase, caplog: pytest.LogCaptureFixture
) -> None:
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1
    )
    config.num_attention_heads, config.num_key_value_heads = 4, 2
    torch.manual_seed(0)
    policy = PolicyWithValueHead(ScaledLogits(config))
    buf = build_buffer(tiny_tokenizer, episodes(4), temperature=TEMPERATURE)
    with caplog.at_level(logging.WARNING, logger="llamagym_pl.lm_head"):
        prepare_rollout(policy, buf, GenerateStyle(temperature=TEMPERATURE), 1.0, 0.95, batch_size=4)
        batch = row_minibatch(buf, [0, 1, 2, 3])
        new = terms_and_grads(policy.train(), batch, reply_terms)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "llama model" in warnings[0], warnings
    old = terms_and_grads(policy, batch, full_logits_terms)  # through the scaled forward too
    assert_same_terms_and_grads(new, old)
    b, length = batch["input_ids"].shape
    assert new[3] == old[3] == [(b, length, 32)], "after the failed check: full logits, no prefix"
    # The old log-probs came from the same fallback: the ratio is exactly 1.
    _, metrics = minibatch_loss(GenerateStyle(temperature=TEMPERATURE), policy, batch, 0.2, True, 0.5, 0.0)
    assert float(metrics["train/approx_kl"]) == 0.0 and float(metrics["train/clipfrac"]) == 0.0


def test_preparation_log_probs_in_chunks_are_those_of_all_positions(tiny_model_dir: Path) -> None:
    """row_logprobs runs the output layer a few positions at a time: the log-probs and values of
    row_forward's logits at all of them at once."""
    tokenizer, policy = load_tokenizer(str(tiny_model_dir)), build_policy(str(tiny_model_dir)).eval()
    batch = scored_batch(policy, tokenizer)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows, cols = batch["action_mask"].nonzero(as_tuple=True)
    tokens = ids[rows, cols]
    with torch.no_grad():
        logits, values = row_forward(policy, ids, mask, rows, cols - 1)
        chunked, chunked_values = row_logprobs(
            policy, ids, mask, rows, cols - 1, tokens, TEMPERATURE, chunk=3
        )
    assert len(tokens) > 3
    torch.testing.assert_close(chunked, ppo.token_logprobs(logits / TEMPERATURE, tokens), rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked_values, values, rtol=0, atol=0)
