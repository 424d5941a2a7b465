"""PPO is exact (issue #12): one advantage normalization per rollout (item 2), the sampling
temperature in every scored distribution (item 6), and score mode's KL from the candidate
distributions (item 8). Each is checked against hand values."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from llamagym_pl import decode as decode_module
from llamagym_pl import ppo
from llamagym_pl.actions import GenerateStyle, ScoreStyle
from llamagym_pl.actions.candidates import candidate_minibatch, turn_distribution
from llamagym_pl.actions.generate import cut_at_eos, row_minibatch
from llamagym_pl.actions.scoring import candidate_forward
from llamagym_pl.agents import BlackjackAgent
from llamagym_pl.buffer import build_buffer
from llamagym_pl.episode import Episode
from llamagym_pl.kl import ReferencePolicy
from llamagym_pl.policy import PolicyWithValueHead
from llamagym_pl.rollout import RolloutCollector
from llamagym_pl.update import minibatch_loss, prepare_rollout

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYSTEM = "you are an expert blackjack player ."
OBS = "your sum is 14 . the dealer shows 7 ."
ENV, KWARGS = "Blackjack-v1", {"natural": False, "sab": False}


def test_moments_whiten_like_masked_whiten_and_add_over_ranks() -> None:
    x = torch.tensor([[1.0, -2.0, 5.0], [0.5, 7.0, float("nan")]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    moments = ppo.masked_moments(x, mask)
    torch.testing.assert_close(moments, torch.tensor([4.0, 4.5, 30.25], dtype=torch.float64))
    # Mean 1.125, unbiased variance (30.25 - 4 * 1.125^2) / 3 = 8.395833...
    expected = (torch.tensor([1.0, -2.0, 5.0, 0.5]) - 1.125) / math.sqrt(30.25 / 3 - 4 * 1.125**2 / 3 + 1e-8)
    out = ppo.whiten_with_moments(x, mask, moments)
    torch.testing.assert_close(out[mask], expected, rtol=1e-6, atol=1e-6)
    assert out[1, 1] == 0 and out[1, 2] == 0
    torch.testing.assert_close(out, ppo.masked_whiten(x, mask), rtol=1e-6, atol=1e-6)
    # Two "ranks" holding one row each: their summed moments whiten each row as the whole would.
    halves = [ppo.masked_moments(x[i : i + 1], mask[i : i + 1]) for i in range(2)]
    torch.testing.assert_close(halves[0] + halves[1], moments)
    one = torch.tensor([[3.0]])  # a single element has no spread: shifted, not scaled
    assert float(ppo.whiten_with_moments(one, one > 0, ppo.masked_moments(one, one > 0))) == 0.0


def length_probe() -> list[Episode]:
    """Eight one-turn episodes on one prompt: a one-word reply earns +1, a long one -1."""
    short, long = "hit", "hit hit hit hit hit hit"
    return [
        Episode(SYSTEM, [OBS], [reply], [reward], [False], reward, terminated=True)
        for reply, reward in [(short, 1.0), (long, -1.0)] * 4
    ]


def test_advantages_are_normalized_once_per_rollout_not_per_length_sorted_minibatch(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Regression (item 2): per-minibatch whitening on length-sorted minibatches gave every
    token an advantage of exactly 0 here (the long and the short replies fell in different
    minibatches, each of equal advantages), so there was no policy gradient at all."""
    buf = build_buffer(tiny_tokenizer, length_probe())
    style = GenerateStyle()
    prepare_rollout(tiny_policy, buf, style, gamma=1.0, gae_lambda=0.95, batch_size=8)
    # One prompt, one value V: advantages are +1 - V and -1 - V, whitened over the 8 turns to
    # +-1 / sqrt(8 / 7) (unbiased variance 8 / 7).
    expected = torch.tensor([1.0, -1.0] * 4) / math.sqrt(8 / 7)
    torch.testing.assert_close(buf.pg_advantages[:, 0], expected, rtol=1e-5, atol=1e-5)
    # The two length-sorted halves, as the sampler once drew them: each holds one reward.
    order = torch.argsort(buf.train_lengths, stable=True).tolist()
    for index in (order[:4], order[4:]):
        rewards = buf.rewards[index, 0]
        assert len(set(rewards.tolist())) == 1, "each half holds one reply length"
        _, metrics = minibatch_loss(style, tiny_policy.eval(), row_minibatch(buf, index), 0.2, True, 0.5, 0.0)
        # At ratio 1 the policy loss is minus the mean token advantage: -(+-0.935), not 0.
        sign = float(rewards[0])
        torch.testing.assert_close(
            float(metrics["train/policy_loss"]), -sign / math.sqrt(8 / 7), rtol=1e-5, atol=1e-5
        )


