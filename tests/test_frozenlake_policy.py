"""``bench/frozenlake_policy.py``'s exact values: policy evaluation over FrozenLake's own
transition table, checked against hand-computable cases and the known optimum."""

from __future__ import annotations

import sys
from pathlib import Path

import gymnasium as gym
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the bench scripts are not installed

from bench.frozenlake_policy import optimal_policy, q_values  # noqa: E402

P = gym.make("FrozenLake-v1", map_name="4x4", is_slippery=True).unwrapped.P
LEFT, DOWN, RIGHT, UP = range(4)


def test_next_to_the_goal_by_hand() -> None:
    # Cell 14 (row 3, column 2), moving right: the goal (reward 1, terminal) a third of the time,
    # else up to 10 or down into the wall (stays on 14). With gamma 0 only the reward counts.
    uniform = np.full((16, 4), 0.25)
    q = q_values(uniform, P, gamma=0.0)
    assert np.isclose(q[14, RIGHT], 1 / 3) and np.isclose(q[14, DOWN], 1 / 3) and np.isclose(q[14, UP], 1 / 3)
    assert np.isclose(q[14, LEFT], 0.0)  # left: 13, 10 or 14, never the goal
    assert np.allclose(q[[5, 7, 11, 12, 15]], 0.0)  # holes and the goal are terminal


def test_the_optimal_policy_and_the_cell_10_trap_values() -> None:
    best = optimal_policy(P, 16, 4, gamma=0.99)
    q = q_values(best, P, gamma=0.99)
    # The known optimal moves of the slippery 4x4 lake at gamma 0.99.
    assert [int(best[c].argmax()) for c in (0, 4, 8, 9, 10, 13, 14)] == [
        LEFT,
        LEFT,
        UP,
        DOWN,
        LEFT,
        RIGHT,
        DOWN,
    ]
    # Cell 10: left (0.615) beats down (0.497), which risks the hole on 11 (README "FrozenLake").
    assert round(q[10, LEFT], 3) == 0.615 and round(q[10, DOWN], 3) == 0.497
    assert round(float((best * q).sum(1)[0]), 3) == 0.542  # the start's value under the optimum
