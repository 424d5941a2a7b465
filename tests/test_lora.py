"""LoRA adapters, the reference-KL penalty and checkpoints of LoRA runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_helpers import episodes, perturb_trainable, save_checkpoint, scored_batch
from transformers import PreTrainedTokenizerBase

from llamagym_pl import ppo
from llamagym_pl.actions import GenerateStyle
from llamagym_pl.buffer import build_buffer
from llamagym_pl.fit import build_cli
from llamagym_pl.kl import KLController, ReferencePolicy, turn_kl
from llamagym_pl.loading import build_policy, load_causal_lm
from llamagym_pl.module import PPOModule
from llamagym_pl.policy import PolicyWithValueHead, is_peft
from llamagym_pl.update import minibatch_loss, prepare_rollout

LORA_YAML = Path(__file__).parents[1] / "experiments" / "blackjack-lora.yaml"


def _train_steps(policy: PolicyWithValueHead, batch: dict, steps: int = 3) -> None:
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        loss, _ = minibatch_loss(GenerateStyle(), policy, batch, 0.2, True, 0.5, 0.01)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _logprobs(policy: PolicyWithValueHead, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = policy.eval()(ids, torch.ones_like(ids))
    return ppo.token_logprobs(logits[:, :-1], ids[:, 1:])


def _reference_logprobs(reference: ReferencePolicy, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi_ref(token i + 1 | tokens <= i), (B, L) -> (B, L - 1), from the reference's full logits."""
    with torch.no_grad(), reference.as_policy(ids.device) as initial:
        logits = initial.lm(input_ids=ids, attention_mask=mask).logits  # (B, L, V)
    return ppo.token_logprobs(logits[:, :-1], ids[:, 1:])


def test_only_lora_and_value_head_train_and_base_stays_bit_identical(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    policy = build_policy(str(tiny_model_dir), lora_r=4, lora_alpha=8)
    trainable = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("value_head.") for n in trainable)
    frozen = {k: v.clone() for k, v in policy.state_dict().items() if k not in trainable}
    _train_steps(policy, scored_batch(policy, tiny_tokenizer))
    after = policy.state_dict()
    for name, before in frozen.items():
        assert torch.equal(after[name], before), f"frozen weight {name} changed"
    changed = [n for n, before in trainable.items() if not torch.equal(after[n], before)]
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    assert "value_head.summary.weight" in changed


def test_lora_r_zero_trains_every_weight(tiny_model_dir: Path) -> None:
    policy = build_policy(str(tiny_model_dir), lora_r=0)
    assert not is_peft(policy.lm) and all(p.requires_grad for p in policy.parameters())


def test_target_modules_can_be_listed(tiny_model_dir: Path) -> None:
    policy = build_policy(str(tiny_model_dir), lora_r=2, lora_target_modules=["q_proj", "v_proj"])
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in policy.named_parameters() if ".lora_" in n}
    assert adapted == {"q_proj", "v_proj"}


