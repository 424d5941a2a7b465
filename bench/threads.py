"""Time one PPO-sized forward+backward of the tiny model with 1 and 2 torch threads.

``python bench/threads.py [--rows 128] [--tokens 37]``: why the tiny-model experiments set
``torch_num_threads: 1``. Each thread count runs in its own process (torch fixes its thread pool
at first use). Run it on an idle machine and again with another job busy on a core.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def child(threads: int, rows: int, tokens: int) -> float:
    import torch

    torch.set_num_threads(threads)
    from llamagym_pl.loading import build_policy
    from llamagym_pl.tiny_model import resolve_model_path

    policy = build_policy(str(resolve_model_path("tiny"))).train()
    ids = torch.randint(10, 400, (rows, tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def step() -> None:
        logits, values = policy(ids, mask)
        (logits[:, -1].logsumexp(-1).sum() + values.sum()).backward()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(10):
        step()
    return (time.perf_counter() - start) / 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=37)
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(child(args.child, args.rows, args.tokens))
        return
    print(f"forward+backward of {args.rows} x {args.tokens} tokens, tiny model")
    for threads in (1, 2):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            str(threads),
            "--rows",
            str(args.rows),
            "--tokens",
            str(args.tokens),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1]
        print(f"  {threads} thread(s): {float(out) * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
