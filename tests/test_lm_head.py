"""The LM's output layer at chosen positions (:mod:`llamagym_pl.lm_head`) gives each architecture's
own logits, its soft-capping and scalings included, and passes its free check."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from llamagym_pl.lm_head import last_hidden, output_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V = 50
COMMON = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2}
ARCHITECTURES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, **HEADS)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**COMMON, **HEADS, head_dim=8, tie_word_embeddings=True)),
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(**COMMON, **HEADS, head_dim=8)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4)),
    # Their output layer's result is transformed: soft-capped, scaled up, scaled down.
    "gemma2": lambda: Gemma2ForCausalLM(
        Gemma2Config(**COMMON, **HEADS, head_dim=8, final_logit_softcapping=0.5)
    ),
    "cohere": lambda: CohereForCausalLM(CohereConfig(**COMMON, **HEADS, logit_scale=0.3)),
    "granite": lambda: GraniteForCausalLM(GraniteConfig(**COMMON, **HEADS, logits_scaling=4.0)),
}
TRANSFORMED = ("gemma2", "cohere", "granite")


def tiny_lm(architecture: str) -> PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ARCHITECTURES[architecture]().eval()


def right_padded() -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 9) random ids; the last row is 5 tokens, right padded."""
    ids = torch.randint(1, V, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    return ids, mask


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_output_logits_are_the_lms_own_logits_at_every_position(architecture: str) -> None:
    lm = tiny_lm(architecture)
    ids, mask = right_padded()
    with torch.no_grad():
        full = lm(input_ids=ids, attention_mask=mask).logits  # (3, 9, V)
        hidden = last_hidden(lm, input_ids=ids, attention_mask=mask, use_cache=False)  # (3, 9, H)
        assert hidden is not None, "the free check failed: this architecture would fall back"
        ours = output_logits(lm, hidden)
        raw = lm.get_output_embeddings()(hidden)
    torch.testing.assert_close(ours, full, rtol=0, atol=1e-6)
    if architecture in TRANSFORMED:  # the transform is what makes them equal
        assert (raw - full).abs().max() > 1e-2


@pytest.mark.parametrize("architecture", ["llama", "gemma2"])
def test_the_check_passes_under_bf16_autocast(architecture: str) -> None:
    """Mixed precision (``bf16-mixed``): the output layer runs in bf16, ours as the LM's."""
    lm = tiny_lm(architecture)
    ids, mask = right_padded()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = last_hidden(lm, input_ids=ids, attention_mask=mask, use_cache=False)
        full = lm(input_ids=ids, attention_mask=mask).logits
        assert hidden is not None
        ours = output_logits(lm, hidden)
    assert ours.dtype == full.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), full.float(), rtol=0.02, atol=0.02)
