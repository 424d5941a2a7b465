"""`llamagym_pl.sampling`: replies are sampled from the plain softmax PPO scores, whatever the
checkpoint's ``generation_config.json`` says (issue #12)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from llamagym_pl.chat import build_messages, encode_prompts
from llamagym_pl.loading import add_lora, load_causal_lm
from llamagym_pl.policy import PolicyWithValueHead
from llamagym_pl.sampling import build_generation_config, generate_from_settings, own_generation_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NEW_TOKENS = 6


def shipped_policy(model_dir: Path, lora: bool) -> PolicyWithValueHead:
    lm = load_causal_lm(str(model_dir))
    return PolicyWithValueHead(add_lora(lm, r=4, alpha=8, dropout=0.0) if lora else lm)


def sample(policy: PolicyWithValueHead, tokenizer: PreTrainedTokenizerBase, neutral: bool):
    """Sample ``NEW_TOKENS`` tokens (seed 0) with their processed scores and raw logits, through
    :func:`generate_from_settings` (``neutral``) or ``policy.generate`` given the same settings."""
    messages = build_messages(tokenizer, "you play blackjack .", ["your sum is 14 ."], [])
    input_ids, attention_mask = encode_prompts(tokenizer, [messages])  # (1, P): no padding
    settings = {
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "max_new_tokens": NEW_TOKENS,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "output_scores": True,
        "output_logits": True,
        "return_dict_in_generate": True,
    }
    torch.manual_seed(0)
    if neutral:
        out = generate_from_settings(policy, input_ids, attention_mask, **settings)
    else:
        out = policy.generate(input_ids, attention_mask, generation_config=build_generation_config(settings))
    return input_ids, attention_mask, out


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_sampling_log_probs_are_the_softmax_ppo_scores(
    lora: bool, processor_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    policy = shipped_policy(processor_model_dir, lora).eval()
    # The control: passing our config to generate leaves the checkpoint's processors on.
    _, _, leaky = sample(policy, tiny_tokenizer, neutral=False)
    assert not all(torch.equal(s, raw) for s, raw in zip(leaky.scores, leaky.logits, strict=True))

    input_ids, attention_mask, out = sample(policy, tiny_tokenizer, neutral=True)
    for scores, logits in zip(out.scores, out.logits, strict=True):
        torch.testing.assert_close(scores, logits, rtol=0, atol=0)  # (1, V): no processor touched them
    sampled = out.sequences[:, input_ids.shape[1] :]  # (1, N): N <= NEW_TOKENS (eos may stop it)
    at_sampling = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, sampled[..., None])[..., 0]
    # What PPO scores: one forward pass over prompt + reply, the plain softmax of its logits.
    mask = torch.cat([attention_mask, torch.ones_like(sampled)], 1)
    with torch.no_grad():
        logits, _ = policy(out.sequences, mask)  # (1, P + N, V)
    reply_logits = logits[:, input_ids.shape[1] - 1 : -1]  # (1, N, V): predicts each reply token
    scored = reply_logits.log_softmax(-1).gather(-1, sampled[..., None])[..., 0]
    torch.testing.assert_close(at_sampling, scored, rtol=0, atol=1e-5)


def test_own_generation_config_restores_the_model_config_also_after_an_error(
    processor_model_dir: Path,
) -> None:
    policy = shipped_policy(processor_model_dir, lora=True)
    base = policy.lm.get_base_model()
    shipped = base.generation_config
    ours = GenerationConfig(max_new_tokens=2)
    with own_generation_config(policy.lm, ours):
        assert base.generation_config is ours and policy.lm.generation_config is ours
    assert base.generation_config is shipped
    with pytest.raises(RuntimeError, match="boom"), own_generation_config(policy.lm, ours):
        raise RuntimeError("boom")
    assert base.generation_config is shipped and shipped.repetition_penalty == 1.5
    assert "generation_config" not in vars(policy.lm)  # the peft wrapper gained no attribute


def test_sampling_without_top_k_is_not_truncated(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Left unset, top_k would be transformers' global default, 50: a truncated softmax."""
    messages = build_messages(tiny_tokenizer, "you play blackjack .", ["your sum is 14 ."], [])
    input_ids, attention_mask = encode_prompts(tiny_tokenizer, [messages])  # (1, P)
    out = generate_from_settings(
        tiny_policy.eval(),
        input_ids,
        attention_mask,
        do_sample=True,
        max_new_tokens=NEW_TOKENS,
        pad_token_id=tiny_tokenizer.pad_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
    )
    for scores, logits in zip(out.scores, out.logits, strict=True):
        torch.testing.assert_close(scores, logits, rtol=0, atol=0)  # (1, V): nothing cut to -inf
