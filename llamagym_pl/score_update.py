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
from llamagym_pl.kl import ReferencePolicy
from llamagym_pl.policy import PolicyWithValueHead
from llamagym_pl.score_buffer import ScoreBuffer, score_minibatch
from llamagym_pl.scoring import ScoreNormalization, candidate_forward, turn_distribution
from llamagym_pl.update import total_loss


@torch.no_grad()
def score_candidates(
    policy: PolicyWithValueHead,
    buf: ScoreBuffer,
    batch_size: int,
    reference: ReferencePolicy | None = None,
) -> tuple[dict[str, float], Tensor | None]:
    """Fill ``buf.old_logprobs`` (N,): log pi(chosen candidate) of every turn, ``batch_size`` turns
    per forward pass, under the candidate softmax at the sampling temperature. Run it before
    :func:`~llamagym_pl.update.score_rollout` on ``buf.episodes``, which takes its KL.

    With a ``reference`` policy, returns each turn's KL penalty (E, T) from the candidate
    distributions the policy acts with: ``log pi(a) - log pi_ref(a)`` of the chosen candidate (its
    expectation over a is the KL, and, unlike the KL itself, it depends on the action, so it
    pulls each choice toward the reference), and logs ``train/kl_ref``, the mean exact
    ``KL(pi || pi_ref)`` over the candidates of each turn (>= 0). Otherwise None.
    """
    device = next(policy.parameters()).device
    temperature = buf.episodes.temperature
    was_training = policy.training
    policy.eval()
    old_logprobs, entropy = torch.zeros(len(buf)), torch.zeros(len(buf))
    chosen_kl, exact_kl = torch.zeros(len(buf)), torch.zeros(len(buf))
    try:
        for start in range(0, len(buf), batch_size):
            turns = list(range(start, min(start + batch_size, len(buf))))
            batch = {k: v.to(device) for k, v in score_minibatch(buf, turns).items()}
            sums, _ = candidate_forward(policy, batch)  # (R,)
            logp = candidate_logprobs(batch, sums, buf.normalization, temperature)  # (N, C)
            old_logprobs[turns] = chosen(logp, batch).cpu()
            entropy[turns] = ppo.entropy_from_logits(logp).cpu()
            if reference is not None:
                ref_sums = reference.candidate_logprob_sums(batch)  # (R,)
                ref_logp = candidate_logprobs(batch, ref_sums, buf.normalization, temperature)  # (N, C)
                chosen_kl[turns] = (chosen(logp, batch) - chosen(ref_logp, batch)).cpu()
                exact_kl[turns] = candidate_kl(logp, ref_logp).cpu()
    finally:
        policy.train(was_training)
    buf.old_logprobs = old_logprobs
    metrics = {"rollout/candidate_entropy": float(entropy.mean())}
    if reference is None:
        return metrics, None
    metrics["train/kl_ref"] = float(exact_kl.mean())
    kl = torch.zeros_like(buf.episodes.rewards)  # (E, T)
    kl[buf.turn_episode, buf.turn_step] = chosen_kl
    return metrics, kl


def candidate_logprobs(
    batch: dict[str, Tensor], sums: Tensor, normalization: ScoreNormalization, temperature: float
) -> Tensor:
    """(N, C) log-probabilities of each turn's candidates, ``log_softmax(scores / temperature)``
    (``-inf`` past a turn's candidates)."""
    return torch.log_softmax(turn_distribution(batch, sums, normalization) / temperature, -1)


def chosen(logp: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """(N,) log-probability of each turn's chosen candidate from (N, C) ``logp``."""
    return logp.gather(1, batch["chosen"][:, None]).squeeze(1)


def candidate_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Exact ``KL(pi || pi_ref) = sum_k pi_k (log pi_k - log ref_k)`` per turn, (N, C) -> (N,);
    slots past a turn's candidates (``-inf`` in both) contribute 0."""
    valid = torch.isfinite(logp)
    diff = torch.where(valid, logp - ref_logp, 0.0)
    return (logp.exp() * diff).sum(-1)


def score_ppo_loss(
    policy: PolicyWithValueHead,
    batch: dict[str, Tensor],
    normalization: ScoreNormalization,
    clip_coef: float,
    clip_vloss: bool,
    vf_coef: float,
    ent_coef: float,
    temperature: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped-PPO loss of a minibatch of turns (see :func:`~llamagym_pl.score_buffer.score_minibatch`).

    All candidates of every turn are scored again, with grad, in one batched forward; the ratio
    of a turn is pi(chosen) / pi_old(chosen) under the candidate softmax at ``temperature`` (the
    sampling one), the entropy that of the candidate distribution. Advantages come normalized
    once per rollout. Returns the loss and detached diagnostics named as in
    :func:`llamagym_pl.update.ppo_loss`.
    """
    sums, values = candidate_forward(policy, batch)  # (R,), (N,)
    logp = candidate_logprobs(batch, sums, normalization, temperature)  # (N, C)
    new_logprobs = chosen(logp, batch)  # (N,)
    every = torch.ones_like(new_logprobs, dtype=torch.bool)
    pg_loss, clipfrac, approx_kl = ppo.policy_loss(
        new_logprobs, batch["old_logprobs"], batch["advantages"], every, clip_coef
    )
    entropy = ppo.entropy_from_logits(logp).mean()
    v_loss = ppo.value_loss(
        values, batch["old_values"], batch["returns"], every, clip_coef if clip_vloss else None
    )
    return total_loss(pg_loss, v_loss, entropy, clipfrac, approx_kl, vf_coef, ent_coef)
