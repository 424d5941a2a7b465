"""`update.prepare_rollout`: format penalties stay on their own turn; returns are env returns."""

from __future__ import annotations

import pytest
import torch
from model_helpers import perturb_trainable
from transformers import PreTrainedTokenizerBase

from llamagym_pl import ppo
from llamagym_pl.actions import GenerateStyle, RolloutDataset
from llamagym_pl.actions.generate import row_minibatch
from llamagym_pl.buffer import build_buffer
from llamagym_pl.episode import Episode
from llamagym_pl.policy import PolicyWithValueHead
from llamagym_pl.update import fusable, make_optimizer, minibatch_loss, minibatch_size, prepare_rollout


def test_penalty_is_added_to_its_turn_advantage_only(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    # Turn 1 valid (hit), turn 2 invalid (penalty -1), then the env pays +1 and terminates.
    ep = Episode(
        system_prompt="play",
        observations=["your sum is 12 .", "your sum is 19 ."],
        responses=["hit", "what"],
        rewards=[0.0, 1.0],
        penalties=[0.0, -1.0],
        invalid=[False, True],
        env_return=1.0,
        terminated=True,
    )
    clean = Episode(**{**ep.__dict__, "penalties": [0.0, 0.0]})
    with_penalty, without = build_buffer(tiny_tokenizer, [ep]), build_buffer(tiny_tokenizer, [clean])
    for buf in (with_penalty, without):
        prepare_rollout(tiny_policy, buf, GenerateStyle(), gamma=1.0, gae_lambda=1.0, batch_size=4)

    # Hand values: with lambda = gamma = 1, A_t = G_t - V_t on env rewards, G = [1, 1].
    v = without.old_values[0]
    torch.testing.assert_close(without.advantages[0], torch.tensor([1.0, 1.0]) - v, atol=1e-6, rtol=0)
    torch.testing.assert_close(with_penalty.returns, without.returns, atol=0, rtol=0)
    # The penalty moves turn 2's advantage by exactly -1 and leaves turn 1's alone.
    delta = with_penalty.advantages - without.advantages
    torch.testing.assert_close(delta, torch.tensor([[0.0, -1.0]]), atol=1e-6, rtol=0)
    assert float(ppo.masked_mean(with_penalty.returns, with_penalty.turn_mask)) == 1.0


def _mixed_length_episodes() -> list[Episode]:
    """One- to three-turn episodes: rows of three lengths, as Blackjack's hands make them."""
    return [
        Episode(
            system_prompt="play",
            observations=[f"your sum is {10 + i + t} ." for t in range(n)],
            responses=["hit"] * (n - 1) + ["stick"],
            rewards=[0.0] * (n - 1) + [1.0 - 0.4 * i],
            invalid=[False] * n,
            terminated=True,
        )
        for i, n in enumerate([1, 3, 2, 1, 3, 2])
    ]


def test_a_minibatch_split_by_length_is_the_same_loss_and_gradient(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """RolloutDataset hands the loss a random minibatch as forwards of similar length: the loss,
    its diagnostics and its gradient are those of one forward over the whole minibatch."""
    buf = build_buffer(tiny_tokenizer, _mixed_length_episodes())
    style = GenerateStyle()
    prepare_rollout(tiny_policy, buf, style, gamma=1.0, gae_lambda=0.95, batch_size=8)
    perturb_trainable(tiny_policy)  # ratios away from 1, so clipping and the value terms matter
    index = list(range(len(buf)))
    parts = RolloutDataset(buf, style)[index]
    assert len(parts) == 3, "three row lengths, three forwards"

    def loss_and_grad(batch) -> tuple[dict[str, float], list[torch.Tensor]]:
        tiny_policy.zero_grad()
        loss, metrics = minibatch_loss(style, tiny_policy.train(), batch, 0.2, True, 0.5, 0.01)
        loss.backward()
        grads = [p.grad.clone() for p in tiny_policy.parameters() if p.grad is not None]
        return {k: float(v) for k, v in metrics.items()}, grads

    whole_metrics, whole_grads = loss_and_grad(row_minibatch(buf, index))
    calls: list[tuple[int, ...]] = []
    hook = tiny_policy.lm.register_forward_pre_hook(
        lambda _m, _a, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        split_metrics, split_grads = loss_and_grad(parts)
    finally:
        hook.remove()
    # The system prompt every row starts with runs once, with the three groups' rows packed in
    # the same forward (llamagym_pl.packing), not a forward each.
    assert len(calls) == 1
    for key, value in whole_metrics.items():
        assert split_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for a, b in zip(whole_grads, split_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert minibatch_size(parts) == minibatch_size(row_minibatch(buf, index)) == len(buf)


def test_no_entropy_bonus_gives_the_gradient_of_the_loss_with_its_zero_entropy_term(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """With ent_coef 0 the entropy is only a diagnostic, not backpropagated: the gradient is bit for
    bit that of the whole objective with its zero-weighted entropy term."""
    buf = build_buffer(tiny_tokenizer, _mixed_length_episodes())
    style = GenerateStyle()
    prepare_rollout(tiny_policy, buf, style, gamma=1.0, gae_lambda=0.95, batch_size=8)
    perturb_trainable(tiny_policy)
    parts = RolloutDataset(buf, style)[list(range(len(buf)))]
    tiny_policy.train()

    def grads_of(loss: torch.Tensor) -> list[torch.Tensor]:
        tiny_policy.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in tiny_policy.parameters() if p.grad is not None]

    loss, metrics = minibatch_loss(style, tiny_policy, parts, 0.2, True, 0.5, 0.0)
    assert not metrics["train/entropy"].requires_grad
    fast = grads_of(loss)
    terms = style.logprobs(tiny_policy, parts)
    turns = [part["turn_mask"] for part in parts]
    entropy = torch.cat([t.entropy for t in terms])
    assert entropy.requires_grad
    whole, whole_metrics = ppo.ppo_objective(
        torch.cat([t.logprobs for t in terms]),
        torch.cat([t.old_logprobs for t in terms]),
        torch.cat([t.advantages for t in terms]),
        entropy,
        torch.cat([t.values[m] for t, m in zip(terms, turns, strict=True)]),
        torch.cat([part["old_values"][m] for part, m in zip(parts, turns, strict=True)]),
        torch.cat([part["returns"][m] for part, m in zip(parts, turns, strict=True)]),
        torch.cat([m[m] for m in turns]),
        0.2,
        True,
        0.5,
        0.0,
    )
    assert torch.equal(whole.detach(), loss.detach())
    assert torch.equal(whole_metrics["train/entropy"], metrics["train/entropy"])
    for a, b in zip(grads_of(whole), fast, strict=True):
        assert torch.equal(a, b)


def test_adamw_runs_fused_where_it_can_with_the_plain_update() -> None:
    """make_optimizer's AdamW takes the fused kernel for plain float tensors on CPU, and its steps
    are the plain AdamW's up to float rounding."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(64, 32, generator=gen), torch.randn(32, generator=gen)]
    fused_params = [torch.nn.Parameter(w.clone()) for w in weights]
    plain_params = [torch.nn.Parameter(w.clone()) for w in weights]
    fused, _ = make_optimizer(fused_params, 1e-2, 1e-5, 0.01, "constant", None)
    plain = torch.optim.AdamW(plain_params, lr=1e-2, eps=1e-5, weight_decay=0.01)
    assert fused.param_groups[0]["fused"] is True and not fusable([])
    assert not fusable([torch.nn.Parameter(torch.zeros(2, dtype=torch.float64).to(torch.int64), False)])
    for _ in range(5):
        grads = [torch.randn(w.shape, generator=gen) for w in weights]
        for params, opt in ((fused_params, fused), (plain_params, plain)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(fused_params, plain_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
