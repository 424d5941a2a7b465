"""Where a rollout's time goes: ``python bench/profile_rollout.py [--model tiny] [--num-envs 32]``.

Profiles one ``RolloutCollector.collect`` (and ``build_buffer`` on its episodes) with cProfile
and sums the self time by component: the model's tensor ops, Hugging Face's generate loop, chat
template rendering, tokenization, the env, our own code. cProfile slows Python-heavy parts more
than tensor ops, so the non-model shares are upper bounds. ``--torch`` adds torch.profiler's
table of the top operators.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.profiler import ProfilerActivity, profile

from bench.bench import model_path
from bench.measure import ENV_ID, ENV_KWARGS, INVALID_PENALTY, MAX_NEW_TOKENS
from llamagym_pl.actions import GenerateStyle
from llamagym_pl.agents import BlackjackAgent
from llamagym_pl.buffer import build_buffer
from llamagym_pl.loading import load_causal_lm, load_tokenizer
from llamagym_pl.policy import PolicyWithValueHead
from llamagym_pl.rollout import RolloutCollector

# First match wins: (component, substrings of the function's file or name).
COMPONENTS = (
    ("chat template (Jinja)", ("chat_template_utils", "jinja2", "<template>")),
    ("tokenizer", ("tokenization_utils", "encode_batch", "decode")),
    ("HF generate loop", ("transformers/generation",)),
    (
        "model (modules + tensor ops)",
        ("transformers/", "torch/", "torch._C", "TensorBase", "<built-in method torch"),
    ),
    ("env + agent", ("gymnasium", "numpy", "agents/")),
    ("llamagym_pl", ("llamagym_pl/",)),
)


def component(func: tuple[str, int, str]) -> str:
    text = f"{func[0]}:{func[2]}"
    for name, needles in COMPONENTS:
        if any(n in text for n in needles):
            return name
    return "other Python"


def breakdown(title: str, fn: Callable[[], None], top: int = 3) -> None:
    """Run ``fn`` under cProfile; print its self time per component and each one's top functions."""
    profiler = cProfile.Profile()
    profiler.runcall(fn)
    by_component: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for func, (_, _, self_s, _, _) in pstats.Stats(profiler).stats.items():  # type: ignore[attr-defined]
        by_component[component(func)].append((self_s, f"{Path(func[0]).name}:{func[2]}"))
    whole = sum(s for items in by_component.values() for s, _ in items)
    print(f"{title}: {whole:.3f} s")
    for name, items in sorted(by_component.items(), key=lambda kv: -sum(s for s, _ in kv[1])):
        seconds = sum(s for s, _ in items)
        heads = ", ".join(f"{fn} {s * 1e3:.0f} ms" for s, fn in sorted(items, reverse=True)[:top])
        print(f"  {name:28s} {seconds:7.3f} s {seconds / whole:6.1%}   ({heads})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--num-envs", type=int, default=32)
    p.add_argument("--steps-per-env", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--torch", action="store_true", help="also print torch.profiler's top operators")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = model_path(args.model)
    tokenizer, policy = load_tokenizer(path), PolicyWithValueHead(load_causal_lm(path))
    collector = RolloutCollector(
        ENV_ID,
        ENV_KWARGS,
        BlackjackAgent(),
        args.num_envs,
        GenerateStyle(MAX_NEW_TOKENS),
        invalid_penalty=INVALID_PENALTY,
    )
    collector.collect(policy, tokenizer, seed=0, epoch=0, steps_per_env=1)  # warm up

    stats = None

    def rollout() -> None:
        nonlocal stats
        stats = collector.collect(policy, tokenizer, seed=0, epoch=1, steps_per_env=args.steps_per_env)

    print(f"{args.model}, {args.num_envs} envs x {args.steps_per_env} steps; self time under cProfile:")
    breakdown("collect", rollout)
    breakdown("build_buffer", lambda: build_buffer(tokenizer, stats.episodes))
    if args.torch:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            rollout()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
