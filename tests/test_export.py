"""`python -m llamagym_pl.export`: adapter, value head, tokenizer and merged model round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_helpers import perturb_trainable, save_checkpoint
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from llamagym_pl.export import ADAPTER_DIR, export, load_value_head, main
from llamagym_pl.loading import load_causal_lm
from llamagym_pl.module import PPOModule

IDS = torch.tensor([[1, 5, 9, 14, 30, 2, 40, 41]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits


def _trained_checkpoint(model_dir: Path, tmp_path: Path, **hparams) -> tuple[PPOModule, Path]:
    module = PPOModule(name_or_path=str(model_dir), **hparams)
    perturb_trainable(module)  # stands in for training: LoRA B and the value head move off init
    return module.eval(), save_checkpoint(module, tmp_path / "trained.ckpt")


def _check_value_head_and_tokenizer(module: PPOModule, out: Path) -> None:
    head = load_value_head(out)
    for name, tensor in module.policy.value_head.state_dict().items():
        assert torch.equal(head[name], tensor), name
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token == module.tokenizer.pad_token
    assert tokenizer.chat_template == module.tokenizer.chat_template


def test_lora_export_merged_and_adapter_reproduce_the_policy(tiny_model_dir: Path, tmp_path: Path) -> None:
    module, ckpt = _trained_checkpoint(tiny_model_dir, tmp_path, lora_r=4, kl_coef=0.05)
    out = export(ckpt, tmp_path / "out", merge=True)
    policy_logits = _logits(module.policy.lm)
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(merged), policy_logits, rtol=1e-5, atol=1e-5)
    adapted = PeftModel.from_pretrained(load_causal_lm(str(tiny_model_dir)), out / ADAPTER_DIR)
    torch.testing.assert_close(_logits(adapted), policy_logits, rtol=1e-5, atol=1e-5)
    _check_value_head_and_tokenizer(module, out)


def test_lora_export_without_merge_writes_only_the_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    _, ckpt = _trained_checkpoint(tiny_model_dir, tmp_path, lora_r=4)
    out = export(ckpt, tmp_path / "out")
    assert (out / ADAPTER_DIR / "adapter_config.json").exists()
    assert not (out / "config.json").exists(), "no full model without --merge"


def test_full_finetune_export_is_a_plain_hf_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    module, ckpt = _trained_checkpoint(tiny_model_dir, tmp_path)
    main(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "out")])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(_logits(exported), _logits(module.policy.lm), rtol=0, atol=0)
    assert not (tmp_path / "out" / ADAPTER_DIR).exists()
    _check_value_head_and_tokenizer(module, tmp_path / "out")


def test_qlora_export_adapter_on_4bit_base_and_merge_in_full_precision(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("bitsandbytes")
    module, ckpt = _trained_checkpoint(tiny_model_dir, tmp_path, lora_r=4, quantization="4bit")
    out = export(ckpt, tmp_path / "out", merge=True)
    policy_logits = _logits(module.policy.lm)
    quantized_base = load_causal_lm(str(tiny_model_dir), quantization="4bit")
    adapted = PeftModel.from_pretrained(quantized_base, out / ADAPTER_DIR)
    torch.testing.assert_close(_logits(adapted), policy_logits, rtol=1e-5, atol=1e-5)
    # The merged model is the unquantized base plus the adapter: close to, not equal to, the
    # 4-bit policy, and exactly the full-precision base with the adapter applied.
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("4bit" in type(m).__name__ for m in merged.modules())
    full = PeftModel.from_pretrained(load_causal_lm(str(tiny_model_dir)), out / ADAPTER_DIR)
    torch.testing.assert_close(_logits(merged), _logits(full), rtol=1e-5, atol=1e-5)
