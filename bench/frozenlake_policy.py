"""A FrozenLake checkpoint's policy in every cell, with each move's exact value under that policy.

``python bench/frozenlake_policy.py --config experiments/frozenlake.yaml --ckpt_path <ckpt> [fit flags]``

Prints, for each of the 16 cells, the policy's probability of left/down/right/up (the score-mode
softmax over the four candidates, as training samples it) and Q(cell, move) under that same
policy, by policy evaluation over the env's own transition table (slippery 4x4 map, discount
``model.gamma``, no time limit). A cell whose best Q is not its most likely move is one the
policy has yet to learn; one where that move's probability is ~0 is a trap it will not leave by
sampling (README "FrozenLake"). A measuring tool only: nothing in training uses it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable (bench.*)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

Transitions = dict[int, dict[int, list[tuple[float, int, float, bool]]]]
"""Gymnasium's ``env.unwrapped.P``: ``P[state][action] = [(prob, next_state, reward, done), ...]``."""


def q_values(policy: np.ndarray, transitions: Transitions, gamma: float, sweeps: int = 5000) -> np.ndarray:
    """Q(s, a) of the stochastic ``policy`` (S, A) by iterated policy evaluation."""
    n_states, n_actions = policy.shape
    v = np.zeros(n_states)
    q = np.zeros((n_states, n_actions))
    for _ in range(sweeps):
        q = np.array(
            [
                [
                    sum(p * (r + gamma * v[s2] * (not done)) for p, s2, r, done in transitions[s][a])
                    for a in range(n_actions)
                ]
                for s in range(n_states)
            ]
        )
        v_next = (policy * q).sum(1)
        if np.abs(v_next - v).max() < 1e-12:
            break
        v = v_next
    return q


def optimal_policy(transitions: Transitions, n_states: int, n_actions: int, gamma: float) -> np.ndarray:
    """The greedy optimal policy (S, A), one-hot, by policy iteration (evaluate, then act greedily)."""
    policy = np.full((n_states, n_actions), 1.0 / n_actions)
    for _ in range(200):
        q = q_values(policy, transitions, gamma)
        improved = np.eye(n_actions)[q.argmax(1)]
        if np.array_equal(improved, policy):
            break
        policy = improved
    return policy


def checkpoint_policy(
    config: str, ckpt_path: str, overrides: list[str]
) -> tuple[np.ndarray, list[str], float]:
    """The checkpoint's move probabilities (16, 4) as score mode samples them, the move names and gamma."""
    import torch

    from bench.policy_probe import candidate_logits, first_turn_conversations, load_policy

    module, data = load_policy(config, ckpt_path, overrides)
    if data.hparams.policy != "score":
        raise SystemExit("frozenlake_policy: the config must use data.policy: score")
    logits = candidate_logits(module, data, first_turn_conversations(module, data, range(16)))
    probs = torch.softmax(logits / data.hparams.temperature, -1)  # the distribution training samples
    agent = data.agent
    return probs.double().numpy(), list(agent.action_names), float(module.hparams.gamma)


def main(argv: list[str] | None = None) -> None:
    import gymnasium as gym

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--ckpt_path", required=True)
    args, overrides = parser.parse_known_args(argv)
    sys.argv = sys.argv[:1]  # LightningCLI reads sys.argv when given args too
    probs, names, gamma = checkpoint_policy(args.config, args.ckpt_path, overrides)
    transitions = gym.make("FrozenLake-v1", map_name="4x4", is_slippery=True).unwrapped.P
    q = q_values(probs, transitions, gamma)
    print(f"cell  {'  '.join(f'{n:>6}' for n in names)}  |  Q under this policy (gamma {gamma})")
    for cell in range(16):
        likely = probs[cell].argmax()  # a move as good as the best (a tie) is not flagged
        flag = "  <- not its best move" if q[cell, likely] < q[cell].max() - 1e-9 else ""
        print(
            f"{cell:4}  {'  '.join(f'{p:6.4f}' for p in probs[cell])}  |  "
            + "  ".join(f"{x:6.3f}" for x in q[cell])
            + flag
        )


if __name__ == "__main__":
    main()
