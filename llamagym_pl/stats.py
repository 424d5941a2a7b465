"""Statistics of a rollout's episodes: what TensorBoard shows under ``rollout/``, summed over DDP
ranks before they are averaged, and transcripts of a few conversations. A leaf, like
:mod:`llamagym_pl.episode`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym

from llamagym_pl.episode import Episode


@dataclass
class RolloutStats:
    episodes: list[Episode]
    env_steps: int
    generated_tokens: int
    prompt_tokens: int
    generation_seconds: float
    env_seconds: float
    seconds: float
    env_errors: int = 0  # env faults: their episodes were dropped
    # A Discrete action space's action names (agent.action_names, else the action numbers): the
    # share of each parsed action is logged. None: any other space.
    action_names: list[str] | None = None
    action_start: int = 0  # the Discrete space's first action


def discrete_action_names(space: gym.Space | None, agent: Any) -> list[str] | None:
    """Names of a ``Discrete`` space's actions for logging: the agent's ``action_names``, or the
    actions' numbers; None for other spaces."""
    if not isinstance(space, gym.spaces.Discrete):
        return None
    names = agent.action_names
    if names is not None and len(names) == space.n:
        return [str(n) for n in names]
    return [str(space.start + i) for i in range(space.n)]


def rollout_totals(stats: RolloutStats) -> dict[str, float]:
    """Additive per-rollout sums: reduce them across DDP ranks, then :func:`metrics_from_totals`."""
    done = [ep for ep in stats.episodes if ep.done]
    actions = {}
    if stats.action_names is not None:  # the same keys on every rank: DDP reduces them as a vector
        counts = [0.0] * len(stats.action_names)
        for ep in stats.episodes:
            for action, invalid in zip(ep.actions, ep.invalid, strict=False):
                if not invalid:
                    counts[int(action) - stats.action_start] += 1.0
        actions = {f"action/{name}": n for name, n in zip(stats.action_names, counts, strict=True)}
    return {
        "episodes": float(len(done)),
        "return_sum": float(sum(ep.env_return for ep in done)),
        "length_sum": float(sum(ep.num_turns for ep in done)),
        "turns": float(sum(ep.num_turns for ep in stats.episodes)),
        "invalid": float(sum(sum(ep.invalid) for ep in stats.episodes)),
        "env_steps": float(stats.env_steps),
        "generated_tokens": float(stats.generated_tokens),
        "seconds": stats.seconds,
        "generation_seconds": stats.generation_seconds,
        "env_seconds": stats.env_seconds,
        "env_errors": float(stats.env_errors),
        **actions,
    }


def metrics_from_totals(totals: dict[str, float], world_size: int = 1) -> dict[str, float]:
    """Logged rollout metrics; returns are over episodes the env ended.

    With ``world_size`` ranks the totals are sums over ranks (timings too): throughput is the
    summed work over the mean wall time, i.e. the whole job's rate.
    """
    seconds = max(totals["seconds"] / world_size, 1e-9)
    gen_seconds = max(totals["generation_seconds"] / world_size, 1e-9)
    turns = max(totals["turns"], 1.0)
    metrics = {
        "rollout/episodes": totals["episodes"],
        "rollout/env_steps": totals["env_steps"],
        "rollout/invalid_action_rate": totals["invalid"] / turns,
        "rollout/env_steps_per_s": totals["env_steps"] / seconds,
        "rollout/generated_tokens_per_s": totals["generated_tokens"] / gen_seconds,
        "rollout/generation_s": totals["generation_seconds"] / world_size,
        "rollout/env_s": totals["env_seconds"] / world_size,
        "rollout/env_errors": totals["env_errors"],
        # Mean reply length: generated tokens per turn (score mode: the chosen candidate's tokens).
        "rollout/reply_tokens": totals["generated_tokens"] / turns,
    }
    for key, count in totals.items():  # the share of turns that played each (valid) action
        if key.startswith("action/"):
            metrics[f"rollout/action_frac/{key.removeprefix('action/')}"] = count / turns
    if totals["episodes"] > 0:
        metrics["rollout/return_mean"] = totals["return_sum"] / totals["episodes"]
        metrics["rollout/episode_length"] = totals["length_sum"] / totals["episodes"]
    return metrics


def rollout_metrics(stats: RolloutStats) -> dict[str, float]:
    """Logged metrics of one process's rollout (see :func:`metrics_from_totals`)."""
    return metrics_from_totals(rollout_totals(stats))


def transcript(ep: Episode) -> str:
    """One episode's conversation, rendered for TensorBoard's text tab."""
    lines = [f"**system**: {ep.system_prompt}"]
    for t, response in enumerate(ep.responses):
        lines.append(f"**user**: {ep.observations[t]}")
        flag = " *(invalid)*" if ep.invalid[t] else ""
        lines.append(f"**assistant**: {response}{flag}  (reward {ep.rewards[t]:+.2f})")
    lines.append(f"return {ep.env_return:+.2f}, {'terminated' if ep.terminated else 'truncated'}")
    return "  \n".join(lines)
