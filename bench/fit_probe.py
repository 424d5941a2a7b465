"""The whole fit loop, timed: ``llamagym_pl.fit`` on experiments/blackjack-generate.yaml, validation off.

Records the time, env steps and RSS at every epoch end; the long run's RSS trend is the memory
check (a leak grows it epoch after epoch).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.measure import peak_rss_mb, reset_peak_rss, rss_mb

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "experiments" / "blackjack-generate.yaml"


def fit_probe(
    epochs: int, overrides: list[str], workdir: str, config: Path = CONFIG, logger: bool = True
) -> dict[str, Any]:
    """Run ``llamagym_pl.fit`` on ``config`` (default: the default generate experiment), with its
    TensorBoard logger writing to ``workdir`` or none; time and RSS at every epoch end."""
    from lightning.pytorch.callbacks import Callback

    from llamagym_pl.fit import build_cli

    class EpochProbe(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.rss: list[float] = []
            self.steps: list[int] = []
            self.rollout_s: list[float] = []

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            stats = trainer.datamodule.rollout.stats
            self.times.append(time.perf_counter())
            self.rss.append(rss_mb())
            self.steps.append(stats.env_steps)
            self.rollout_s.append(stats.seconds)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    args = [
        "--config", str(config),
        "--trainer.max_epochs", str(epochs),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.limit_val_batches", "0",
        *(["--trainer.logger.init_args.save_dir", workdir] if logger else ["--trainer.logger", "false"]),
        "--checkpoint.dirpath", f"{workdir}/checkpoints",
        *overrides,
    ]  # fmt: skip
    reset_peak_rss()
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when both args and argv are given
    try:
        cli = build_cli(args=args, run_fit=False)
    finally:
        sys.argv = argv
    probe = EpochProbe()
    cli.trainer.callbacks.append(probe)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    # Epoch 0 pays one-off costs (first forward, allocator growth): rates are over the rest.
    span = probe.times[-1] - probe.times[0]
    steady_steps = sum(probe.steps[1:])
    return {
        "overrides": list(overrides),
        "epochs": len(probe.times),
        "seconds": probe.times[-1] - start,
        "env_steps": sum(probe.steps),
        "env_steps_per_s": steady_steps / span if span > 0 else float("nan"),
        "rollout_share": sum(probe.rollout_s[1:]) / span if span > 0 else float("nan"),
        "rss_mb": probe.rss,
        # Over the last half of a long run only: a few epochs show allocator warm-up, not a trend.
        "rss_slope_mb_per_epoch": slope(probe.rss[len(probe.rss) // 2 :]) if len(probe.rss) >= 10 else None,
        "peak_rss_mb": peak_rss_mb(),
    }


def slope(values: list[float]) -> float:
    """Least-squares slope of ``values`` per index (0 with fewer than 2 points)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    return num / sum((i - mean_x) ** 2 for i in range(n))


# Small settings for the long run that watches RSS, and for the quick run's whole fit.
SMALL = [
    "--data.num_envs", "8", "--data.steps_per_env", "4",
    "--model.update_epochs", "1", "--model.num_minibatches", "2",
]  # fmt: skip
QUICK = [
    "--data.num_envs", "4", "--data.steps_per_env", "2",
    "--model.update_epochs", "1", "--model.num_minibatches", "2",
]  # fmt: skip


def fit_probes(quick: bool) -> dict[str, Any]:
    """The default experiment for a few epochs, then a longer run of small settings."""
    with tempfile.TemporaryDirectory() as tmp:
        if quick:
            default = fit_probe(2, QUICK, f"{tmp}/default")
            long = fit_probe(3, QUICK, f"{tmp}/long")
        else:
            default = fit_probe(6, [], f"{tmp}/default")
            long = fit_probe(40, SMALL, f"{tmp}/long")
    return {"default": default, "long": long}


def fit_probes_in_child(threads: int) -> dict[str, Any]:
    """In a fresh process, so the peak RSS is the experiment's own, not the bench's."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, str(ROOT / "bench" / "bench.py"), "--fit-child", out.name]
        cmd += ["--threads", str(threads)]
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        return json.loads(Path(out.name).read_text())
