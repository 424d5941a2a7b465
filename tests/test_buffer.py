"""Rollout buffer layout, minibatch sampling and preparation, on hand-made episodes."""

from __future__ import annotations

import pytest
import torch
from model_helpers import turn_text
from transformers import PreTrainedTokenizerBase

from llamagym_pl import ppo
from llamagym_pl.actions.generate import GenerateStyle
from llamagym_pl.actions.generate import row_minibatch as minibatch
from llamagym_pl.buffer import RolloutBuffer, build_buffer
from llamagym_pl.episode import Episode
from llamagym_pl.minibatches import MAX_PADDING, MinibatchSampler, length_groups
from llamagym_pl.policy import PolicyWithValueHead
from llamagym_pl.update import prepare_rollout

SYSTEM = "you are an expert blackjack player."
OBS = ["your sum is 12.", "your sum is 15.", "your sum is 19."]


def make_episodes() -> list[Episode]:
    """A terminated, a truncated (time limit) and a rollout-cut episode."""
    return [
        Episode(SYSTEM, OBS[:2], ["hit", "stick"], [0.0, 1.0], [False, False], 1.0, terminated=True),
        # Truncated after one turn: the next observation is kept to bootstrap from.
        Episode(SYSTEM, OBS[:2], ["hit"], [-0.5], [True], 0.0, truncated=True),
        # Cut by the step budget after two turns: neither flag, a trailing observation.
        Episode(SYSTEM, OBS, ["hit", "hit again"], [0.0, 0.25], [False, False], 0.25),
    ]


@pytest.mark.parametrize("fixture", ["tiny_tokenizer", "llama2_tokenizer", "chatml_tokenizer"])
def test_action_tokens_decode_to_responses(fixture: str, request: pytest.FixtureRequest) -> None:
    tokenizer = request.getfixturevalue(fixture)
    episodes = make_episodes()
    buf = build_buffer(tokenizer, episodes)
    for row, ep in enumerate(episodes):
        assert [turn_text(tokenizer, buf, row, t) for t in range(ep.num_turns)] == ep.responses
        assert torch.equal(buf.action_mask[row], buf.turn_index[row] >= 0)
        for t in range(ep.num_turns):
            first = int((buf.turn_index[row] == t).nonzero()[0])
            # The value of turn t is read on the last prompt token, right before its reply.
            assert int(buf.value_positions[row, t]) == first - 1
            assert not buf.action_mask[row, first - 1]


