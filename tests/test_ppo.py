"""PPO math checked against values computed by hand (the arithmetic is in the comments)."""

import math

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from llamagym_pl.ppo import (
    approx_kl,
    compute_gae,
    entropy_from_logits,
    entropy_from_logprobs,
    explained_variance,
    logprobs_and_logsoftmax,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    token_logprobs,
    value_loss,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}
GAMMA, LAMBDA = 0.9, 0.8  # gamma * lambda = 0.72


def t(*xs: float) -> Tensor:
    """Shorthand for a 1-D float32 tensor."""
    return torch.tensor(xs, dtype=torch.float32)


# ---------------------------------------------------------------- masked statistics


def test_masked_mean_ignores_masked_elements_even_nan() -> None:
    x = t(1.0, float("nan"), 3.0, float("inf"))
    assert_close(masked_mean(x, torch.tensor([True, False, True, False])), torch.tensor(2.0), **TOL)
    # a 0/1 float mask means the same thing
    assert_close(masked_mean(x, t(1, 0, 1, 0)), torch.tensor(2.0), **TOL)


def test_masked_mean_dim_and_empty() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    # row 0: (1 + 2) / 2 = 1.5; row 1 is empty -> 0
    assert_close(masked_mean(x, mask, dim=1), t(1.5, 0.0), **TOL)
    # column 0: 1/1, column 1: 2/1, column 2: empty -> 0
    assert_close(masked_mean(x, mask, dim=0), t(1.0, 2.0, 0.0), **TOL)
    assert_close(masked_mean(x, torch.zeros_like(mask)), torch.tensor(0.0), **TOL)


def test_masked_mean_rejects_mismatched_mask() -> None:
    with pytest.raises(ValueError, match="mask shape"):
        masked_mean(torch.zeros(2, 3), torch.ones(3, dtype=torch.bool))


def test_masked_var() -> None:
    x = t(1.0, 2.0, 3.0, 4.0, 100.0)
    mask = torch.tensor([True, True, True, True, False])
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    assert_close(masked_var(x, mask), torch.tensor(5.0 / 3.0), **TOL)  # 5 / (4 - 1)
    assert_close(masked_var(x, mask, unbiased=False), torch.tensor(1.25), **TOL)  # 5 / 4
    # one element: no Bessel correction possible -> 0; empty -> 0
    assert_close(masked_var(x, torch.tensor([True, False, False, False, False])), torch.tensor(0.0))
    assert_close(masked_var(x, torch.zeros_like(mask)), torch.tensor(0.0))


def test_masked_whiten() -> None:
    x = t(1.0, 2.0, 3.0, 4.0, 100.0)
    mask = torch.tensor([True, True, True, True, False])
    # mean 2.5, std sqrt(5/3) = 1.2909944; masked element -> 0
    std = 1.2909944
    expected = t(-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std, 0.0)  # -1.161895, -0.387298, ...
    assert_close(masked_whiten(x, mask), expected, **TOL)
    # shift_mean=False only rescales: 1/std = 0.7745967, 2/std = 1.5491933, ...
    assert_close(masked_whiten(x, mask, shift_mean=False), t(1 / std, 2 / std, 3 / std, 4 / std, 0), **TOL)


def test_masked_whiten_too_few_elements_is_not_divided() -> None:
    x = t(5.0, 7.0)
    one = torch.tensor([True, False])
    assert_close(masked_whiten(x, one), t(0.0, 0.0))  # x - mean = 5 - 5
    assert_close(masked_whiten(x, one, shift_mean=False), t(5.0, 0.0))  # not 5 / sqrt(1e-8)
    assert_close(masked_whiten(x, torch.zeros_like(one)), t(0.0, 0.0))


# ---------------------------------------------------------------- log-probs and entropy


def test_token_logprobs_matches_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g) * 3  # (B, L, V)
    labels = torch.randint(0, 11, (2, 5), generator=g)  # (B, L)
    expected = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    out = token_logprobs(logits, labels)
    assert out.shape == (2, 5) and out.dtype == torch.float32
    assert_close(out, expected, **TOL)