def test_gradient_checkpointing_gives_the_same_gradients(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        policy = build_policy(str(tiny_model_dir), lora_r=4, gradient_checkpointing=checkpointing)
        perturb_trainable(policy)
        batch = scored_batch(policy, tiny_tokenizer)
        loss, _ = minibatch_loss(GenerateStyle(), policy.train(), batch, 0.2, True, 0.5, 0.0)
        loss.backward()
        grads.append({n: p.grad for n, p in policy.named_parameters() if p.requires_grad})
    assert policy.lm.is_activation_checkpointing
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


# --------------------------------------------------------------------------- reference KL
def test_lora_reference_is_the_base_with_the_adapter_off(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    policy = build_policy(str(tiny_model_dir), lora_r=4)
    reference = ReferencePolicy(policy)
    assert reference.shares_weights, "with LoRA the reference must not copy the model"
    ids = build_buffer(tiny_tokenizer, episodes(2)).input_ids
    initial = _logprobs(policy, ids)
    perturb_trainable(policy)
    policy.train()
    ref = _reference_logprobs(reference, ids, torch.ones_like(ids))
    assert policy.training, "the reference must leave the policy's mode alone"
    torch.testing.assert_close(ref, initial, rtol=0, atol=1e-6)
    base = PolicyWithValueHead(load_causal_lm(str(tiny_model_dir)))
    torch.testing.assert_close(ref, _logprobs(base, ids), rtol=0, atol=1e-6)
    assert not torch.allclose(_logprobs(policy, ids), initial, atol=1e-3), "the policy itself moved"


def test_full_finetune_reference_is_a_frozen_initial_copy_outside_the_module(tiny_model_dir: Path) -> None:
    module = PPOModule(name_or_path=str(tiny_model_dir), kl_coef=0.1)
    ids = torch.tensor([[1, 5, 9, 14, 30, 2]])
    initial = _logprobs(module.policy, ids)
    perturb_trainable(module.policy)
    module.train()
    ref = _reference_logprobs(module.reference, ids, torch.ones_like(ids))
    torch.testing.assert_close(ref, initial, rtol=0, atol=0)
    frozen = list(module.reference.frozen.parameters())
    assert not module.reference.frozen.training and not any(p.requires_grad for p in frozen)
    assert {id(p) for p in frozen}.isdisjoint(id(p) for p in module.parameters())
    assert all(k.startswith("policy.") for k in module.state_dict()), "the copy is never checkpointed"


def test_turn_kl_sums_each_turns_tokens() -> None:
    logprobs = torch.tensor([[0.0, -1.0, -2.0, -0.5, -0.1, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, -0.5, -0.6, 0.0]])
    action = torch.tensor([[False, True, True, False, True, False]])
    turn_index = torch.tensor([[-1, 0, 0, -1, 1, -1]])
    expected = torch.tensor([[0.5 + -1.0, 0.5, 0.0]])  # turn 2 has no tokens
    torch.testing.assert_close(turn_kl(logprobs, ref, action, turn_index, 3), expected)


def test_kl_controller_fixed_adaptive_and_state() -> None:
    fixed = KLController(0.1)
    fixed.update(kl=50.0, n_steps=1000)
    assert fixed.value == 0.1
    ctl = KLController(0.1, target=1.0, horizon=100)
    ctl.update(kl=3.0, n_steps=10)  # error clipped to +0.2: * (1 + 0.2 * 10 / 100)
    assert ctl.value == pytest.approx(0.1 * 1.02)
    ctl.update(kl=0.9, n_steps=50)  # error -0.1: * (1 - 0.1 * 0.5)
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.95)
    restored = KLController(0.1, target=1.0, horizon=100)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    with pytest.raises(ValueError, match="kl_coef > 0"):
        KLController(0.0, target=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        KLController(-0.1)


def test_prepare_rollout_subtracts_the_kl_penalty_from_turn_rewards(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    policy = build_policy(str(tiny_model_dir), lora_r=4)
    perturb_trainable(policy)
    reference = ReferencePolicy(policy)
    buf = build_buffer(tiny_tokenizer, episodes(4))
    raw_rewards = buf.rewards.clone()
    metrics = prepare_rollout(
        policy, buf, GenerateStyle(), 0.9, 0.8, batch_size=3, reference=reference, kl_coef=0.5
    )
    ref = torch.zeros_like(buf.old_logprobs)
    ref[:, 1:] = _reference_logprobs(reference, buf.input_ids, buf.attention_mask)
    kl = turn_kl(buf.old_logprobs, ref, buf.action_mask, buf.turn_index, buf.turn_mask.shape[1])  # (E, T)
    assert kl.abs().sum() > 0
    next_value = torch.zeros(len(buf))  # every episode terminated
    expected, _ = ppo.compute_gae(
        raw_rewards - 0.5 * kl, buf.old_values, buf.turn_mask, next_value, buf.terminated, 0.9, 0.8
    )
    torch.testing.assert_close(buf.advantages, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(buf.rewards, raw_rewards), "the env rewards stay as they were"
    assert metrics["train/kl_ref"] == pytest.approx(float(ppo.masked_mean(kl, buf.turn_mask)), abs=1e-5)


# --------------------------------------------------------------------------- checkpoints and YAML
def test_lora_checkpoint_holds_only_trainable_weights_and_restores(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    module = PPOModule(name_or_path=str(tiny_model_dir), lora_r=4, kl_coef=0.1, target_kl_ref=1.0)
    perturb_trainable(module)
    module.kl_ctl.value = 0.123
    path = save_checkpoint(module, tmp_path / "lora.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(checkpoint["state_dict"]) == trainable
    assert checkpoint["kl_controller"] == {"kl_coef": 0.123}
    restored = PPOModule.load_from_checkpoint(path, weights_only=True)
    assert restored.kl_ctl.value == 0.123
    ids = torch.tensor([[1, 5, 9, 14, 30, 2]])
    with torch.no_grad():
        logits, values = module.eval().policy(ids, torch.ones_like(ids))
        logits_r, values_r = restored.eval().policy(ids, torch.ones_like(ids))
    torch.testing.assert_close(logits_r, logits, rtol=0, atol=0)
    torch.testing.assert_close(values_r, values, rtol=0, atol=0)


def test_lora_experiment_config_and_a_short_resumed_fit(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = ["--config", str(LORA_YAML), "--model.name_or_path", str(tiny_model_dir)]
    args += ["--data.num_envs", "4", "--data.steps_per_env", "2", "--model.num_minibatches", "2"]
    args += ["--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.precision", "32"]
    args += ["--checkpoint.dirpath", str(tmp_path / "ckpt"), "--trainer.enable_progress_bar", "false"]
    cli = build_cli(args=[*args, "--trainer.max_epochs", "1"], run_fit=False)
    hp = cli.model.hparams
    assert (hp.lora_r, hp.lora_alpha, hp.lora_target_modules, hp.kl_coef) == (16, 32, "all-linear", 0.05)
    assert is_peft(cli.model.policy.lm) and cli.model.reference.shares_weights
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    logged = cli.trainer.callback_metrics
    assert "train/kl_ref" in logged and float(logged["train/kl_coef"]) == pytest.approx(0.05)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["kl_controller"]["kl_coef"] != 0.05, "the adaptive coefficient moved after one rollout"
    resumed = build_cli(args=[*args, "--trainer.max_epochs", "2"], run_fit=False)
    resumed.trainer.fit(
        resumed.model, datamodule=resumed.datamodule, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    # Epoch 2 penalized with the coefficient restored from the checkpoint, not the YAML's 0.05.
    assert float(resumed.trainer.callback_metrics["train/kl_coef"]) == pytest.approx(
        saved["kl_controller"]["kl_coef"]
    )


def test_checkpoint_without_weights_restores_the_kl_controller(tiny_model_dir: Path) -> None:
    """FSDP's strategy loads the weights itself and removes ``state_dict`` before the module's
    hook runs: the hook must still restore the KL controller, and not fail on the missing key."""
    module = PPOModule(name_or_path=str(tiny_model_dir), lora_r=4, kl_coef=0.1, target_kl_ref=1.0)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.on_load_checkpoint({"kl_controller": {"kl_coef": 0.321}})
    assert module.kl_ctl.value == 0.321
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
