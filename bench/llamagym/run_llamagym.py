"""LlamaGym 0.1.1's serial Blackjack loop, timed; runs in LlamaGym's own venv (``setup.sh``).

The loop of LlamaGym's README and ``examples/blackjack.py``: ``agent.act`` -> ``env.step`` ->
``agent.assign_reward`` ... -> ``agent.terminate_episode`` (TRL 0.7.11's ``PPOTrainer.step``
every 16 turns, 4 PPO epochs of one minibatch), on a random Llama from ``models.py``, on the CPU.
Timing leaves LlamaGym's behaviour alone: the value-head model's ``generate`` and the agent's
``train_batch`` are wrapped on the instance to add up their time.

    <llamagym venv>/bin/python bench/llamagym/run_llamagym.py --model DIR --episodes 300 [--json-out F]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for bench.*
warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import gymnasium as gym  # noqa: E402
import torch  # noqa: E402
from llamagym import Agent  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from trl import AutoModelForCausalLMWithValueHead  # noqa: E402

from bench.llamagym.common import (  # noqa: E402
    ENV_ID,
    ENV_KWARGS,
    SEED,
    SYSTEM_PROMPT,
    OtherLoad,
    format_observation,
    parse_action,
    write_json,
)


class BlackjackAgent(Agent):
    """LlamaGym's example agent; counts the replies that named no action (played as a hit)."""

    unparsed = 0
    ppo_seconds = 0.0
    ppo_steps = 0

    def get_system_prompt(self) -> str:
        return SYSTEM_PROMPT

    def format_observation(self, observation: Any) -> str:
        return format_observation(observation)

    def extract_action(self, response: str) -> int:
        action, parsed = parse_action(response)
        self.unparsed += not parsed
        return action

    def train_batch(self, batch_queries: list, batch_responses: list, batch_rewards: list) -> dict:
        start = time.perf_counter()
        stats = super().train_batch(batch_queries, batch_responses, batch_rewards)
        self.ppo_seconds += time.perf_counter() - start
        self.ppo_steps += 1
        return stats


def timed_generate(model: Any, clock: dict[str, float]) -> None:
    """Add the seconds of every ``model.generate`` call to ``clock["generate"]``."""
    inner = model.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        clock["generate"] += time.perf_counter() - start
        return out

    model.generate = generate  # an instance attribute: LlamaGym's act() calls it


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--episodes", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16, help="turns per PPO step (TRL's batch_size)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(args.model)
    generate_config = {"max_new_tokens": args.max_new_tokens, "do_sample": True}
    ppo_config = {"batch_size": args.batch_size, "mini_batch_size": args.batch_size, "seed": SEED}
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    agent = BlackjackAgent(model, tokenizer, "cpu", generate_config, ppo_config)
    clock = {"generate": 0.0}
    timed_generate(agent.model, clock)
    env = gym.make(ENV_ID, **ENV_KWARGS)
    steps, returns, none_actions = 0, [], 0
    load, start = OtherLoad(), time.perf_counter()
    for episode in range(args.episodes):
        observation, _ = env.reset(seed=SEED) if episode == 0 else env.reset()
        done = False
        while not done:
            action = agent.act(observation)
            if action is None:  # LlamaGym's act returns None when extract_action raises (ours never does)
                action, none_actions = 1, none_actions + 1
            observation, reward, terminated, truncated, _ = env.step(action)
            agent.assign_reward(reward)
            steps, done = steps + 1, terminated or truncated
        returns.append(float(sum(agent.current_episode_rewards)))
        agent.terminate_episode()
    wall = time.perf_counter() - start
    result = {
        "system": "LlamaGym 0.1.1",
        "model": args.model,
        "episodes": args.episodes,
        "env_steps": steps,
        "ppo_steps": agent.ppo_steps,
        "wall_s": round(wall, 2),
        "env_steps_per_s": round(steps / wall, 3),
        "generate_share": round(clock["generate"] / wall, 4),
        "ppo_share": round(agent.ppo_seconds / wall, 4),
        "mean_return": round(sum(returns) / len(returns), 4),
        "unparsed_replies": agent.unparsed,
        "none_actions": none_actions,
        "other_procs_cpu_per_wall": round(load.cores(wall), 3),
        "threads": args.threads,
    }
    write_json(result, args.json_out)


if __name__ == "__main__":
    main()
