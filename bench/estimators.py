"""GAE vs GRPO vs GiGPO on a shipped experiment at equal env steps, several seeds (issue #16).

    python bench/estimators.py --config experiments/blackjack.yaml --seeds 0 1 2 --group-size 8
    python bench/estimators.py --config experiments/frozenlake.yaml --epochs 80 --seeds 0 1 2

Each (estimator, seed) is a normal ``python -m llamagym_pl.fit`` run of the config with only
``model.advantage_estimator``, ``data.group_size`` (critic-free ones), the seed and the output
directory changed: the same envs, ``num_envs x steps_per_env`` and epochs, so equal env steps.
Runs go ``--jobs`` at a time (one torch thread each) and are skipped when their event files
already hold the last epoch (rerun the command to finish an interrupted sweep). Prints the
in-training greedy evaluations (``eval/return_mean`` at every ``check_val_every_n_epoch``) per
run and the mean over seeds, and writes ``--plot`` (mean rollout return per estimator).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from llamagym_pl.tb import read_scalars

ESTIMATORS = ("gae", "grpo", "gigpo")


def run_dir(root: Path, estimator: str, seed: int) -> Path:
    return root / f"{estimator}-s{seed}"


def finished(out: Path, epochs: int) -> bool:
    versions = sorted(out.glob("version_*"))
    if not versions:
        return False
    epoch = read_scalars(versions[-1]).get("epoch", [])
    return bool(epoch) and epoch[-1][1] >= epochs - 1


def fit_command(
    config: str, out: Path, estimator: str, seed: int, group_size: int, epochs: int | None
) -> list[str]:
    grouped = estimator != "gae"
    return [
        sys.executable, "-m", "llamagym_pl.fit",
        "--config", config,
        "--model.advantage_estimator", estimator,
        "--data.group_size", str(group_size if grouped else 1),
        "--data.seed", str(seed),
        "--seed_everything", str(seed),
        "--trainer.logger.init_args.save_dir", str(out.parent),
        "--trainer.logger.init_args.name", out.name,
        "--checkpoint.dirpath", str(out / "checkpoints"),
        "--trainer.enable_progress_bar", "false",
        *(["--trainer.max_epochs", str(epochs)] if epochs else []),
    ]  # fmt: skip


def run(command: list[str], out: Path) -> float:
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(out / "fit.log", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}); see {out / 'fit.log'}")
    return time.perf_counter() - start


def summarize(root: Path, estimators: list[str], seeds: list[int]) -> dict[str, dict[int, dict[str, list]]]:
    results: dict[str, dict[int, dict[str, list]]] = {}
    for estimator in estimators:
        for seed in seeds:
            versions = sorted(run_dir(root, estimator, seed).glob("version_*"))
            if not versions:
                continue
            scalars = read_scalars(versions[-1])
            results.setdefault(estimator, {})[seed] = scalars
    return results


def epoch_of(scalars: dict[str, list], step: int) -> int:
    return int(next(v for s, v in scalars["epoch"] if s >= step))


def report(results: dict[str, dict[int, dict[str, list]]]) -> str:
    lines = []
    for estimator, runs in results.items():
        finals = []
        for seed, scalars in sorted(runs.items()):
            evals = scalars.get("eval/return_mean", [])
            points = " ".join(f"{epoch_of(scalars, s) + 1}:{v:+.3f}" for s, v in evals)
            steps = sum(v for _, v in scalars.get("rollout/env_steps", []))
            lines.append(f"{estimator:6s} seed {seed}: greedy eval at epoch {points} ({steps:.0f} env steps)")
            if evals:
                finals.append(evals[-1][1])
        if finals:
            lines.append(
                f"{estimator:6s} final greedy eval over {len(finals)} seeds: {np.mean(finals):+.4f} "
                f"(min {min(finals):+.4f}, max {max(finals):+.4f})"
            )
    return "\n".join(lines)


def plot(results: dict[str, dict[int, dict[str, list]]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for estimator, runs in results.items():
        curves = [np.array([v for _, v in scalars["rollout/return_mean"]]) for scalars in runs.values()]
        n = min(len(c) for c in curves)
        mean = np.mean([c[:n] for c in curves], axis=0)
        line = ax.plot(np.arange(1, n + 1), mean, label=f"{estimator} rollout return (mean of {len(curves)})")
        for scalars in runs.values():
            evals = scalars.get("eval/return_mean", [])
            ax.plot(
                [epoch_of(scalars, s) + 1 for s, _ in evals],
                [v for _, v in evals],
                "o",
                color=line[0].get_color(),
                alpha=0.6,
            )
    ax.set_xlabel("epoch (equal env steps per epoch); dots: greedy evaluations of each seed")
    ax.set_ylabel("mean return per episode")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--out", default=None, help="default: runs/estimators/<config name>")
    parser.add_argument("--plot", default=None, help="PNG of the curves (default: <out>/curves.png)")
    parser.add_argument("--report-only", action="store_true", help="summarize the runs already there")
    args = parser.parse_args(argv)
    root = Path(args.out or f"runs/estimators/{Path(args.config).stem}")
    if not args.report_only:
        epochs = args.epochs or _config_epochs(args.config)
        todo = [
            (e, s) for e in args.estimators for s in args.seeds if not finished(run_dir(root, e, s), epochs)
        ]

        def one(job: tuple[str, int]) -> None:
            estimator, seed = job
            out = run_dir(root, estimator, seed)
            seconds = run(fit_command(args.config, out, estimator, seed, args.group_size, args.epochs), out)
            print(f"{estimator} seed {seed}: {seconds / 60:.1f} min", flush=True)

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(one, todo))
    results = summarize(root, args.estimators, args.seeds)
    print(report(results))
    if results:
        plot(results, Path(args.plot or root / "curves.png"), f"{Path(args.config).stem}: estimators")


def _config_epochs(config: str) -> int:
    import yaml

    return int(yaml.safe_load(Path(config).read_text())["trainer"]["max_epochs"])


if __name__ == "__main__":
    main()
