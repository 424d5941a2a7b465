"""The exact Blackjack evaluator (bench/blackjack_exact.py) against the issue's reference table
(sab=False, by dynamic programming and 2M-episode Monte Carlo) and a Monte Carlo run of the env."""

from __future__ import annotations

import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from blackjack_exact import OBSERVATIONS, expected_return, optimal_action  # noqa: E402


@pytest.mark.parametrize(
    ("name", "policy", "reference"),
    [
        ("optimal", None, -0.0466),
        ("always stick", lambda v, d, u: 0.0, -0.186),
        ("stick at >= 17", lambda v, d, u: float(v < 17), -0.079),
        ("uniformly random", lambda v, d, u: 0.5, -0.396),
    ],
)
def test_reference_returns(name, policy, reference) -> None:
    assert expected_return(policy) == pytest.approx(reference, abs=6e-4), name


def test_optimal_actions_are_basic_strategy_landmarks() -> None:
    assert optimal_action(16, 10, 0) == 1 and optimal_action(16, 6, 0) == 0  # hard 16: hit vs 10
    assert optimal_action(12, 2, 0) == 1 and optimal_action(12, 4, 0) == 0
    assert optimal_action(18, 9, 1) == 1 and optimal_action(18, 8, 1) == 0  # soft 18
    assert optimal_action(17, 1, 0) == 0 and optimal_action(11, 10, 0) == 1
    assert len(OBSERVATIONS) == 18 * 10 + 10 * 10


def test_expected_return_matches_the_env() -> None:
    """Monte Carlo of the real env under "stick at >= 17" agrees within 4 standard errors."""
    env = gym.make("Blackjack-v1", natural=False, sab=False)
    rng_returns = []
    for seed in range(20_000):
        (player, dealer, usable), _ = env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            (player, dealer, usable), reward, terminated, truncated, _ = env.step(int(player < 17))
            total, done = total + reward, terminated or truncated
        rng_returns.append(total)
    returns = np.array(rng_returns)
    stderr = returns.std(ddof=1) / np.sqrt(len(returns))
    assert abs(returns.mean() - expected_return(lambda v, d, u: float(v < 17))) < 4 * stderr
