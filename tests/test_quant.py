"""4-bit (QLoRA) and 8-bit base models with LoRA on top, on the CPU via bitsandbytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_helpers import perturb_trainable, save_checkpoint, scored_batch
from transformers import PreTrainedTokenizerBase

from llamagym_pl.actions import GenerateStyle
from llamagym_pl.fit import build_cli
from llamagym_pl.loading import build_policy
from llamagym_pl.module import PPOModule
from llamagym_pl.policy import PolicyWithValueHead, is_peft
from llamagym_pl.update import minibatch_loss

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")

QLORA_YAML = Path(__file__).parents[1] / "experiments" / "blackjack-qlora.yaml"
LAYER = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}


def _quantized_policy(model_dir: Path, quantization: str, seed: int = 0) -> PolicyWithValueHead:
    torch.manual_seed(seed)  # LoRA A's initialisation
    policy = build_policy(str(model_dir), quantization=quantization, lora_r=4, lora_alpha=8)
    perturb_trainable(policy)  # nonzero LoRA B, so every LoRA weight gets a gradient
    return policy


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_lora_step(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase, quantization: str
) -> None:
    policy = _quantized_policy(tiny_model_dir, quantization)
    layers = {type(m).__name__ for m in policy.lm.modules()}
    assert LAYER[quantization] in layers, f"no {LAYER[quantization]} in {sorted(layers)}"
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert all(".lora_" in n or n.startswith("value_head.") for n in trainable)
    frozen = {k: v.clone() for k, v in policy.state_dict().items() if k not in trainable}

    batch = scored_batch(policy, tiny_tokenizer)
    assert torch.isfinite(batch["old_logprobs"]).all() and (batch["old_logprobs"] <= 0).all()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss, metrics = minibatch_loss(GenerateStyle(), policy.train(), batch, 0.2, True, 0.5, 0.01)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
        optimizer.zero_grad()
        loss.backward()
        no_grad = [n for n, p in policy.named_parameters() if p.requires_grad and not p.grad.abs().sum() > 0]
        assert not no_grad, f"no gradient reached {no_grad[:3]}"
        optimizer.step()
    after = policy.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items()), "quantized base weights changed"


def test_4bit_gradients_survive_an_eval_forward(tiny_model_dir: Path) -> None:
    """Rollouts run in eval mode; bitsandbytes must not switch to its grad-less CPU kernel after."""
    ids = torch.tensor([[1, 5, 9, 14, 30, 2, 7, 8]])
    grads = []
    for eval_first in (False, True):
        policy = _quantized_policy(tiny_model_dir, "4bit")
        if eval_first:
            with torch.no_grad():
                policy.eval()(ids, torch.ones_like(ids))
        logits, _ = policy.train()(ids, torch.ones_like(ids))
        logits.logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in policy.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_8bit_gradients_approximate_full_precision(tiny_model_dir: Path) -> None:
    ids = torch.tensor([[1, 5, 9, 14, 30, 2, 7, 8]])
    grads = []
    for quantization in ("none", "8bit"):
        policy = _quantized_policy(tiny_model_dir, quantization)
        logits, _ = policy.train()(ids, torch.ones_like(ids))
        logits.logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in policy.named_parameters() if ".lora_" in n})
    for name, grad in grads[0].items():
        assert (grads[1][name] - grad).norm() <= 0.1 * grad.norm(), name


def test_quantization_needs_lora(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="lora_r > 0"):
        build_policy(str(tiny_model_dir), quantization="4bit")
    with pytest.raises(ValueError, match="quantization"):
        build_policy(str(tiny_model_dir), quantization="3bit", lora_r=4)


def test_qlora_checkpoint_round_trip(tiny_model_dir: Path, tmp_path: Path) -> None:
    module = PPOModule(name_or_path=str(tiny_model_dir), quantization="4bit", lora_r=4)
    perturb_trainable(module)
    path = save_checkpoint(module, tmp_path / "qlora.ckpt")
    restored = PPOModule.load_from_checkpoint(path, weights_only=True)
    ids = torch.tensor([[1, 5, 9, 14, 30, 2]])
    with torch.no_grad():
        logits, values = module.eval().policy(ids, torch.ones_like(ids))
        logits_r, values_r = restored.eval().policy(ids, torch.ones_like(ids))
    torch.testing.assert_close(logits_r, logits, rtol=0, atol=0)
    torch.testing.assert_close(values_r, values, rtol=0, atol=0)


def test_qlora_experiment_config_runs_on_cpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = ["--config", str(QLORA_YAML), "--model.name_or_path", str(tiny_model_dir)]
    args += ["--data.num_envs", "4", "--data.steps_per_env", "2", "--model.num_minibatches", "2"]
    args += ["--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.max_epochs", "1"]
    args += ["--checkpoint.dirpath", str(tmp_path / "ckpt"), "--trainer.enable_progress_bar", "false"]
    cli = build_cli(args=args, run_fit=False)
    hp, lm = cli.model.hparams, cli.model.policy.lm
    assert (hp.quantization, hp.dtype, hp.lora_r, hp.gradient_checkpointing) == ("4bit", "bfloat16", 16, True)
    assert is_peft(lm) and lm.is_activation_checkpointing and cli.trainer.precision == "bf16-mixed"
    linear4 = [m for m in lm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4 and all(m.compute_dtype == torch.bfloat16 for m in linear4)
    assert linear4[0].weight.quant_state.quant_type == "nf4"
    trainable = [p for p in cli.model.parameters() if p.requires_grad]  # adapter and value head
    assert trainable and all(p.dtype == torch.float32 for p in trainable), "AdamW needs fp32 weights"
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert "train/kl_ref" in cli.trainer.callback_metrics
