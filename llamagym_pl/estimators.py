"""Critic-free advantage estimators as pure functions over tensors: GRPO and GiGPO.

GAE (:func:`llamagym_pl.ppo.compute_gae`) needs a critic; these compare episodes played from the
same initial state instead (a *group*: ``data.group_size`` episodes from one reset seed).

* ``grpo`` (Shao et al. 2024, DeepSeekMath; as TRL, verl and RAGEN use it): an episode's advantage
  is its return minus its group's mean return, divided by the group's standard deviation
  (``std_norm``; without it, Dr. GRPO's unscaled form). Every turn of the episode gets it.
* ``gigpo`` (Feng et al. 2025, verl-agent): that episode-level advantage plus
  ``step_weight`` times a step-level one: turns of one group whose observation text is identical
  form an *anchor-state group*, and each turn's discounted return-to-go is normalized within its
  anchor group. Two replies to the same state are compared by what followed them.

Conventions (tested against hand values in ``tests/test_estimators.py``):

* An episode's return is the undiscounted sum of its rewards; a truncated episode's return is
  what it collected (no critic, so nothing is bootstrapped). Returns-to-go use ``gamma``.
* A group (or anchor group) of one, or whose returns are all equal, gives advantage exactly 0:
  it has nothing to compare against (``train/zero_advantage_share`` counts such turns).
* The standard deviation is the unbiased one (``torch.std``), as in GRPO implementations; its
  division adds ``eps`` to the denominator.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

EstimatorName = Literal["gae", "grpo", "gigpo"]
CRITIC_FREE = ("grpo", "gigpo")


@dataclass(frozen=True)
class GroupEstimator:
    """How a critic-free estimator turns a rollout's rewards into advantages (``model.*`` keys:
    ``advantage_estimator``, ``group_std_norm``, ``step_advantage_weight``)."""

    name: Literal["grpo", "gigpo"]
    std_norm: bool = True
    step_weight: float = 1.0
    eps: float = 1e-6


def group_estimator(name: EstimatorName, std_norm: bool, step_weight: float) -> GroupEstimator | None:
    """The critic-free estimator that the ``model.*`` settings name; None for ``gae`` (a critic)."""
    return GroupEstimator(name, std_norm, step_weight) if name in CRITIC_FREE else None


def group_ids(keys: Sequence[Hashable | None]) -> Tensor:
    """Consecutive group numbers (N,) for ``keys``: equal keys share a number; a ``None`` key is a
    group of its own."""
    numbers: dict[Hashable, int] = {}
    out = []
    for i, key in enumerate(keys):
        key = ("__own__", i) if key is None else key
        out.append(numbers.setdefault(key, len(numbers)))
    return torch.tensor(out, dtype=torch.long)


def grouped_normalize(x: Tensor, group: Tensor, std_norm: bool = True, eps: float = 1e-6) -> Tensor:
    """``(x - mean_g) / (std_g + eps)`` (or ``x - mean_g``) of each element within its group.

    x: (N,) float; group: (N,) long group numbers (any values). Groups of one and groups whose
    values are all equal give exactly 0. Computed in float64; returns x's dtype (at least float32).
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    if x.numel() == 0:
        return x.to(dtype)
    _, group = torch.unique(group, return_inverse=True)
    n_groups = int(group.max()) + 1
    values = x.detach().double()
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, torch.ones_like(values))
    mean = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, values) / count
    dev = values - mean[group]
    high = torch.full((n_groups,), -torch.inf, dtype=torch.float64).scatter_reduce(0, group, values, "amax")
    low = torch.full((n_groups,), torch.inf, dtype=torch.float64).scatter_reduce(0, group, values, "amin")
    # Not dev == 0: the mean of equal floats need not equal them (0.1 * 3 / 3 != 0.1).
    spread = (high > low)[group]
    if std_norm:
        var = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, dev * dev)
        std = (var / (count - 1).clamp(min=1)).sqrt()
        dev = dev / (std[group] + eps)
    return torch.where(spread, dev, torch.zeros_like(dev)).to(dtype)


def returns_to_go(rewards: Tensor, turn_mask: Tensor, gamma: float) -> Tensor:
    """Discounted return from each turn to its episode's end, (E, T); 0 outside ``turn_mask``
    (a left-aligned prefix per episode, as for :func:`~llamagym_pl.ppo.compute_gae`)."""
    mask = turn_mask.bool()
    rewards = torch.where(mask, rewards.double(), torch.zeros((), dtype=torch.float64))
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return torch.where(mask, out, torch.zeros_like(out)).float()


def group_advantages(
    estimator: GroupEstimator,
    rewards: Tensor,
    turn_mask: Tensor,
    group: Tensor,
    anchor: Tensor,
    gamma: float,
) -> tuple[Tensor, dict[str, float]]:
    """Each turn's advantage under ``estimator``, (E, T) float32 (0 outside ``turn_mask``), and
    its diagnostics.

    rewards, turn_mask: (E, T) per-turn rewards of E episodes. group: (E,) each episode's group
    (episodes from one initial state). anchor: (E, T) each turn's anchor-state group (equal where
    the group and the observation are the same; read by ``gigpo`` only). gamma: the discount of
    the step-level returns-to-go.
    """
    mask = turn_mask.bool()
    episode_return = torch.where(mask, rewards.double(), torch.zeros((), dtype=torch.float64)).sum(1)
    episode_adv = grouped_normalize(episode_return, group, estimator.std_norm, estimator.eps)  # (E,)
    zero = torch.zeros((), dtype=torch.float64)
    advantages = torch.where(mask, episode_adv[:, None].expand_as(mask), zero)  # (E, T) float64
    _, sizes = torch.unique(group, return_counts=True)
    metrics = {"train/group_size_mean": float(sizes.double().mean())}
    if estimator.name == "gigpo":
        rtg = returns_to_go(rewards, mask, gamma)
        step_adv = torch.zeros_like(advantages)
        step = grouped_normalize(rtg[mask], anchor[mask], estimator.std_norm, estimator.eps)
        step_adv[mask] = step.double()
        advantages = advantages + estimator.step_weight * step_adv
        _, anchor_sizes = torch.unique(anchor[mask], return_counts=True)
        metrics["train/anchor_group_size_mean"] = float(anchor_sizes.double().mean())
        metrics["train/step_advantage_abs_mean"] = float(step_adv[mask].abs().mean())
    advantages = advantages.float()
    metrics["train/zero_advantage_share"] = float((advantages[mask] == 0).double().mean())
    return advantages, metrics
