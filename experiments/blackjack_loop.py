"""The LlamaGym loop on Blackjack: ``agent.act`` / ``env.step`` / ``agent.assign_reward`` /
``agent.terminate_episode()``, as in the original README, with the offline tiny model.

Run: ``python experiments/blackjack_loop.py`` (``--help`` for the knobs). It prints the running
mean return while it trains, then plays ``--eval-episodes`` seeded episodes greedily
(``agent.eval()``) and prints their mean return. The PPO update is the same code as
``python -m llamagym_pl.fit`` (``llamagym_pl.update``, ``llamagym_pl.ppo``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import deque

import gymnasium as gym
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llamagym_pl.agents import BlackjackAgent
from llamagym_pl.tiny_model import resolve_model_path

# Greedy evaluation deals: far from the training seeds (0 .. episodes - 1).
EVAL_SEED = 10**7


def play(agent: BlackjackAgent, env: gym.Env, seed: int, train: bool) -> tuple[float, dict[str, float]]:
    """One episode of the seed README's loop; returns its return and the update's stats (or {})."""
    observation, info = env.reset(seed=seed)
    done, total = False, 0.0
    while not done:
        action = agent.act(observation)
        observation, reward, terminated, truncated, info = env.step(action)
        total += float(reward)
        if train:
            agent.assign_reward(reward)
        done = terminated or truncated
    return total, agent.terminate_episode()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="tiny", help="a model id or directory (default: the offline tiny model)"
    )
    parser.add_argument("--episodes", type=int, default=48_000, help="training episodes")
    parser.add_argument("--eval-episodes", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128, help="episodes per PPO update")
    parser.add_argument("--ent-coef", type=float, default=0.0, help="entropy bonus")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate, decayed linearly to 0")
    # Blackjack is Markov: 40 tokens keep the system prompt and the current observation only, as
    # experiments/blackjack*.yaml do. Whole conversations (0) collapsed to "stick" on 2 seeds of 3.
    parser.add_argument(
        "--max-prompt-tokens", type=int, default=40, help="prompt budget in tokens (0: no budget)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest for the tiny model)"
    )
    parser.add_argument("--out", default=None, help="write the evaluation as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    path = resolve_model_path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    env = gym.make("Blackjack-v1", natural=False, sab=False)
    agent = BlackjackAgent(
        model,
        tokenizer,
        "cpu",
        # One-word replies: the tiny model answers "hit" or "stick" (a chat model would need more).
        generate_config_dict={"max_new_tokens": 1},
        ppo_config_dict={
            "batch_size": args.batch_size,  # episodes per PPO update (128: ~180 turns)
            "learning_rate": args.lr,  # 1e-3: the tiny model is trained from scratch
            # ... decayed linearly to 0 over the run, as experiments/blackjack-generate.yaml does.
            "lr_schedule": "linear",
            "total_updates": args.episodes // args.batch_size,
            "ent_coef": args.ent_coef,
            "update_epochs": 4,
            "num_minibatches": 4,
            "max_prompt_tokens": args.max_prompt_tokens or None,
            "invalid_penalty": -1.0,  # a reply that names no action costs -1 on its turn
            "action_space": env.action_space,
            "seed": args.seed,
        },
    )

    start, recent = time.perf_counter(), deque(maxlen=2000)
    for episode in range(args.episodes):
        total, stats = play(agent, env, seed=args.seed * 10**6 + episode, train=True)
        recent.append(total)
        if stats:
            print(
                f"episode {episode + 1:6d}  running mean return {sum(recent) / len(recent):+.3f}  "
                f"invalid {stats['rollout/invalid_action_rate']:.3f}  "
                f"hit {stats.get('rollout/action_frac/hit', float('nan')):.2f}  "
                f"entropy {stats['train/entropy']:.3f}  {time.perf_counter() - start:5.0f} s",
                flush=True,
            )
    train_seconds = time.perf_counter() - start

    agent.eval()  # greedy replies, nothing recorded
    returns = [play(agent, env, seed=EVAL_SEED + i, train=False)[0] for i in range(args.eval_episodes)]
    mean = sum(returns) / len(returns)
    stderr = math.sqrt(sum((r - mean) ** 2 for r in returns) / (len(returns) - 1) / len(returns))
    result = {
        "return_mean": mean,
        "return_stderr": stderr,
        "win": sum(r > 0 for r in returns) / len(returns),
        "episodes": len(returns),
        "train_episodes": args.episodes,
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - start,
    }
    print(
        f"greedy evaluation over {len(returns)} episodes: mean return {mean:+.4f} ± {stderr:.4f} "
        f"(win {result['win']:.3f}); trained {train_seconds:.0f} s, total {result['seconds']:.0f} s"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
