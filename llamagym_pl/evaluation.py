"""Greedy evaluation: fixed seeds, batched across envs, mean return with its standard error."""

from __future__ import annotations

import math

import numpy as np

from llamagym_pl.rollout import RolloutCollector, derive_seed

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
    returns = np.array([ep.env_return for ep in stats.episodes], dtype=np.float64)
    turns = sum(ep.num_turns for ep in stats.episodes)
    invalid = sum(sum(ep.invalid) for ep in stats.episodes)
    n = len(returns)
    return {
        "episodes": n,
        "return_mean": float(returns.mean()),
        "return_stderr": float(returns.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "win_rate": float((returns > 0).mean()),
        "draw_rate": float((returns == 0).mean()),
        "loss_rate": float((returns < 0).mean()),
        "invalid_action_rate": invalid / max(turns, 1),
        "episode_length": turns / n,
        "env_steps_per_s": stats.env_steps / max(stats.seconds, 1e-9),
        "env_errors": stats.env_errors,  # dropped episodes (replaced: ``episodes`` stays whole)
    }
