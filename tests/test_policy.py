"""`PolicyWithValueHead`: our token log-probs are Hugging Face's loss, values come from the same pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llamagym_pl import ppo
from llamagym_pl.policy import PolicyWithValueHead, ValueHead

B, L = 3, 9


@pytest.fixture
def batch(tiny_policy: PolicyWithValueHead) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (B, L); the last row is right padded after 5 tokens."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tiny_policy.lm.config.vocab_size, (B, L), generator=gen)  # (B, L)
    mask = torch.ones(B, L, dtype=torch.long)
    ids[-1, 5:] = tiny_policy.lm.config.pad_token_id
    mask[-1, 5:] = 0
    return ids, mask


def test_token_logprobs_are_minus_hf_cross_entropy(
    tiny_policy: PolicyWithValueHead, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    ids, mask = batch
    logits, _ = tiny_policy(ids, mask)  # (B, L, V)
    logprobs = ppo.token_logprobs(logits[:, :-1], ids[:, 1:])  # (B, L - 1)

    hf_logits = tiny_policy.lm(input_ids=ids, attention_mask=mask).logits  # (B, L, V)
    ce = F.cross_entropy(
        hf_logits[:, :-1].reshape(-1, hf_logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(B, L - 1)
    torch.testing.assert_close(logprobs, -ce, rtol=1e-5, atol=1e-5)
    assert logprobs.dtype == torch.float32
    assert (logprobs < 0).all()


def test_sequence_logprob_sum_is_hf_mean_loss_times_tokens(
    tiny_policy: PolicyWithValueHead, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    ids, mask = batch
    logits, _ = tiny_policy(ids, mask)
    logprobs = ppo.token_logprobs(logits[:, :-1], ids[:, 1:])  # (B, L - 1)
    for row in range(B):
        n = int(mask[row].sum())
        # HF shifts labels itself and averages over the n - 1 predicted tokens.
        labels = ids[row : row + 1].clone()
        labels[:, n:] = -100
        loss = tiny_policy.lm(
            input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1], labels=labels
        ).loss
        torch.testing.assert_close(logprobs[row, : n - 1].sum(), -loss * (n - 1), rtol=1e-5, atol=1e-5)

    # The whole batch at once: HF's loss is the mean over every valid predicted token.
    labels = ids.masked_fill(mask == 0, -100)
    loss = tiny_policy.lm(input_ids=ids, attention_mask=mask, labels=labels).loss
    valid = mask[:, 1:].bool()  # (B, L - 1): the predicted token is not padding
    torch.testing.assert_close(logprobs[valid].sum(), -loss * valid.sum(), rtol=1e-5, atol=1e-4)


def test_values_come_from_the_same_forward_pass(
    tiny_policy: PolicyWithValueHead, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    ids, mask = batch
    calls = []
    handle = tiny_policy.lm.register_forward_hook(lambda module, args, kwargs_out: calls.append(kwargs_out))
    try:
        logits, values = tiny_policy(ids, mask)
    finally:
        handle.remove()
    assert len(calls) == 1, "logits and values must come from one LM forward pass"
    assert logits.shape == (B, L, tiny_policy.lm.config.vocab_size)
    assert values.shape == (B, L)
    assert values.dtype == torch.float32
    # The values are the value head applied to that same pass's last hidden state.
    torch.testing.assert_close(values, tiny_policy.value_head(calls[0].hidden_states[-1]), rtol=0, atol=0)
    torch.testing.assert_close(logits, calls[0].logits, rtol=0, atol=0)


def test_values_are_float32_with_a_bf16_lm(tiny_policy: PolicyWithValueHead) -> None:
    tiny_policy.lm.to(torch.bfloat16)
    ids = torch.arange(10, 16)[None]  # (1, 6)
    logits, values = tiny_policy(ids, torch.ones_like(ids))
    assert logits.dtype == torch.bfloat16
    assert values.dtype == torch.float32
    assert tiny_policy.value_head.summary.weight.dtype == torch.float32


def test_value_gradients_reach_head_and_lm(tiny_policy: PolicyWithValueHead) -> None:
    ids = torch.arange(10, 16)[None]  # (1, 6)
    _, values = tiny_policy(ids, torch.ones_like(ids))
    values.sum().backward()
    assert tiny_policy.value_head.summary.weight.grad is not None
    assert tiny_policy.value_head.summary.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_policy.lm.parameters())


def test_value_head_starts_near_zero() -> None:
    head = ValueHead(16)
    hidden = torch.randn(2, 5, 16, dtype=torch.bfloat16)  # (B, L, H)
    values = head(hidden)
    assert values.shape == (2, 5)
    assert values.dtype == torch.float32
    assert torch.all(head.summary.bias == 0)
    assert values.abs().max() < 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_head_runs_in_float32_under_autocast(dtype: torch.dtype) -> None:
    """Under bf16 autocast (trainer.precision: bf16-mixed) a linear layer runs in bf16 even on a
    float32 input; the value head must not."""
    head = ValueHead(16)
    hidden = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)).to(dtype)  # (B, L, H)
    expected = F.linear(hidden.float(), head.summary.weight, head.summary.bias).squeeze(-1)  # (B, L)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = head(hidden)
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, expected, rtol=0, atol=0)


def test_hidden_size_not_found_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="hidden size"):
        PolicyWithValueHead(nn.Linear(3, 3))
