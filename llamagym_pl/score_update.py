"""The two PPO steps that need the policy, for scored actions (``data.policy: score``).

One action per turn: its probability is the candidate distribution's (see
:mod:`llamagym_pl.scoring`), so the ratio, the advantage and the entropy are per turn. Values
and GAE are shared with generated replies (:func:`llamagym_pl.update.score_rollout` on the
episode sequences); the clipped surrogate and value loss are :mod:`llamagym_pl.ppo`'s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llamagym_pl import ppo
from llamagym_pl.policy import PolicyWithValueHead
from llamagym_pl.score_buffer import ScoreBuffer, score_minibatch
from llamagym_pl.scoring import ScoreNormalization, candidate_forward, turn_distribution
from llamagym_pl.update import total_loss


@torch.no_grad()
def score_candidates(policy: PolicyWithValueHead, buf: ScoreBuffer, batch_size: int) -> dict[str, float]:
    """Fill ``buf.old_logprobs`` (N,): log pi(chosen candidate) of every turn, ``batch_size`` turns
    per forward pass. Run after :func:`~llamagym_pl.update.score_rollout` on ``buf.episodes``."""
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    old_logprobs, entropy = torch.zeros(len(buf)), torch.zeros(len(buf))
    try:
        for start in range(0, len(buf), batch_size):
            turns = list(range(start, min(start + batch_size, len(buf))))
            batch = {k: v.to(device) for k, v in score_minibatch(buf, turns).items()}
            sums, _ = candidate_forward(policy, batch)  # (R,)
            logits = turn_distribution(batch, sums, buf.normalization)  # (N, C)
            logp = torch.log_softmax(logits, -1).gather(1, batch["chosen"][:, None]).squeeze(1)  # (N,)
            old_logprobs[turns] = logp.cpu()
            entropy[turns] = ppo.entropy_from_logits(logits).cpu()
    finally:
        policy.train(was_training)
    buf.old_logprobs = old_logprobs
    return {"rollout/candidate_entropy": float(entropy.mean())}


def score_ppo_loss(
    policy: PolicyWithValueHead,
    batch: dict[str, Tensor],
    normalization: ScoreNormalization,
    clip_coef: float,
    clip_vloss: bool,
    vf_coef: float,
    ent_coef: float,
    norm_adv: bool,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped-PPO loss of a minibatch of turns (see :func:`~llamagym_pl.score_buffer.score_minibatch`).

    All candidates of every turn are scored again, with grad, in one batched forward; the ratio
    of a turn is pi(chosen) / pi_old(chosen) under the candidate softmax, the entropy that of
    the candidate distribution. Returns the loss and detached diagnostics named as in
    :func:`llamagym_pl.update.ppo_loss`.
    """
    sums, values = candidate_forward(policy, batch)  # (R,), (N,)
    logits = turn_distribution(batch, sums, normalization)  # (N, C)
    new_logprobs = torch.log_softmax(logits, -1).gather(1, batch["chosen"][:, None]).squeeze(1)  # (N,)
    advantages = batch["advantages"]  # (N,)
    every = torch.ones_like(new_logprobs, dtype=torch.bool)
    if norm_adv:
        advantages = ppo.masked_whiten(advantages, every)
    pg_loss, clipfrac, approx_kl = ppo.policy_loss(
        new_logprobs, batch["old_logprobs"], advantages, every, clip_coef
    )
    entropy = ppo.entropy_from_logits(logits).mean()
    v_loss = ppo.value_loss(
        values, batch["old_values"], batch["returns"], every, clip_coef if clip_vloss else None
    )
    return total_loss(pg_loss, v_loss, entropy, clipfrac, approx_kl, vf_coef, ent_coef)