def test_token_logprobs_hand_value_and_bf16_input() -> None:
    # softmax([0, 0, ln 2]) = [1/4, 1/4, 1/2]
    logits = torch.tensor([[0.0, 0.0, math.log(2.0)]])
    assert_close(token_logprobs(logits, torch.tensor([2])), t(math.log(0.5)), **TOL)
    assert_close(token_logprobs(logits, torch.tensor([0])), t(math.log(0.25)), **TOL)
    # bf16 logits are upcast: result is float32 and equals the float32 computation on the same values
    big = torch.randn(3, 32000, generator=torch.Generator().manual_seed(1)).bfloat16()
    labels = torch.tensor([0, 5, 31999])
    out = token_logprobs(big, labels)
    assert out.dtype == torch.float32
    assert_close(out, token_logprobs(big.float(), labels), atol=0.0, rtol=0.0)


def test_logprobs_and_logsoftmax_hand_values_and_the_entropy_they_share() -> None:
    # softmax([0, 0, ln 2]) = [1/4, 1/4, 1/2]; a second row, softmax([ln 3, 0]) = [3/4, 1/4]
    logits = torch.tensor([[0.0, 0.0, math.log(2.0)], [math.log(3.0), 0.0, -float("inf")]])
    logprobs, logp = logprobs_and_logsoftmax(logits, torch.tensor([2, 1]))
    assert logprobs.dtype == logp.dtype == torch.float32 and logp.shape == (2, 3)
    assert_close(logprobs, t(math.log(0.5), math.log(0.25)), **TOL)
    assert_close(logp.exp(), torch.tensor([[0.25, 0.25, 0.5], [0.75, 0.25, 0.0]]), **TOL)
    # -(2 * 1/4 ln 1/4 + 1/2 ln 1/2) = 0.6931472 + 0.3465736 = 1.0397208; [3/4, 1/4]: 0.5623351,
    # the banned token adding nothing (no NaN)
    assert_close(entropy_from_logprobs(logp), t(1.0397208, 0.5623351), **TOL)
    # Equal to the logsumexp form up to rounding, in bf16 too
    big = torch.randn(3, 32000, generator=torch.Generator().manual_seed(1)).bfloat16()
    labels = torch.tensor([0, 5, 31999])
    assert_close(logprobs_and_logsoftmax(big, labels)[0], token_logprobs(big, labels), atol=1e-5, rtol=0)


def test_entropy_from_logits() -> None:
    # uniform over V = 8 -> ln 8
    assert_close(entropy_from_logits(torch.zeros(2, 8)), torch.full((2,), math.log(8.0)), **TOL)
    # p = [3/4, 1/4]: -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.2157616 + 0.3465736 = 0.5623351
    assert_close(entropy_from_logits(t(math.log(3.0), 0.0)), torch.tensor(0.5623351), **TOL)
    # one-hot via banned (-inf) tokens -> exactly 0, no NaN; two allowed equal tokens -> ln 2
    inf = float("inf")
    assert_close(entropy_from_logits(t(0.0, -inf, -inf)), torch.tensor(0.0), **TOL)
    assert_close(entropy_from_logits(t(0.0, 0.0, -inf)), torch.tensor(math.log(2.0)), **TOL)
    # one-hot-ish with huge logits: p(others) = e^-1000 -> entropy ~ 0, still finite
    assert_close(entropy_from_logits(t(1000.0, 0.0, 0.0)), torch.tensor(0.0), **TOL)


def test_entropy_gradient_is_finite_with_banned_tokens() -> None:
    # Candidate distributions of turns with fewer candidates are padded with -inf logits.
    logits = t(1.0, 2.0, 0.0).requires_grad_()
    padded = torch.cat([logits[:2], t(-float("inf"))])
    entropy_from_logits(padded).backward()
    p = torch.softmax(logits[:2].detach(), -1)
    # dH/dz_i = -p_i (ln p_i + H) over the allowed tokens; 0 for a token that is not there
    expected = -p * (p.log() + entropy_from_logits(logits[:2].detach()))
    assert_close(logits.grad, torch.cat([expected, t(0.0)]), **TOL)


