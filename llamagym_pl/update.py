"""The PPO steps that need the policy: preparing a rollout, the minibatch loss, the optimizer.

Shared by :class:`~llamagym_pl.module.PPOModule` (Lightning) and the imperative loop
(:mod:`llamagym_pl.imperative`), so both train with exactly the same math
(:mod:`llamagym_pl.ppo`), whatever the action style (:mod:`llamagym_pl.actions`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from llamagym_pl import ppo
from llamagym_pl.actions import ActionStyle
from llamagym_pl.buffer import RolloutBuffer
from llamagym_pl.estimators import GroupEstimator, group_advantages, returns_to_go
from llamagym_pl.kl import ReferencePolicy
from llamagym_pl.policy import PolicyWithValueHead

Reduce = Callable[[Tensor], Tensor]
"""Sums a tensor over DDP ranks (identity in one process)."""


@torch.no_grad()
def prepare_rollout(
    policy: PolicyWithValueHead,
    buf: RolloutBuffer,
    style: ActionStyle,
    gamma: float,
    gae_lambda: float,
    batch_size: int,
    reference: ReferencePolicy | None = None,
    kl_coef: float = 0.0,
    *,
    norm_adv: bool = True,
    reduce: Reduce | None = None,
    estimator: GroupEstimator | None = None,
) -> dict[str, float]:
    """Fill ``buf`` with old log-probs, turn values, GAE and the policy loss's advantages: the one
    no-grad pass over a rollout, in eval mode (``batch_size`` rows, or turns, per forward).

    The style computes its actions' old log-probs and each turn's value, the value head at the
    end of the turn's prompt, with the forward its loss uses
    (:meth:`~llamagym_pl.actions.ActionStyle.prepare`); a truncated episode bootstraps from the
    value of the prompt of its next state. GAE runs over each episode's turns, across its rows: a
    prompt that dropped old turns does not cut the episode's return.

    KL to the initial policy: with a ``reference`` policy, each turn's reward enters GAE as
    ``r_t - kl_coef * kl_t`` with the style's per-turn KL (see :mod:`llamagym_pl.kl`;
    ``buf.rewards`` keeps the env rewards), and ``train/kl_ref`` is returned.

    ``buf.advantages`` are GAE's plus each turn's format penalty; ``buf.pg_advantages``, what the
    policy loss uses, are those normalized once over the whole rollout (``norm_adv``), with
    moments summed over DDP ranks by ``reduce``.

    A critic-free ``estimator`` (:mod:`llamagym_pl.estimators`: ``grpo``, ``gigpo``) replaces GAE:
    advantages compare the episodes of each group (``buf.group``), already normalized within
    their groups, so ``norm_adv`` does not whiten them again (that would move the exact zeros of
    groups with nothing to compare); ``buf.returns`` are the returns-to-go, for diagnostics.
    The policy then has no critic: its values are 0 and nothing bootstraps.
    """
    was_training = policy.training
    policy.eval()
    try:
        buf.old_values, next_value, kl, metrics = style.prepare(policy, buf, batch_size, reference)
    finally:
        policy.train(was_training)
    rewards = buf.rewards if kl is None else buf.rewards - kl_coef * kl
    if estimator is None:
        advantages, buf.returns = ppo.compute_gae(
            rewards, buf.old_values, buf.turn_mask, next_value, buf.terminated, gamma, gae_lambda
        )
        metrics["rollout/value_mean"] = float(ppo.masked_mean(buf.old_values, buf.turn_mask))
    else:
        advantages, estimator_metrics = group_advantages(
            estimator, rewards, buf.turn_mask, buf.group, buf.anchor, gamma
        )
        buf.returns = returns_to_go(rewards, buf.turn_mask, gamma)
        metrics.update(estimator_metrics)
    # Format penalties act on their own turn only (see Episode.penalties); returns, the value
    # targets, stay pure env returns.
    buf.advantages = advantages + buf.penalties * buf.turn_mask
    whiten = norm_adv and estimator is None
    buf.pg_advantages = normalized_advantages(buf.advantages, buf.turn_mask, whiten, reduce)
    return {"rollout/advantage_mean": float(ppo.masked_mean(buf.advantages, buf.turn_mask)), **metrics}


def normalized_advantages(advantages: Tensor, mask: Tensor, norm_adv: bool, reduce: Reduce | None) -> Tensor:
    """Advantages whitened over every turn of the rollout (of all ranks, with ``reduce``).

    Once per rollout and per turn, not per minibatch (CleanRL's per-minibatch whitening): a
    minibatch is a sample of the rollout, and whenever its composition depends on the actions
    (grouped by length, as ours once were, and a row's length depends on the reply lengths and
    turns) a per-minibatch mean is an action-dependent baseline. Eight one-turn episodes, short
    replies +1 and long ones -1, sorted into two minibatches, whitened to exactly 0: no policy
    gradient at all.
    """
    if not norm_adv:
        return advantages * mask
    moments = ppo.masked_moments(advantages, mask)
    if reduce is not None:
        moments = reduce(moments)
    return ppo.whiten_with_moments(advantages, mask, moments)


Minibatch = dict[str, Tensor] | list[dict[str, Tensor]]
"""One minibatch of ``style.minibatch`` tensors, or a list of its forwards (units of similar
length, :func:`~llamagym_pl.minibatches.length_groups`)."""


def minibatch_loss(
    style: ActionStyle,
    policy: PolicyWithValueHead,
    batch: Minibatch,
    clip_coef: float,
    clip_vloss: bool,
    vf_coef: float,
    ent_coef: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped-PPO loss of one minibatch (``style.minibatch``) and its detached diagnostics:
    the style's new log-probs, entropies and values (:meth:`~llamagym_pl.actions.ActionStyle.logprobs`)
    in :func:`llamagym_pl.ppo.ppo_objective`. Only actions enter the policy and entropy terms,
    only turn values the value term.

    A minibatch given as several forwards is one loss: their actions and turns are concatenated
    before the objective averages them, so the loss equals one forward over the whole minibatch.
    """
    parts = [batch] if isinstance(batch, dict) else batch
    # Without an entropy bonus its gradient is 0 times the entropy's: no graph for it.
    terms = style.logprobs(policy, parts, entropy_grad=bool(ent_coef))
    turns = [part["turn_mask"] for part in parts]
    value_terms = (
        (
            torch.cat([t.values[m] for t, m in zip(terms, turns, strict=True)]),
            torch.cat([part["old_values"][m] for part, m in zip(parts, turns, strict=True)]),
            torch.cat([part["returns"][m] for part, m in zip(parts, turns, strict=True)]),
            torch.cat([m[m] for m in turns]),
        )
        if policy.has_critic
        else (None, None, None, None)  # critic-free: no value term
    )
    entropy = torch.cat([t.entropy for t in terms])
    return ppo.ppo_objective(
        torch.cat([t.logprobs for t in terms]),
        torch.cat([t.old_logprobs for t in terms]),
        torch.cat([t.advantages for t in terms]),
        entropy if ent_coef else entropy.detach(),
        *value_terms,
        clip_coef,
        clip_vloss,
        vf_coef,
        ent_coef,
    )


def minibatch_size(batch: Minibatch) -> int:
    """How many training units (rows, or turns) a minibatch holds."""
    return sum(len(part["old_values"]) for part in ([batch] if isinstance(batch, dict) else batch))


def make_optimizer(
    params: list[nn.Parameter],
    learning_rate: float,
    adam_eps: float,
    weight_decay: float,
    lr_schedule: Literal["constant", "linear"],
    horizon: int | None,
    fused: bool = True,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its schedule, stepped once per PPO iteration: ``linear`` decays the learning rate
    to 0 over ``horizon`` iterations (None or 0: constant), ``constant`` keeps it.

    With ``fused``, AdamW's fused kernel where it runs (plain float tensors on CPU or CUDA): the
    same update up to float rounding, in one pass over each tensor instead of a dozen (on CPU,
    36 ms instead of 292 ms a step for a 58M-parameter model, one thread). Lightning's mixed
    precision cannot clip the gradients of a fused optimizer: PPOModule passes False there."""
    optimizer = torch.optim.AdamW(
        params,
        lr=learning_rate,
        eps=adam_eps,
        weight_decay=weight_decay,
        fused=(fused and fusable(params)) or None,
    )
    if lr_schedule == "linear" and horizon:
        lr_lambda = lambda iteration: max(0.0, 1.0 - iteration / horizon)  # noqa: E731
    else:
        lr_lambda = lambda iteration: 1.0  # noqa: E731
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


FUSED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def fusable(params: list[nn.Parameter]) -> bool:
    """Whether AdamW's fused kernel takes ``params``: plain tensors (not DTensors or other
    subclasses) of a float dtype, all on CPU or all on one CUDA device type."""
    return bool(params) and all(
        type(p.data) is torch.Tensor and p.dtype in FUSED_DTYPES and p.device.type in ("cpu", "cuda")
        for p in params
    )
