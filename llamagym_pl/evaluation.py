"""Greedy evaluation: fixed seeds, batched across envs, mean return with its standard error."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from llamagym_pl.episode import derive_seed
from llamagym_pl.rollout import RolloutCollector
from llamagym_pl.stats import RolloutStats

# Evaluation episodes come from their own seed stream, the same at every evaluation, so two
# checkpoints are compared on the very same deals.
EVAL_STREAM = 7_777_777


def evaluate(
    policy, tokenizer, collector: RolloutCollector, num_episodes: int, seed: int, rank: int = 0
) -> dict:
    """Play ``num_episodes`` (rounded up to a multiple of ``collector.num_envs``) greedily.

    Returns ``return_mean``, ``return_stderr``, ``win_rate``/``draw_rate``/``loss_rate``
    (return > 0, = 0, < 0), ``invalid_action_rate``, ``episode_length``, ``episodes`` and
    ``env_errors`` (env faults; their episodes were replaced).

    Under DDP every rank calls this at once with its own ``rank`` and share of the episodes (its
    deals are seeded by its rank, so no two ranks play the same one). The numbers returned are
    then over the episodes of all ranks (their sums are all-reduced), the same on every rank:
    ``episodes`` is the job's total and ``return_stderr`` the standard error of the pooled mean.
    """
    if num_episodes < 1:
        raise ValueError(f"num_episodes={num_episodes} must be >= 1")
    per_env = math.ceil(num_episodes / collector.num_envs)
    stats = collector.collect(
        policy,
        tokenizer,
        seed=derive_seed(seed, EVAL_STREAM),
        epoch=0,
        rank=rank,
        episodes_per_env=per_env,
        greedy=True,
    )
    totals = _sum_over_ranks(eval_totals(stats))
    return eval_metrics(totals)


def eval_totals(stats: RolloutStats) -> dict[str, float]:
    """Additive sums of one process's evaluation episodes (summed over DDP ranks as they are)."""
    returns = [ep.env_return for ep in stats.episodes]
    return {
        "episodes": float(len(returns)),
        "return_sum": math.fsum(returns),
        "return_sq_sum": math.fsum(r * r for r in returns),
        "wins": float(sum(r > 0 for r in returns)),
        "draws": float(sum(r == 0 for r in returns)),
        "losses": float(sum(r < 0 for r in returns)),
        "turns": float(sum(ep.num_turns for ep in stats.episodes)),
        "invalid": float(sum(sum(ep.invalid) for ep in stats.episodes)),
        "env_steps": float(stats.env_steps),
        "seconds": stats.seconds,
        "env_errors": float(stats.env_errors),
        "ranks": 1.0,
    }


def eval_metrics(totals: dict[str, float]) -> dict:
    """The reported numbers from (possibly rank-summed) :func:`eval_totals`."""
    n = totals["episodes"]
    mean = totals["return_sum"] / n
    # Sample variance from the sums (float64; returns are small, so no cancellation to fear).
    var = max(totals["return_sq_sum"] - n * mean * mean, 0.0) / (n - 1) if n > 1 else float("nan")
    return {
        "episodes": int(n),
        "return_mean": mean,
        "return_stderr": math.sqrt(var / n),
        "win_rate": totals["wins"] / n,
        "draw_rate": totals["draws"] / n,
        "loss_rate": totals["losses"] / n,
        "invalid_action_rate": totals["invalid"] / max(totals["turns"], 1.0),
        "episode_length": totals["turns"] / n,
        # Summed work over the ranks' mean wall time: the whole job's rate.
        "env_steps_per_s": totals["env_steps"] / max(totals["seconds"] / totals["ranks"], 1e-9),
        "env_errors": int(totals["env_errors"]),  # dropped episodes (replaced: ``episodes`` stays whole)
    }


def _sum_over_ranks(totals: dict[str, float]) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return totals
    # nccl reduces CUDA tensors only (Lightning has set this process's device); gloo CPU ones.
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    packed = torch.tensor(list(totals.values()), dtype=torch.float64, device=device)
    dist.all_reduce(packed)  # sum
    return dict(zip(totals, packed.tolist(), strict=True))