# ---------------------------------------------------------------- GAE
# One 3-turn episode used throughout: rewards r = [1, 0, 2], values V = [0.5, 1.0, 1.5].
R3 = t(1.0, 0.0, 2.0)
V3 = t(0.5, 1.0, 1.5)
FULL3 = torch.ones(1, 3, dtype=torch.bool)


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    next_value: Tensor,
    terminated: Tensor,
    gamma: float = GAMMA,
    lam: float = LAMBDA,
) -> tuple[Tensor, Tensor]:
    return compute_gae(rewards, values, mask, next_value, terminated, gamma, lam)


def test_gae_terminated_episode() -> None:
    # terminal after turn 2 -> bootstrap 0
    # delta2 = 2 + 0            - 1.5 = 0.5
    # delta1 = 0 + 0.9 * 1.5    - 1.0 = 0.35
    # delta0 = 1 + 0.9 * 1.0    - 0.5 = 1.4
    # A2 = 0.5; A1 = 0.35 + 0.72 * 0.5 = 0.71; A0 = 1.4 + 0.72 * 0.71 = 1.9112
    adv, ret = gae(R3[None], V3[None], FULL3, t(123.0), torch.tensor([True]))  # next_value unused
    assert_close(adv, t(1.9112, 0.71, 0.5)[None], **TOL)
    assert_close(ret, t(2.4112, 1.71, 2.0)[None], **TOL)  # A + V


def test_gae_truncated_episode_bootstraps() -> None:
    # truncated (time limit) with V(s_3) = 2.0
    # delta2 = 2 + 0.9 * 2.0 - 1.5 = 2.3
    # A2 = 2.3; A1 = 0.35 + 0.72 * 2.3 = 2.006; A0 = 1.4 + 0.72 * 2.006 = 2.84432
    adv, ret = gae(R3[None], V3[None], FULL3, t(2.0), torch.tensor([False]))
    assert_close(adv, t(2.84432, 2.006, 2.3)[None], **TOL)
    assert_close(ret, t(3.34432, 3.006, 3.8)[None], **TOL)


def test_gae_rollout_cut_fragment() -> None:
    # the rollout stopped after the first 2 turns; next_value = V of turn 2 = 1.5
    # delta1 = 0 + 0.9 * 1.5 - 1.0 = 0.35 (same as inside the full episode)
    # A1 = 0.35; A0 = 1.4 + 0.72 * 0.35 = 1.652
    adv, ret = gae(R3[None, :2], V3[None, :2], FULL3[:, :2], t(1.5), torch.tensor([False]))
    assert_close(adv, t(1.652, 0.35)[None], **TOL)
    assert_close(ret, t(2.152, 1.35)[None], **TOL)
    # with lambda = 0 each fragment advantage is the full episode's one-step TD error
    adv0, _ = gae(R3[None, :2], V3[None, :2], FULL3[:, :2], t(1.5), torch.tensor([False]), lam=0.0)
    assert_close(adv0, t(1.4, 0.35)[None], **TOL)


