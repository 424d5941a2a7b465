"""Dropout is off in the policy itself, so PPO's ratio is exactly 1 before any update (issue #12).

The update runs in train mode (Lightning's ``training_step``; the imperative loop's optimizer
steps), the rollout and its old log-probs in eval mode. With dropout left on, the two modes
score the same tokens differently, and the first minibatch's ratio is not 1: approx-KL 3.9e-4
with a LoRA dropout of 0.05 and no optimizer step yet.
"""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import pytest
import torch
from model_helpers import build_family_model, perturb_trainable
from peft import LoraConfig, get_peft_model
from run_args import tiny_run_args
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from llamagym_pl.agents import BlackjackAgent
from llamagym_pl.fit import build_cli
from llamagym_pl.loading import add_lora
from llamagym_pl.policy import disable_dropout
from llamagym_pl.tb import read_scalars

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "blackjack.yaml"
LORA = ("--model.lora_r", "4", "--model.lora_dropout", "0.05")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gpt2_dir(chatml_tokenizer: PreTrainedTokenizerBase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 with the family's default dropouts (0.1 on embeddings, attention, residuals)."""
    return build_family_model("gpt2", chatml_tokenizer, tmp_path_factory.mktemp("gpt2"))


def train_logits(lm: nn.Module, seed: int) -> torch.Tensor:
    """Logits of one fixed batch in train mode, with the dropout masks drawn from ``seed``."""
    ids = torch.arange(3, 19).view(2, 8)  # (B, L)
    lm.train()
    torch.manual_seed(seed)
    with torch.no_grad():
        return lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # (B, L, V)


def eval_logits(lm: nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 19).view(2, 8)  # (B, L)
    with torch.no_grad():
        logits = lm.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # (B, L, V)
    lm.train()
    return logits


def test_disable_dropout_zeroes_lora_dropout_and_llama_functional_attention_dropout() -> None:
    """Llama has no dropout layer: its attention passes ``attention_dropout``, a float, to the
    kernel when in train mode. LoRA adds ``nn.Dropout`` layers."""
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_dropout=0.1,
    )
    torch.manual_seed(0)
    lm = add_lora(LlamaForCausalLM(config), r=4, alpha=8, dropout=0.05)
    perturb_trainable(lm)  # LoRA's B starts at 0, which would hide the adapter's dropout
    assert not torch.equal(train_logits(lm, 0), train_logits(lm, 1)), "dropout on before"
    layers = [m for m in lm.modules() if isinstance(m, nn.Dropout)]
    attention = [m for m in lm.modules() if "attention_dropout" in vars(m)]
    assert len(layers) == 2 * 7 and len(attention) == 2  # 7 adapted linears a layer; 2 layers

    assert disable_dropout(lm) == len(layers) + len(attention) + 1  # + the config's field
    assert all(m.p == 0.0 for m in layers)
    assert all(m.attention_dropout == 0.0 for m in attention)
    assert lm.config.attention_dropout == 0.0
    assert lm.training, "train mode stays (gradient checkpointing needs it)"
    torch.testing.assert_close(train_logits(lm, 0), eval_logits(lm), rtol=0, atol=0)
    assert disable_dropout(lm) == 0


def test_disable_dropout_zeroes_gpt2_dropout_layers_and_config() -> None:
    config = GPT2Config(
        vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=1
    )
    assert config.resid_pdrop == config.attn_pdrop == config.embd_pdrop == 0.1  # GPT-2's defaults
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(config)
    assert not torch.equal(train_logits(lm, 0), train_logits(lm, 1)), "dropout on before"
    assert disable_dropout(lm) > 0
    assert all(m.p == 0.0 for m in lm.modules() if isinstance(m, nn.Dropout))
    assert lm.config.resid_pdrop == lm.config.attn_pdrop == lm.config.embd_pdrop == 0.0
    torch.testing.assert_close(train_logits(lm, 0), eval_logits(lm), rtol=0, atol=0)