def test_buffer_layout_of_terminated_truncated_and_cut_episodes(
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    episodes = make_episodes()
    buf = build_buffer(tiny_tokenizer, episodes)
    assert len(buf) == 3
    assert not buf.prepared
    lengths = buf.lengths.tolist()
    max_len = max(lengths)
    assert buf.input_ids.shape == (3, max_len)
    assert buf.rewards.shape == buf.turn_mask.shape == buf.value_positions.shape == (3, 2)

    assert buf.turn_mask.tolist() == [[True, True], [True, False], [True, True]]
    torch.testing.assert_close(buf.rewards, torch.tensor([[0.0, 1.0], [-0.5, 0.0], [0.0, 0.25]]))
    assert buf.terminated.tolist() == [True, False, False]

    # Terminated: nothing to bootstrap. Truncated and cut: the last token, which ends the
    # generation prompt of the trailing observation, after every action token.
    assert int(buf.bootstrap_position[0]) == 0
    assistant = tiny_tokenizer.convert_tokens_to_ids("<|assistant|>")
    for row in (1, 2):
        pos = int(buf.bootstrap_position[row])
        assert pos == lengths[row] - 1
        assert int(buf.input_ids[row, pos]) == assistant
        assert pos > int(buf.turn_index[row].eq(episodes[row].num_turns - 1).nonzero().max())
    # Every turn's value position is also the end of a generation prompt.
    for row, ep in enumerate(episodes):
        for t in range(ep.num_turns):
            assert int(buf.input_ids[row, buf.value_positions[row, t]]) == assistant

    # Right padding: the mask covers exactly `lengths`, padding is pad tokens outside any turn.
    for row, n in enumerate(lengths):
        assert buf.attention_mask[row].tolist() == [1] * n + [0] * (max_len - n)
        assert (buf.input_ids[row, n:] == tiny_tokenizer.pad_token_id).all()
        assert (buf.turn_index[row, n:] == -1).all()
        assert not buf.action_mask[row, n:].any()


def test_build_buffer_refuses_an_empty_rollout(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="no episodes"):
        build_buffer(tiny_tokenizer, [])


LENGTHS = torch.tensor([30, 12, 45, 12, 7, 50, 22, 31, 8, 19])


def test_sampler_yields_permutations_of_all_episodes() -> None:
    sampler = MinibatchSampler(LENGTHS, num_minibatches=3, update_epochs=2, seed=5)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 6
    for p in range(2):
        one_pass = batches[3 * p : 3 * p + 3]
        assert sorted(i for mb in one_pass for i in mb) == list(range(len(LENGTHS)))
        assert sorted(len(mb) for mb in one_pass) == [3, 3, 4]
    # The two passes are shuffled differently.
    assert batches[:3] != batches[3:]


def test_sampler_never_groups_by_length() -> None:
    """A row's length depends on the actions taken: minibatches must not (issue #15)."""
    reversed_lengths = LENGTHS.flip(0)
    draw = lambda lengths: list(MinibatchSampler(lengths, num_minibatches=3, update_epochs=2, seed=5))  # noqa: E731
    assert draw(LENGTHS) == draw(reversed_lengths) == draw(torch.zeros_like(LENGTHS))


def test_length_groups_by_hand() -> None:
    # Blackjack-like rows of 1-4 turns. Sorted: 33 33 33 | 56 56 | 79 | 102 -- adding 56 to the
    # 33s would pad (4 * 56 - 155) / 224 = 31%, 79 to the 56s 19%, 102 to the 79 11% > 10%.
    lengths = [33, 56, 33, 79, 102, 56, 33]
    assert length_groups(lengths) == [[0, 2, 6], [1, 5], [3], [4]]
    # At 30%: 56 56 79 102 pad (408 - 293) / 408 = 28%.
    assert length_groups(lengths, max_padding=0.3) == [[0, 2, 6], [1, 5, 3, 4]]
    assert length_groups([7]) == [[0]]


def test_length_groups_cover_the_minibatch_within_the_padding_bound() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        lengths = torch.randint(
            1, 200, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen
        ).tolist()
        groups = length_groups(lengths)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            longest, total = max(lengths[i] for i in g), sum(lengths[i] for i in g)
            assert len(g) * longest - total <= MAX_PADDING * len(g) * longest + 1e-9


def test_sampler_is_deterministic_per_seed() -> None:
    def draw(seed: int) -> list[list[int]]:
        return list(MinibatchSampler(LENGTHS, num_minibatches=3, update_epochs=2, seed=seed))

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)


def test_sampler_refuses_fewer_episodes_than_minibatches() -> None:
    with pytest.raises(ValueError, match="fewer than num_minibatches=4"):
        MinibatchSampler(torch.tensor([3, 4, 5]), num_minibatches=4, update_epochs=1, seed=0)


def _hand_prepared(tokenizer: PreTrainedTokenizerBase) -> RolloutBuffer:
    buf = build_buffer(tokenizer, make_episodes())
    e, t = buf.turn_mask.shape
    buf.old_logprobs = -torch.arange(buf.input_ids.numel(), dtype=torch.float32).view_as(buf.input_ids) / 100
    buf.advantages = torch.tensor([[1.5, -2.0], [3.0, 0.0], [-4.0, 5.0]])
    buf.old_values = torch.arange(e * t, dtype=torch.float32).view(e, t) + 10
    buf.returns = buf.old_values + buf.advantages
    buf.pg_advantages = buf.advantages  # what the policy loss spreads over a turn's tokens
    return buf


