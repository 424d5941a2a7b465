"""Helpers for the model tests: tiny models of several architectures and real PPO minibatches."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from llamagym_pl.actions.generate import GenerateStyle, row_minibatch
from llamagym_pl.buffer import RolloutBuffer, build_buffer
from llamagym_pl.episode import Episode
from llamagym_pl.policy import PolicyWithValueHead
from llamagym_pl.update import prepare_rollout

# family -> the conftest tokenizer fixture whose chat template it ships with. Qwen3 rather than
# Qwen2: transformers 5 loads any tokenizer saved next to a model_type "qwen2" config as its
# byte-level Qwen2Tokenizer (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), which garbles our
# word-level test vocabulary; real Qwen2 checkpoints are unaffected.
FAMILIES = {
    "llama": "llama2_tokenizer",
    "qwen3": "chatml_tokenizer",
    "gemma": "nosystem_tokenizer",
    "gpt2": "chatml_tokenizer",
}
SYSTEM = "you are an expert blackjack player . answer hit or stick ."


def build_family_model(family: str, tokenizer: PreTrainedTokenizerBase, out_dir: Path, seed: int = 0) -> Path:
    """A randomly initialised 1-layer, 32-wide model of ``family`` (a :data:`FAMILIES` key, or
    ``gemma2``: 2 layers, one of them sliding-window), saved with ``tokenizer``."""
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, **ids}
    heads = {"num_attention_heads": 4, "num_key_value_heads": 2}
    if family == "llama":
        model_cls, config = LlamaForCausalLM, LlamaConfig(**common, **heads)
    elif family == "qwen3":
        config = Qwen3Config(**common, **heads, head_dim=8, tie_word_embeddings=True)
        model_cls = Qwen3ForCausalLM
    elif family == "gemma":
        model_cls, config = GemmaForCausalLM, GemmaConfig(**common, **heads, head_dim=8)
    elif family == "gemma2":
        # A soft cap small enough to change every logit visibly, and a sliding window shorter than
        # the test episodes, so that the KV cache holds sliding-window layers too.
        # (Two layers: Gemma 2 alternates sliding-window and full attention.)
        two = {**common, "num_hidden_layers": 2}
        config = Gemma2Config(**two, **heads, head_dim=8, final_logit_softcapping=0.5, sliding_window=8)
        model_cls = Gemma2ForCausalLM
    elif family == "gpt2":
        model_cls, config = (
            GPT2LMHeadModel,
            GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=256, **ids),
        )
    else:
        raise ValueError(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def episodes(n: int = 4) -> list[Episode]:
    """``n`` two-turn Blackjack-like episodes with different rewards."""
    return [
        Episode(
            system_prompt=SYSTEM,
            observations=[f"your sum is {12 + i} .", f"your sum is {15 + i} ."],
            responses=["hit", "stick" if i % 2 else "hit"],
            rewards=[0.0, 1.0 - 0.5 * i],
            invalid=[False, False],
            terminated=True,
        )
        for i in range(n)
    ]


def scored_batch(policy: PolicyWithValueHead, tokenizer: PreTrainedTokenizerBase, n: int = 4) -> dict:
    """A PPO minibatch of all ``n`` episodes, prepared by ``policy`` (old log-probs, GAE)."""
    buf = build_buffer(tokenizer, episodes(n))
    prepare_rollout(policy, buf, GenerateStyle(), gamma=1.0, gae_lambda=0.95, batch_size=n)
    return row_minibatch(buf, list(range(n)))


def perturb_trainable(module: torch.nn.Module, seed: int = 1, std: float = 0.05) -> None:
    """Add noise to every trainable weight: a stand-in for training (LoRA B starts at 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * std)


def save_checkpoint(module: L.LightningModule, path: Path) -> Path:
    """Write a Lightning checkpoint of ``module`` without running ``fit``."""
    trainer = L.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu"
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def turn_text(tokenizer: PreTrainedTokenizerBase, buf: RolloutBuffer, row: int, turn: int) -> str:
    """The text of turn ``turn``'s reply tokens in buffer row ``row``."""
    ids = buf.input_ids[row][buf.turn_index[row] == turn].tolist()
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