RATIO_ONE_KL = 1e-9
"""``train/approx_kl`` at ratio 1: 0 up to float rounding, since forwards of different batch shapes
(a minibatch's length groups against the preparation's chunks) round differently. Dropout left on
in the update gave 3.9e-4."""


def at_ratio_one(points: list[tuple[float, float]]) -> bool:
    """Both epochs' first minibatch at ratio 1: no approx-KL beyond rounding, nothing clipped."""
    return len(points) == 2 and all(abs(kl) < RATIO_ONE_KL and frac == 0.0 for kl, frac in points)


def first_minibatches(model_dir: Path, out: Path, *extra: str) -> list[tuple[float, float]]:
    """``(approx_kl, clipfrac)`` of each epoch of a two-epoch fit with one minibatch and one update
    epoch: each epoch's one step sees its whole rollout, scored before any optimizer step. Two
    epochs, because LoRA's B starts at 0, which hides the adapter's dropout until one update."""
    argv = tiny_run_args(CONFIG, model_dir, out, "--model.num_minibatches", "1", *extra, epochs=2)
    cli = build_cli(args=[*argv, "--trainer.check_val_every_n_epoch", "5"])
    scalars = read_scalars(cli.trainer.logger.log_dir)
    points = zip(scalars["train/approx_kl"], scalars["train/clipfrac"], strict=True)
    return [(kl, frac) for (_, kl), (_, frac) in points]


@pytest.mark.parametrize("policy", ["generate", "score"])
def test_ratio_is_exactly_one_before_the_first_update_with_lora_dropout(
    tiny_model_dir: Path, tmp_path: Path, policy: str
) -> None:
    assert at_ratio_one(first_minibatches(tiny_model_dir, tmp_path, "--data.policy", policy, *LORA))


@pytest.mark.parametrize("policy", ["generate", "score"])
def test_ratio_is_exactly_one_before_the_first_update_with_gpt2_dropouts(
    gpt2_dir: Path, tmp_path: Path, policy: str
) -> None:
    config = AutoModelForCausalLM.from_pretrained(gpt2_dir).config
    assert config.resid_pdrop == config.attn_pdrop == config.embd_pdrop == 0.1  # the case under test
    # The test tokenizer spells every space and word: a Blackjack prompt is ~51 tokens.
    budget = ("--data.max_prompt_tokens", "128")
    assert at_ratio_one(first_minibatches(gpt2_dir, tmp_path, "--data.policy", policy, *budget))


def imperative_approx_kl(model: object, tokenizer: PreTrainedTokenizerBase) -> list[float]:
    """``train/approx_kl`` of the imperative loop's first two updates: two episodes each, one
    minibatch and one update epoch, so each update's only step is scored before it steps."""
    env = gym.make("Blackjack-v1")
    config = {"batch_size": 2, "num_minibatches": 1, "update_epochs": 1, "action_space": env.action_space}
    agent = BlackjackAgent(model, tokenizer, "cpu", {"max_new_tokens": 2}, config)
    approx_kl = []
    for seed in range(4):
        observation, _ = env.reset(seed=seed)
        done = False
        while not done:
            observation, reward, terminated, truncated, _ = env.step(agent.act(observation))
            agent.assign_reward(float(reward))
            done = terminated or truncated
        stats = agent.terminate_episode()
        if stats:
            approx_kl.append(stats["train/approx_kl"])
    return approx_kl


def test_imperative_ratio_is_exactly_one_with_a_users_lora_model(tiny_model_dir: Path) -> None:
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lm = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear"))
    assert imperative_approx_kl(lm, AutoTokenizer.from_pretrained(tiny_model_dir)) == [0.0, 0.0]


def test_imperative_ratio_is_exactly_one_with_a_users_gpt2(gpt2_dir: Path) -> None:
    lm = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    assert imperative_approx_kl(lm, AutoTokenizer.from_pretrained(gpt2_dir)) == [0.0, 0.0]