def test_gae_padded_batch_does_not_leak() -> None:
    nan = float("nan")
    rewards = torch.tensor([[1.0, 0.0, 2.0], [3.0, 99.0, nan], [1.0, 1.0, 99.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [1.0, 99.0, nan], [0.0, 0.5, 99.0]])
    mask = torch.tensor([[True, True, True], [True, False, False], [True, True, False]])
    next_value = t(123.0, 7.0, 1.0)
    terminated = torch.tensor([True, True, False])
    adv, ret = gae(rewards, values, mask, next_value, terminated)
    # row 0: the terminated episode above
    # row 1: one terminated turn: A0 = 3 - 1 = 2, return 3
    # row 2: truncated after 2 turns, bootstrap 1.0:
    #   delta1 = 1 + 0.9 * 1.0 - 0.5 = 1.4; delta0 = 1 + 0.9 * 0.5 - 0 = 1.45
    #   A1 = 1.4; A0 = 1.45 + 0.72 * 1.4 = 2.458
    expected_adv = torch.tensor([[1.9112, 0.71, 0.5], [2.0, 0.0, 0.0], [2.458, 1.4, 0.0]])
    expected_ret = torch.tensor([[2.4112, 1.71, 2.0], [3.0, 0.0, 0.0], [2.458, 1.9, 0.0]])
    assert_close(adv, expected_adv, **TOL)
    assert_close(ret, expected_ret, **TOL)


def test_gae_rejects_mask_with_holes() -> None:
    mask = torch.tensor([[True, False, True]])
    with pytest.raises(ValueError, match="left-aligned"):
        gae(R3[None], V3[None], mask, t(0.0), torch.tensor([True]))


def test_gae_lambda_one_is_discounted_return_minus_value() -> None:
    rewards = torch.stack([R3, R3])
    values = torch.stack([V3, V3])
    mask = torch.ones(2, 3, dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, t(0.0, 2.0), torch.tensor([True, False]), lam=1.0)
    # terminated:  G2 = 2, G1 = 0 + 0.9 * 2 = 1.8, G0 = 1 + 0.9 * 1.8 = 2.62
    # truncated (bootstrap 2): G2 = 2 + 0.9 * 2 = 3.8, G1 = 0.9 * 3.8 = 3.42, G0 = 1 + 0.9 * 3.42 = 4.078
    returns = torch.tensor([[2.62, 1.8, 2.0], [4.078, 3.42, 3.8]])
    assert_close(ret, returns, **TOL)
    assert_close(adv, returns - values, **TOL)  # [[2.12, 0.8, 0.5], [3.578, 2.42, 2.3]]


def test_gae_lambda_zero_is_td_error() -> None:
    adv, ret = gae(R3[None], V3[None], FULL3, t(0.0), torch.tensor([True]), lam=0.0)
    assert_close(adv, t(1.4, 0.35, 0.5)[None], **TOL)  # the deltas above
    assert_close(ret, t(1.9, 1.35, 2.0)[None], **TOL)  # r_t + gamma * V_{t+1}


# ---------------------------------------------------------------- policy loss


def test_policy_loss_at_ratio_one() -> None:
    logp = t(-1.0, -2.0, -0.5, -3.0)[None]
    adv = t(1.0, -2.0, 3.0, 0.5)[None]
    mask = torch.tensor([[True, True, True, False]])
    loss, clipfrac, kl = policy_loss(logp, logp.clone(), adv, mask, clip_coef=0.2)
    assert_close(loss, torch.tensor(-2.0 / 3.0), **TOL)  # -(1 - 2 + 3) / 3
    assert_close(clipfrac, torch.tensor(0.0))
    assert_close(kl, torch.tensor(0.0))


def test_policy_loss_clipping_hand_values_and_gradients() -> None:
    # clip_coef 0.2 -> clip range [0.8, 1.2]; per token (ratio, A) -> max(-A r, -A clip(r)):
    #   (1.5, +1) -> max(-1.5, -1.2) = -1.2   clipped (no gradient)
    #   (0.5, -1) -> max( 0.5,  0.8) =  0.8   clipped (no gradient)
    #   (0.5, +2) -> max(-1.0, -1.6) = -1.0   pessimistic side: unclipped
    #   (1.5, -2) -> max( 3.0,  2.4) =  3.0   pessimistic side: unclipped
    #   (1.1, +1) -> -1.1                      inside the range
    #   masked: garbage old log-prob -inf, must not matter
    # loss = (-1.2 + 0.8 - 1.0 + 3.0 - 1.1) / 5 = 0.1
    # clipfrac = 4 / 5 = 0.8 (all but ratio 1.1)
    # k3 = (r - 1) - ln r: 1.5 -> 0.0945349, 0.5 -> 0.1931472, 1.1 -> 0.0046898
    #   (2 * 0.0945349 + 2 * 0.1931472 + 0.0046898) / 5 = 0.1160108
    old = t(-1.0, -1.0, -1.0, -1.0, -1.0, -float("inf"))[None]
    ratios = t(1.5, 0.5, 0.5, 1.5, 1.1, 1.0)[None]
    logp = (old.nan_to_num(neginf=0.0) + ratios.log()).requires_grad_()
    adv = t(1.0, -1.0, 2.0, -2.0, 1.0, 100.0)[None]
    mask = torch.tensor([[True, True, True, True, True, False]])
    loss, clipfrac, kl = policy_loss(logp, old, adv, mask, clip_coef=0.2)
    assert_close(loss, torch.tensor(0.1), **TOL)
    assert_close(clipfrac, torch.tensor(0.8), **TOL)
    assert_close(kl, torch.tensor(0.1160108), **TOL)
    assert not clipfrac.requires_grad and not kl.requires_grad
    loss.backward()
    # d/dlogp of -A r / 5 = -A r / 5 on unclipped tokens; 0 on clipped and masked ones
    assert_close(logp.grad, t(0.0, 0.0, -2.0 * 0.5 / 5, 2.0 * 1.5 / 5, -1.1 / 5, 0.0)[None], **TOL)


def test_policy_loss_ignores_masked_positions() -> None:
    logp = t(-1.0, -2.0)[None]
    mask = torch.tensor([[True, False]])
    a = policy_loss(logp, t(-1.2, -2.0)[None], t(1.0, 5.0)[None], mask, 0.2)
    b = policy_loss(logp, t(-1.2, 50.0)[None], t(1.0, -9.0)[None], mask, 0.2)
    for x, y in zip(a, b, strict=True):
        assert_close(x, y)


def test_approx_kl() -> None:
    # log ratios [0, ln 2, masked]: k3 = [0, (2 - 1) - ln 2 = 0.3068528]; mean 0.1534264
    logp = t(-1.0, -1.0 + math.log(2.0), 5.0)
    old = t(-1.0, -1.0, -5.0)
    out = approx_kl(logp, old, torch.tensor([True, True, False]))
    assert_close(out, torch.tensor(0.1534264), **TOL)


# ---------------------------------------------------------------- value loss

V_NEW = t(1.0, 2.0, 3.0, 5.0)
V_OLD = t(0.5, 2.5, 2.0, 0.0)
V_RET = t(2.0, 1.0, 0.0, 0.0)
V_MASK = torch.tensor([True, True, True, False])


def test_value_loss_clipped() -> None:
    # clip_coef 0.2:
    #   v 1, old 0.5, R 2: (1 - 2)^2 = 1 vs (0.5 + 0.2 - 2)^2 = 1.69 -> 1.69
    #   v 2, old 2.5, R 1: (2 - 1)^2 = 1 vs (2.5 - 0.2 - 1)^2 = 1.69 -> 1.69
    #   v 3, old 2.0, R 0: (3 - 0)^2 = 9 vs (2.0 + 0.2 - 0)^2 = 4.84 -> 9
    # 0.5 * (1.69 + 1.69 + 9) / 3 = 2.0633333
    out = value_loss(V_NEW, V_OLD, V_RET, V_MASK, clip_coef=0.2)
    assert_close(out, torch.tensor(2.0633333), **TOL)


def test_value_loss_unclipped() -> None:
    # 0.5 * (1 + 1 + 9) / 3 = 1.8333333
    out = value_loss(V_NEW, V_OLD, V_RET, V_MASK, clip_coef=None)
    assert_close(out, torch.tensor(11.0 / 6.0), **TOL)


# ---------------------------------------------------------------- explained variance


def test_explained_variance() -> None:
    y = t(1.0, 2.0, 3.0, 4.0)
    assert_close(explained_variance(y, y), torch.tensor(1.0), **TOL)
    assert_close(explained_variance(torch.full_like(y, 2.5), y), torch.tensor(0.0), **TOL)
    # residual [0, 0, 0, -1]: var = 0.75 / 3 = 0.25; var(y) = 5/3; 1 - 0.25 / (5/3) = 0.85
    assert_close(explained_variance(t(1.0, 2.0, 3.0, 5.0), y), torch.tensor(0.85), **TOL)
    assert torch.isnan(explained_variance(y, torch.ones(4)))


def test_explained_variance_masked_and_detached() -> None:
    y_true = t(1.0, 2.0, 3.0, 4.0, 1000.0)
    y_pred = t(1.0, 2.0, 3.0, 4.0, 0.0).requires_grad_()
    out = explained_variance(y_pred, y_true, torch.tensor([True, True, True, True, False]))
    assert_close(out, torch.tensor(1.0), **TOL)
    assert out.dtype == torch.float32 and not out.requires_grad