def test_normalization_pools_the_moments_of_every_rank(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    episodes = length_probe()
    style = GenerateStyle()
    whole = build_buffer(tiny_tokenizer, episodes)
    prepare_rollout(tiny_policy, whole, style, gamma=1.0, gae_lambda=0.95, batch_size=8)
    # "Rank 0" holds the first three episodes; the reduce adds the other rank's moments.
    part, rest = build_buffer(tiny_tokenizer, episodes[:3]), build_buffer(tiny_tokenizer, episodes[3:])
    prepare_rollout(tiny_policy, rest, style, gamma=1.0, gae_lambda=0.95, batch_size=8)
    other = ppo.masked_moments(rest.advantages, rest.turn_mask)
    prepare_rollout(
        tiny_policy, part, style, gamma=1.0, gae_lambda=0.95, batch_size=8, reduce=lambda m: m + other
    )
    torch.testing.assert_close(part.pg_advantages, whole.pg_advantages[:3], rtol=1e-5, atol=1e-5)
    prepare_rollout(tiny_policy, part, style, gamma=1.0, gae_lambda=0.95, batch_size=8, norm_adv=False)
    torch.testing.assert_close(part.pg_advantages, part.advantages)


def test_generate_mode_scores_the_tempered_distribution_it_sampled_from(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (item 6): replies sampled at temperature 0.5 were scored at temperature 1."""
    sampled, steps = {}, []
    real_sample, real_decode = decode_module.sample_tokens, decode_module.decode

    def sample_tokens(logits, temperature=1.0):  # keep the log-prob of each token drawn
        token = real_sample(logits, temperature)
        steps.append(torch.log_softmax(logits.float() / temperature, -1).gather(1, token[:, None])[:, 0])
        return token

    def decode(lm, input_ids, attention_mask, *args, **kwargs):  # and file them under each row's text
        steps.clear()
        out = real_decode(lm, input_ids, attention_mask, *args, **kwargs)
        logp, new = torch.stack(steps, 1), out[:, input_ids.shape[1] :]  # (B, new) each
        for b in range(len(new)):
            prompt = input_ids[b][attention_mask[b].bool()].tolist()
            reply = cut_at_eos(new[b].tolist(), tiny_tokenizer.eos_token_id)
            sampled[tuple(prompt + reply)] = logp[b, : len(reply)]
        return out

    monkeypatch.setattr(decode_module, "sample_tokens", sample_tokens)
    monkeypatch.setattr(decode_module, "decode", decode)
    style = GenerateStyle(max_new_tokens=2, temperature=0.5)
    collector = RolloutCollector(ENV, KWARGS, BlackjackAgent(), num_envs=4, style=style)
    episodes = collector.collect(tiny_policy, tiny_tokenizer, seed=0, epoch=0, steps_per_env=1).episodes
    buf = build_buffer(tiny_tokenizer, episodes, temperature=0.5)
    prepare_rollout(tiny_policy, buf, style, gamma=1.0, gae_lambda=0.95, batch_size=8)
    for e, ep in enumerate(episodes):
        for t in range(ep.num_turns):
            row = int(buf.value_rows[e, t])
            scored = buf.old_logprobs[row][buf.turn_index[row] == t]
            behaviour = sampled[tuple(ep.prompt_ids[t] + ep.response_ids[t])]
            torch.testing.assert_close(scored, behaviour, rtol=1e-4, atol=1e-4)
    # ... and the update's first minibatch sees ratio 1 and the tempered entropy.
    batch = row_minibatch(buf, list(range(buf.num_train_rows)))
    _, metrics = minibatch_loss(style, tiny_policy.train(), batch, 0.2, True, 0.5, 0.0)
    assert float(metrics["train/approx_kl"]) == 0.0 and float(metrics["train/clipfrac"]) == 0.0


def scored_turns(policy, tokenizer, temperature: float):
    agent = BlackjackAgent()
    style = ScoreStyle(agent, temperature=temperature)
    collector = RolloutCollector(ENV, KWARGS, agent, 8, style)
    episodes = collector.collect(policy, tokenizer, seed=0, epoch=0, steps_per_env=2).episodes
    buf = build_buffer(tokenizer, episodes, temperature=temperature)
    style.encode(tokenizer, episodes, buf)
    return episodes, style, buf


def direct_logp(policy, buf, temperature: float) -> torch.Tensor:
    """(N, C) candidate log-probs of every turn, by one batched forward of the public pieces."""
    batch = candidate_minibatch(buf, list(range(len(buf.actions))))
    with torch.no_grad():
        sums = candidate_forward(policy, batch)[0]
    return torch.log_softmax(turn_distribution(batch, sums, "token") / temperature, -1), batch


def test_score_mode_scores_at_the_sampling_temperature(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Regression (item 6): score mode sampled from softmax(scores / T) and scored softmax(scores)."""
    policy = tiny_policy.eval()
    _, style, buf = scored_turns(policy, tiny_tokenizer, temperature=0.25)
    prepare_rollout(policy, buf, style, gamma=1.0, gae_lambda=0.95, batch_size=5)  # several chunks
    logp, batch = direct_logp(policy, buf, 0.25)
    torch.testing.assert_close(
        buf.old_logprobs, logp.gather(1, buf.actions.chosen[:, None]).squeeze(1), rtol=1e-5, atol=1e-5
    )
    batch = candidate_minibatch(buf, list(range(len(buf.actions))))
    _, metrics = minibatch_loss(style, policy, batch, 0.2, True, 0.5, 0.0)
    assert float(metrics["train/approx_kl"]) < 1e-10
    entropy = -(logp.exp() * logp).nansum(-1).mean()
    torch.testing.assert_close(float(metrics["train/entropy"]), float(entropy), rtol=1e-5, atol=1e-5)


def test_score_mode_kl_comes_from_the_candidate_distributions(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Regression (item 8): the penalty was the summed token log-ratio of the chosen text, off by
    the normalization and the temperature, with a per-prompt constant; its mean could be < 0."""
    policy = tiny_policy.eval()
    reference = ReferencePolicy(policy)  # a frozen copy of the initial weights
    initial = PolicyWithValueHead(copy.deepcopy(policy.lm), policy.value_head)  # the same, by hand
    torch.manual_seed(1)
    with torch.no_grad():  # the policy drifts from the reference
        for p in policy.lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    temperature = 0.5
    episodes, style, buf = scored_turns(policy, tiny_tokenizer, temperature)
    _, _, kl, metrics = style.prepare(policy, buf, batch_size=64, reference=reference)
    logp, _ = direct_logp(policy, buf, temperature)
    ref_logp, _ = direct_logp(initial, buf, temperature)
    turns = buf.actions
    chosen = turns.chosen[:, None]
    k1 = (logp.gather(1, chosen) - ref_logp.gather(1, chosen)).squeeze(1)  # (N,)
    torch.testing.assert_close(kl[turns.turn_episode, turns.turn_step], k1, rtol=1e-5, atol=1e-5)
    exact = (logp.exp() * (logp - ref_logp)).nansum(-1)  # (N,) KL over each turn's candidates
    assert (exact >= 0).all() and float(exact.mean()) > 1e-4
    torch.testing.assert_close(metrics["train/kl_ref"], float(exact.mean()), rtol=1e-5, atol=1e-6)
    # The penalty enters each turn's reward before GAE.
    coef = 0.3
    prepare_rollout(
        policy,
        buf,
        style,
        gamma=1.0,
        gae_lambda=1.0,
        batch_size=64,
        reference=reference,
        kl_coef=coef,
        norm_adv=False,
    )
    for e, ep in enumerate(episodes):
        if ep.terminated:  # gamma = lambda = 1: A_t = sum of later rewards - V_t
            penalized = [r - coef * float(kl[e, t]) for t, r in enumerate(ep.rewards)]
            togo = [sum(penalized[t:]) for t in range(ep.num_turns)]
            expected = torch.tensor(togo) - buf.old_values[e, : ep.num_turns]
            torch.testing.assert_close(buf.advantages[e, : ep.num_turns], expected, rtol=1e-5, atol=1e-5)
