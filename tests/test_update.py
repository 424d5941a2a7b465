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
from llamagym_pl.update import minibatch_loss, minibatch_size, prepare_rollout


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
    split_metrics, split_grads = loss_and_grad(parts)
    for key, value in whole_metrics.items():
        assert split_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for a, b in zip(whole_grads, split_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert minibatch_size(parts) == minibatch_size(row_minibatch(buf, index)) == len(buf)
