"""`update.prepare_rollout`: format penalties stay on their own turn; returns are env returns."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from llamagym_pl import ppo
from llamagym_pl.actions import GenerateStyle
from llamagym_pl.buffer import build_buffer
from llamagym_pl.episode import Episode
from llamagym_pl.policy import PolicyWithValueHead
from llamagym_pl.update import prepare_rollout


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
