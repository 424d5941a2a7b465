"""PPO math as pure functions over tensors (no model, no environment, no Lightning).

How the library maps PPO onto an LLM agent:

* One episode = one token sequence. A multi-turn episode is a single chat: system/observation
  (prompt) tokens, then the assistant's response for turn 0, then the next observation, the
  response for turn 1, and so on. Only response tokens are actions; prompt tokens are masked out
  of every loss.
* One value per turn. The value of turn t is read from the value head at the last prompt token
  before turn t's first response token, i.e. the position whose logits predict that first
  response token. That is the state the agent acts from: the whole history up to and including
  the observation of turn t, and nothing it has generated for turn t yet.
* GAE runs over turns, not tokens. The environment gives one reward per turn (`env.step`), so
  `compute_gae` works on (E, T) tensors of E episodes by T turns; see its docstring for how
  `terminated` vs `truncated` decides the bootstrap (Gymnasium semantics, unlike CleanRL which
  treats both as terminal).
* The turn's advantage is copied to every response token of that turn (all its tokens get the
  same advantage), and the clipped surrogate is then taken per token with token log-probs
  (`policy_loss`): each token is one action probability ratio, as in Schulman et al. 2017.

Shapes: E episodes, T turns, B sequences, L tokens, V vocabulary. Every reduction takes a mask
of the same shape as its input (bool, or 0/1 float) and ignores what lies outside it, so padded
positions may hold anything, even NaN or inf.
"""

import torch
from torch import Tensor


def _check_mask(x: Tensor, mask: Tensor) -> Tensor:
    if x.shape != mask.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != input shape {tuple(x.shape)}")
    return mask.bool()


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over positions where `mask` is true; 0 (not NaN) where nothing is valid.

    x, mask: same shape. Returns a scalar, or x's shape without `dim`.
    """
    mask = _check_mask(x, mask)
    # where, not x * mask: padding may hold inf/NaN and 0 * inf = NaN.
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if dim is None:
        return x.sum() / mask.sum().clamp(min=1)
    return x.sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `x` over the masked elements (scalar). x, mask: same shape.

    `unbiased` applies Bessel's correction n / (n - 1) like `torch.var`; with fewer than 2 valid
    elements the correction is undefined, so the biased value (0) is returned instead.
    """
    mask = _check_mask(x, mask)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        bessel = n / (n - 1).clamp(min=1)
        var = var * torch.where(n > 1, bessel, torch.ones_like(bessel))
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalize `x` to zero mean and unit variance over the masked elements; 0 outside the mask.

    x, mask: same shape; returns x's shape. Uses the unbiased variance, as CleanRL's
    `(adv - adv.mean()) / (adv.std() + 1e-8)` does. With `shift_mean=False` only the scale is
    changed, `x / sqrt(var + eps)`, so each element keeps its sign.

    With fewer than 2 valid elements there is no spread to normalize by: the variance is 0 and
    dividing by sqrt(eps) would multiply x by 1e4 (with `shift_mean=False`). Then `x - mean` (or
    `x`) is returned unscaled.
    """
    mask = _check_mask(x, mask)
    var = masked_var(x, mask, unbiased=True)
    return _whiten(x, mask, masked_mean(x, mask), var, mask.sum(), shift_mean, eps)


def _whiten(
    x: Tensor, mask: Tensor, mean: Tensor, var: Tensor, n: Tensor, shift_mean: bool, eps: float
) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` (or ``x / ...``) on the mask, 0 elsewhere; unscaled when
    fewer than 2 elements (``n``) give no spread."""
    # torch.where instead of `if n < 2`: keeps the function free of host syncs.
    scale = torch.where(n >= 2, torch.rsqrt(var + eps), torch.ones_like(var))
    whitened = (x - mean) * scale if shift_mean else x * scale
    return torch.where(mask, whitened, torch.zeros_like(whitened))


def masked_moments(x: Tensor, mask: Tensor) -> Tensor:
    """``(count, sum, sum of squares)`` of ``x`` over the mask, float64, shape (3,).

    The three are additive: summed over DDP ranks they are the moments of all ranks' elements,
    so :func:`whiten_with_moments` normalizes a whole distributed rollout at once.
    """
    mask = _check_mask(x, mask)
    x = torch.where(mask, x.detach().double(), torch.zeros((), dtype=torch.float64, device=x.device))
    return torch.stack([mask.sum().double(), x.sum(), (x * x).sum()])