def test_minibatch_spreads_turn_advantages_to_their_tokens(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    buf = _hand_prepared(tiny_tokenizer)
    for index in ([2, 0], [1], [0, 1, 2]):
        mb = minibatch(buf, index)
        length = int(buf.lengths[index].max())
        turns = int(buf.turn_mask[index].sum(1).max())
        assert mb["input_ids"].shape == (len(index), length)
        assert mb["turn_mask"].shape == (len(index), turns)
        assert torch.equal(mb["input_ids"], buf.input_ids[index, :length])
        assert torch.equal(mb["old_logprobs"], buf.old_logprobs[index, :length])
        assert torch.equal(mb["action_mask"], buf.action_mask[index, :length])
        assert torch.equal(mb["returns"], buf.returns[index, :turns])
        assert torch.equal(mb["old_values"], buf.old_values[index, :turns])
        assert torch.equal(mb["value_positions"], buf.value_positions[index, :turns])
        for row, e in enumerate(index):
            for i in range(length):
                turn = int(buf.turn_index[e, i])
                expected = float(buf.advantages[e, turn]) if turn >= 0 else 0.0
                assert float(mb["token_advantages"][row, i]) == expected, (e, i, turn)
        # Each response token carries a (nonzero) advantage; nothing else does.
        assert torch.equal(mb["token_advantages"] != 0, mb["action_mask"])


def test_minibatch_needs_a_prepared_buffer(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(RuntimeError, match="prepared"):
        minibatch(build_buffer(tiny_tokenizer, make_episodes()), [0])


def test_prepare_rollout_matches_a_direct_forward_and_gae(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    episodes = make_episodes()
    buf = build_buffer(tiny_tokenizer, episodes)
    gamma, lam = 0.9, 0.8
    tiny_policy.train()
    # batch_size=2 scores a padded batch of two, then one episode alone.
    out = prepare_rollout(tiny_policy, buf, GenerateStyle(), gamma=gamma, gae_lambda=lam, batch_size=2)
    assert tiny_policy.training, "prepare_rollout must restore the policy's mode"
    assert buf.prepared

    tiny_policy.eval()
    values = []
    next_value = torch.zeros(len(episodes))
    with torch.no_grad():
        for row in range(len(episodes)):
            n = int(buf.lengths[row])
            ids = buf.input_ids[row : row + 1, :n]  # (1, n)
            logits, v = tiny_policy(ids, torch.ones_like(ids))
            direct = ppo.token_logprobs(logits[:, :-1], ids[:, 1:])[0]  # (n - 1,)
            # The reply tokens' log-probs, the only ones read; 0 elsewhere (token 0 has no prediction).
            expected = torch.where(buf.action_mask[row, 1:n], direct, 0.0)
            torch.testing.assert_close(buf.old_logprobs[row, 1:n], expected, rtol=1e-5, atol=1e-5)
            assert buf.old_logprobs[row, 0] == 0 and buf.action_mask[row].sum() > 0
            values.append(v[0])
            if not episodes[row].terminated:
                next_value[row] = v[0, buf.bootstrap_position[row]]

    old_values = torch.zeros_like(buf.rewards)
    for row, ep in enumerate(episodes):
        for t in range(ep.num_turns):
            old_values[row, t] = values[row][buf.value_positions[row, t]]
    torch.testing.assert_close(buf.old_values, old_values, rtol=1e-5, atol=1e-5)

    adv, ret = ppo.compute_gae(buf.rewards, old_values, buf.turn_mask, next_value, buf.terminated, gamma, lam)
    torch.testing.assert_close(buf.advantages, adv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buf.returns, ret, rtol=1e-5, atol=1e-5)

    # Closed forms: the terminated episode ends at 0, the truncated one bootstraps.
    v0, v1 = old_values[0]
    a1 = 1.0 - v1
    torch.testing.assert_close(buf.advantages[0], torch.stack([0.0 + gamma * v1 - v0 + gamma * lam * a1, a1]))
    torch.testing.assert_close(
        buf.advantages[1, 0], -0.5 + gamma * next_value[1] - old_values[1, 0], rtol=1e-5, atol=1e-5
    )
    assert out["rollout/value_mean"] == pytest.approx(float(old_values[buf.turn_mask].mean()), abs=1e-5)
    assert out["rollout/advantage_mean"] == pytest.approx(float(adv[buf.turn_mask].mean()), abs=1e-5)
