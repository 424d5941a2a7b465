"""The two PPO steps that need the policy: scoring a rollout and the minibatch loss.

Shared by :class:`~llamagym_pl.module.PPOModule` (Lightning) and the imperative
:class:`~llamagym_pl.agent.Agent` loop, so both train with exactly the same math
(:mod:`llamagym_pl.ppo`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from llamagym_pl import ppo
from llamagym_pl.buffer import RolloutBuffer
from llamagym_pl.kl import ReferencePolicy, turn_kl
from llamagym_pl.policy import PolicyWithValueHead

Reduce = Callable[[Tensor], Tensor]
"""Sums a tensor over DDP ranks (identity in one process)."""


@torch.no_grad()
def score_rollout(
    policy: PolicyWithValueHead,
    buf: RolloutBuffer,
    gamma: float,
    gae_lambda: float,
    batch_size: int,
    reference: ReferencePolicy | None = None,
    kl_coef: float = 0.0,
    *,
    candidate_kl: Tensor | None = None,
    norm_adv: bool = True,
    reduce: Reduce | None = None,
) -> dict[str, float]:
    """Fill ``buf`` with old log-probs and turn values (one forward per row), GAE and the policy
    loss's advantages.

    The value of turn ``t`` of episode ``e`` is read at ``value_positions[e, t]`` (end of its
    prompt) of row ``value_rows[e, t]``; the bootstrap value of a truncated or cut episode at
    ``bootstrap_position[e]`` of row ``bootstrap_row[e]``. GAE runs over each episode's turns,
    across its rows: a prompt that dropped old turns does not cut the episode's return. Token
    log-probs are those of ``softmax(logits / buf.temperature)``, the distribution sampled from.

    KL to the initial policy: with a ``reference`` policy, each turn's reward enters GAE as
    ``r_t - kl_coef * sum over the turn's tokens of (logp - ref_logp)`` (see
    :mod:`llamagym_pl.kl`; ``buf.rewards`` keeps the env rewards), and ``train/kl_ref`` (mean
    per-turn KL) is returned. A per-turn KL computed elsewhere (score mode: from the candidate
    distributions, :func:`llamagym_pl.score_update.score_candidates`) comes as ``candidate_kl``
    (E, T).

    ``buf.advantages`` are GAE's plus each turn's format penalty; ``buf.pg_advantages``, what the
    policy loss uses, are those normalized once over the whole rollout (``norm_adv``), with
    moments summed over DDP ranks by ``reduce``.
    """
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    logprobs = torch.zeros(buf.input_ids.shape)
    values = torch.zeros(buf.input_ids.shape)
    ref_logprobs = torch.zeros(buf.input_ids.shape) if reference is not None else None
    try:
        for start in range(0, len(buf), batch_size):
            rows = slice(start, start + batch_size)
            length = int(buf.lengths[rows].max())
            ids = buf.input_ids[rows, :length].to(device)
            mask = buf.attention_mask[rows, :length].to(device)
            logits, v = policy(ids, mask)  # (B, L, V), (B, L)
            # logprobs[:, i] = log p(token i | tokens < i); position 0 has no prediction.
            logprobs[rows, 1:length] = ppo.token_logprobs(logits[:, :-1] / buf.temperature, ids[:, 1:]).cpu()
            values[rows, :length] = v.float().cpu()
            if ref_logprobs is not None:
                ref_logprobs[rows, 1:length] = reference.token_logprobs(ids, mask, buf.temperature).cpu()
    finally:
        policy.train(was_training)
    buf.old_logprobs = logprobs
    buf.old_values = values[buf.value_rows, buf.value_positions] * buf.turn_mask  # (E, T)
    next_value = values[buf.bootstrap_row, buf.bootstrap_position]  # (E,)
    metrics = {}
    if ref_logprobs is not None:
        num_turns = buf.turn_mask.shape[1]
        row_kl = turn_kl(logprobs, ref_logprobs, buf.action_mask, buf.turn_index, num_turns)  # (R, T)
        # Each turn's tokens are in one row: summing an episode's rows gathers its turns.
        kl = torch.zeros_like(buf.rewards).index_add_(0, buf.row_episode, row_kl)  # (E, T)
        metrics["train/kl_ref"] = float(ppo.masked_mean(kl, buf.turn_mask))
    else:
        kl = candidate_kl
    rewards = buf.rewards if kl is None else buf.rewards - kl_coef * kl
    advantages, buf.returns = ppo.compute_gae(
        rewards, buf.old_values, buf.turn_mask, next_value, buf.terminated, gamma, gae_lambda
    )
    # Format penalties act on their own turn only (see Episode.penalties); returns, the value
    # targets, stay pure env returns.
    buf.advantages = advantages + buf.penalties * buf.turn_mask
    buf.pg_advantages = normalized_advantages(buf.advantages, buf.turn_mask, norm_adv, reduce)
    return {
        "rollout/value_mean": float(ppo.masked_mean(buf.old_values, buf.turn_mask)),
        "rollout/advantage_mean": float(ppo.masked_mean(buf.advantages, buf.turn_mask)),
        **metrics,
    }


def normalized_advantages(advantages: Tensor, mask: Tensor, norm_adv: bool, reduce: Reduce | None) -> Tensor:
    """Advantages whitened over every turn of the rollout (of all ranks, with ``reduce``).

    Once per rollout and per turn, not per minibatch (CleanRL's per-minibatch whitening): our
    minibatches group rows of similar length, and a row's length depends on the actions taken
    (reply length, number of turns), so a per-minibatch mean would be an action-dependent
    baseline. Eight one-turn episodes, short replies +1 and long ones -1, sorted into two
    minibatches, whitened to exactly 0: no policy gradient at all.
    """
    if not norm_adv:
        return advantages * mask
    moments = ppo.masked_moments(advantages, mask)
    if reduce is not None:
        moments = reduce(moments)
    return ppo.whiten_with_moments(advantages, mask, moments)


def ppo_loss(
    policy: PolicyWithValueHead,
    batch: dict[str, Tensor],
    clip_coef: float,
    clip_vloss: bool,
    vf_coef: float,
    ent_coef: float,
    temperature: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped-PPO loss of one minibatch (see :func:`llamagym_pl.buffer.minibatch`).

    Returns the loss to minimize and detached diagnostics (policy/value loss, entropy,
    approx-KL, clipfrac). Only response tokens enter the policy and entropy terms, both under
    ``softmax(logits / temperature)``, the distribution sampled from; only turn value positions
    enter the value term. Advantages come normalized (once per rollout, :func:`score_rollout`).
    """
    logits, values = policy(batch["input_ids"], batch["attention_mask"])  # (B, L, V), (B, L)
    rows, cols = batch["action_mask"].nonzero(as_tuple=True)  # response tokens; never position 0
    # (N, V): the logits that predicted each response token, at the sampling temperature.
    step_logits = logits[rows, cols - 1] / temperature
    new_logprobs = ppo.token_logprobs(step_logits, batch["input_ids"][rows, cols])  # (N,)
    old_logprobs = batch["old_logprobs"][rows, cols]  # (N,)
    advantages = batch["token_advantages"][rows, cols]  # (N,)
    every = torch.ones_like(new_logprobs, dtype=torch.bool)
    pg_loss, clipfrac, approx_kl = ppo.policy_loss(new_logprobs, old_logprobs, advantages, every, clip_coef)
    entropy = ppo.entropy_from_logits(step_logits).mean()
    turn_values = values.gather(1, batch["value_positions"])  # (B, T)
    v_loss = ppo.value_loss(
        turn_values,
        batch["old_values"],
        batch["returns"],
        batch["turn_mask"],
        clip_coef if clip_vloss else None,
    )
    return total_loss(pg_loss, v_loss, entropy, clipfrac, approx_kl, vf_coef, ent_coef)


def total_loss(
    pg_loss: Tensor,
    v_loss: Tensor,
    entropy: Tensor,
    clipfrac: Tensor,
    approx_kl: Tensor,
    vf_coef: float,
    ent_coef: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO objective and its logged diagnostics, shared by generate and score mode."""
    loss = pg_loss - ent_coef * entropy + vf_coef * v_loss
    metrics = {
        "train/policy_loss": pg_loss.detach(),
        "train/value_loss": v_loss.detach(),
        "train/entropy": entropy.detach(),
        "train/approx_kl": approx_kl,
        "train/clipfrac": clipfrac,
        "train/loss": loss.detach(),
    }
    return loss, metrics
