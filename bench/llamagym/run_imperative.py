"""LlamaGym's Blackjack loop on llamagym_pl's imperative ``Agent`` (``act``, ``assign_reward``,
``terminate_episode``): the same prompts, parsing, model and serial loop as ``run_llamagym.py``,
the env seeded once. Equal work: LlamaGym trains every 16 turns with 4 PPO epochs of one
minibatch; here every ``--batch-episodes`` 8 episodes (about 16 turns at ~1.95 turns an episode),
4 update epochs, one minibatch. LlamaGym also runs a reference model for its adaptive KL; this
loop has no KL penalty, so it does a little less work per update.

    python bench/llamagym/run_imperative.py --model DIR --episodes 300 [--threads 2] [--json-out F]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gymnasium as gym
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.llamagym.agent import LlamaGymBlackjackAgent
from bench.llamagym.common import ENV_ID, ENV_KWARGS, SEED, OtherLoad, write_json


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--episodes", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-episodes", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    agent = LlamaGymBlackjackAgent(
        AutoModelForCausalLM.from_pretrained(args.model),
        AutoTokenizer.from_pretrained(args.model),
        "cpu",
        {"max_new_tokens": args.max_new_tokens, "do_sample": True},
        {"batch_size": args.batch_episodes, "update_epochs": 4, "num_minibatches": 1, "seed": SEED},
    )
    env = gym.make(ENV_ID, **ENV_KWARGS)
    # Build the PPO engine (and import it) before the clock, as LlamaGym's Agent constructor builds
    # its PPOTrainer: both loops are timed from the first act on.
    agent.imperative  # noqa: B018
    steps, returns, updates = 0, [], 0
    load, start = OtherLoad(), time.perf_counter()
    for episode in range(args.episodes):
        observation, _ = env.reset(seed=SEED) if episode == 0 else env.reset()
        done, total = False, 0.0
        while not done:
            observation, reward, terminated, truncated, _ = env.step(agent.act(observation))
            agent.assign_reward(reward)
            total, steps, done = total + float(reward), steps + 1, terminated or truncated
        returns.append(total)
        updates += bool(agent.terminate_episode())
    wall = time.perf_counter() - start
    result = {
        "system": "llamagym_pl imperative",
        "model": args.model,
        "episodes": args.episodes,
        "env_steps": steps,
        "ppo_updates": updates,
        "wall_s": round(wall, 2),
        "env_steps_per_s": round(steps / wall, 3),
        "mean_return": round(sum(returns) / len(returns), 4),
        "other_procs_cpu_per_wall": round(load.cores(wall), 3),
        "threads": args.threads,
    }
    write_json(result, args.json_out)


if __name__ == "__main__":
    main()
