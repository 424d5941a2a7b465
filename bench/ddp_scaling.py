"""Env steps/s of training with 1 vs 2 DDP processes (CPU, gloo) on the same machine.

Runs ``python -m llamagym_pl.fit`` on experiments/blackjack-generate.yaml twice — ``devices 1`` and
``strategy ddp, devices 2`` — with validation off, and reads the TensorBoard events back: the
rollout rate (``rollout/env_steps_per_s``, the whole job's rate) and the end-to-end rate (env
steps of all ranks per second of wall time between the first and the last epoch end).

    python bench/ddp_scaling.py [--epochs 6] [--out bench_results/ddp.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parent.parent


def run(devices: int, epochs: int, workdir: Path) -> dict[str, float]:
    cmd = [
        sys.executable, "-m", "llamagym_pl.fit",
        "--config", str(ROOT / "experiments/blackjack-generate.yaml"),
        "--trainer.max_epochs", str(epochs), "--trainer.limit_val_batches", "0",
        "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(workdir / "runs"),
        "--trainer.logger.init_args.version", "v",
        "--checkpoint.dirpath", str(workdir / "ckpt"),
    ]  # fmt: skip
    if devices > 1:
        cmd += ["--trainer.strategy", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, cwd=workdir, env=env, check=True, capture_output=True, timeout=1800)
    acc = EventAccumulator(str(workdir / "runs/blackjack-generate/v"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = acc.Scalars("rollout/env_steps")  # logged at each epoch start, all ranks summed
    rates = [e.value for e in acc.Scalars("rollout/env_steps_per_s")]
    # Wall time from the first to the last epoch's log: whole epochs (rollout + update) in between.
    span = steps[-1].wall_time - steps[0].wall_time
    return {
        "processes": devices,
        "epochs": len(steps),
        "rollout_env_steps_per_s": sum(rates[1:]) / max(len(rates) - 1, 1),
        "end_to_end_env_steps_per_s": sum(e.value for e in steps[:-1]) / span,
    }


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results/ddp.json")
    args = parser.parse_args(argv)
    rows = []
    for devices in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run(devices, args.epochs, Path(tmp)))
    print(f"{'processes':>9} {'rollout env steps/s':>20} {'end-to-end env steps/s':>23}")
    for row in rows:
        print(
            f"{row['processes']:>9} {row['rollout_env_steps_per_s']:>20.0f} "
            f"{row['end_to_end_env_steps_per_s']:>23.1f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