def whiten_with_moments(x: Tensor, mask: Tensor, moments: Tensor, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` with the mean and unbiased variance of ``moments``
    (:func:`masked_moments`, possibly summed over ranks); 0 outside the mask, x's dtype.

    Equals :func:`masked_whiten` when ``moments`` are ``x``'s own. With fewer than 2 elements
    there is no spread: ``x - mean`` is returned unscaled.
    """
    mask = _check_mask(x, mask)
    n, total, squares = moments.double().unbind()
    mean = total / n.clamp(min=1)
    var = ((squares - n * mean * mean) / (n - 1).clamp(min=1)).clamp(min=0)
    return _whiten(x.double(), mask, mean, var, n, True, eps).to(x.dtype)


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(label) under softmax(logits), in float32.

    logits: (..., V), already aligned with labels (the caller shifts: logits at position i
    predict token i + 1). labels: (...) int64, valid token ids everywhere (put any id, e.g. 0, at
    padded positions and mask them later). Returns (...) float32.

    Computed as logit[label] - logsumexp(logits), which never builds the (..., V) log_softmax.
    """
    logits = logits.float()  # bf16 logsumexp over a large vocabulary loses too many digits
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (...)
    return picked - torch.logsumexp(logits, dim=-1)  # (...)


def logprobs_and_logsoftmax(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """log p(label) and the whole log-softmax (..., V), float32, from one ``log_softmax``: the
    log-probs and the entropy (:func:`entropy_from_logprobs`) of generated tokens share it.

    logits: (..., V), aligned with labels as in :func:`token_logprobs` (whose
    ``logit[label] - logsumexp`` equals this up to float rounding: one pass must not mix them, or
    the PPO ratio of an unchanged policy is not exactly 1).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (..., V)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1), logp


def entropy_from_logprobs(logp: Tensor) -> Tensor:
    """Entropy in nats of a distribution given by its log-probs (a log-softmax). (..., V) -> (...).

    -inf log-probs (banned tokens) contribute 0.
    """
    p = logp.exp()
    # p * logp is 0 * -inf = NaN for banned tokens; their true contribution is 0. Masking logp
    # (not the product) keeps the backward finite too: d(p * logp)/dp = logp would be -inf there.
    plogp = p * logp.masked_fill(p == 0, 0.0)
    return -plogp.sum(-1)  # (...)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) in nats, float32. logits: (..., V) -> (...).

    Stable for very large logits and for -inf logits (banned tokens), which contribute 0.
    """
    return entropy_from_logprobs(torch.log_softmax(logits.float(), dim=-1))


def compute_gae(
    rewards: Tensor,
    values: Tensor,
    turn_mask: Tensor,
    next_value: Tensor,
    terminated: Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation over turns (Schulman et al. 2016). Returns (advantages, returns).

    rewards, values, turn_mask: (E, T) for E episodes (or fragments of one) and T turns. Valid
    turns are a left-aligned prefix of each row (turn_mask true for t < n_e); padding may hold
    anything. next_value: (E,) value of the state reached after the last valid turn.
    terminated: (E,) bool.

    The bootstrap after the last valid turn is 0 if `terminated[e]` (a terminal state has no
    future), and `next_value[e]` otherwise: Gymnasium's `truncated` (time limit) and a rollout that
    stopped mid-episode both leave a future the critic must estimate. Treating truncation as
    termination biases values down near the time limit (Pardo et al. 2018, "Time Limits in RL").

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * gae_lambda * A_{t+1}
        returns = A + V

    Outputs are (E, T), in at least float32, detached (they are regression targets), 0 outside
    turn_mask.
    """
    mask = turn_mask.bool()  # (E, T)
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("turn_mask must be a left-aligned prefix per row (no valid turn after padding)")
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    rewards = torch.where(mask, rewards.detach().to(dtype), zero)  # (E, T)
    values = torch.where(mask, values.detach().to(dtype), zero)  # (E, T)
    bootstrap = torch.where(terminated.bool(), zero, next_value.detach().to(dtype))  # (E,)

    # Turn t + 1 exists in the same row; the last valid turn bootstraps instead.
    has_next = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)  # (E, T)
    values_next = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # (E, T)
    values_next = torch.where(has_next, values_next, bootstrap[:, None])  # (E, T)
    deltas = torch.where(mask, rewards + gamma * values_next - values, zero)  # (E, T)

    advantages = torch.zeros_like(deltas)  # (E, T)
    lastgaelam = torch.zeros_like(deltas[:, 0])  # (E,)
    for t in reversed(range(deltas.shape[1])):
        # Padding has delta 0, so lastgaelam is 0 when a row's last valid turn is reached.
        lastgaelam = deltas[:, t] + gamma * gae_lambda * lastgaelam
        advantages[:, t] = lastgaelam
    advantages = torch.where(mask, advantages, zero)
    returns = torch.where(mask, advantages + values, zero)
    return advantages, returns


def approx_kl(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Estimate of KL(old || new) from token log-probs, detached scalar. All inputs (B, L).

    The "k3" estimator (ratio - 1) - log(ratio): unbiased, always >= 0, and low variance
    (Schulman, http://joschu.net/blog/kl-approx.html); CleanRL's `approx_kl`. A diagnostic for
    `target_kl` early stopping, hence detached.
    """
    mask = _check_mask(logprobs, mask)
    logratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))  # (B, L)
    return masked_mean(torch.expm1(logratio) - logratio, mask).detach()


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_coef: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Token-level clipped surrogate loss (PPO, Schulman et al. 2017). Returns (loss, clipfrac, approx_kl).

    logprobs: (B, L) current log p(token), with grad. old_logprobs: (B, L) from the rollout.
    advantages: (B, L) each response token carries its turn's advantage. mask: (B, L) true on
    response tokens.

        ratio = exp(logprobs - old_logprobs)
        loss  = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - clip_coef, 1 + clip_coef)))

    clipfrac (fraction of tokens with |ratio - 1| > clip_coef) and approx_kl (k3) are detached.
    """
    mask = _check_mask(logprobs, mask)
    # Zero the log-ratio off the mask before exp: exp(garbage) can be inf, and
    # torch.where's backward turns 0 * inf into a NaN gradient.
    logratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))  # (B, L)
    ratio = logratio.exp()  # (B, L)
    pg_loss1 = -advantages * ratio  # (B, L)
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)  # (B, L)
    loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
    clipfrac = masked_mean(((ratio - 1.0).abs() > clip_coef).float(), mask).detach()
    return loss, clipfrac, approx_kl(logprobs, old_logprobs, mask)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_coef: float | None
) -> Tensor:
    """Value-function loss, optionally clipped around the rollout's values (CleanRL `clip_vloss`).

    values: (N, ...) current predictions, with grad; old_values, returns, mask: same shape.
    With clip_coef: 0.5 * masked_mean(max((v - R)^2, (old + clamp(v - old, -c, c) - R)^2)),
    which keeps the value update as conservative as the policy's. Without: 0.5 * MSE.
    """
    mask = _check_mask(values, mask)
    v_loss_unclipped = (values - returns) ** 2
    if clip_coef is None:
        return 0.5 * masked_mean(v_loss_unclipped, mask)
    v_clipped = old_values + torch.clamp(values - old_values, -clip_coef, clip_coef)
    v_loss_clipped = (v_clipped - returns) ** 2
    return 0.5 * masked_mean(torch.max(v_loss_unclipped, v_loss_clipped), mask)


def explained_variance(y_pred: Tensor, y_true: Tensor, mask: Tensor | None = None) -> Tensor:
    """1 - Var[y_true - y_pred] / Var[y_true] over the masked elements, detached float32 scalar.

    1 is a perfect critic, 0 one no better than predicting the mean, < 0 worse than that. NaN
    when Var[y_true] == 0, where the ratio is undefined (as in CleanRL and SB3).
    """
    y_pred = y_pred.detach().float()
    y_true = y_true.detach().float()
    if mask is None:
        mask = torch.ones_like(y_true, dtype=torch.bool)
    var_y = masked_var(y_true, mask)
    ev = 1 - masked_var(y_true - y_pred, mask) / var_y
    return torch.where(var_y == 0, torch.full_like(ev, float("nan")), ev)


def ppo_objective(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    entropy: Tensor,
    values: Tensor | None,
    old_values: Tensor | None,
    returns: Tensor | None,
    value_mask: Tensor | None,
    clip_coef: float,
    clip_vloss: bool,
    vf_coef: float,
    ent_coef: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO loss to minimize, ``pg_loss - ent_coef * entropy + vf_coef * v_loss``, and its
    detached diagnostics (named as logged: ``train/policy_loss`` ...).

    logprobs (with grad), old_logprobs, advantages, entropy (with grad): (N,) over a minibatch's
    N actions (response tokens, or scored turns), advantages already normalized (once per
    rollout). values (with grad), old_values, returns, value_mask: the minibatch's turns, any
    shape. The clipped surrogate is :func:`policy_loss`, the value loss :func:`value_loss`
    (clipped around the old values when ``clip_vloss``). ``values`` None: a critic-free policy,
    no value term (and no ``train/value_loss``).
    """
    every = torch.ones_like(logprobs, dtype=torch.bool)
    pg_loss, clipfrac, kl = policy_loss(logprobs, old_logprobs, advantages, every, clip_coef)
    entropy = entropy.mean()
    loss = pg_loss - ent_coef * entropy
    metrics = {"train/policy_loss": pg_loss.detach()}
    if values is not None:
        v_loss = value_loss(values, old_values, returns, value_mask, clip_coef if clip_vloss else None)
        loss = loss + vf_coef * v_loss
        metrics["train/value_loss"] = v_loss.detach()
    metrics.update(
        {
            "train/entropy": entropy.detach(),
            "train/approx_kl": kl,
            "train/clipfrac": clipfrac,
            "train/loss": loss.detach(),
        }
    )
    return loss, metrics
