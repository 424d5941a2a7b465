"""LlamaGym 0.1.1 and llamagym_pl side by side on this machine (``make bench-llamagym``).

The same agent (LlamaGym's example Blackjack prompts), the same random Llama models and equal
work per turn, one run after the other, each in a fresh process whose peak RSS the kernel reports
when it ends (the 0.66M model: three rounds of the three, each system's median run reported):

- LlamaGym's serial loop on TRL 0.7.11 (``run_llamagym.py``, in LlamaGym's own venv);
- the same loop on our imperative ``Agent`` (``run_imperative.py``);
- our fit path, 64 envs (``run_fit.py`` on ``fit.yaml``).

Prints env steps/s (training included), our ratios to LlamaGym, peak RSS and the targets, and
writes ``bench_results/llamagym/side_by_side.json``. Without LlamaGym's venv and models (built by
``bash bench/llamagym/setup.sh``) it says so in one line and exits 0. Random models almost never
write a parseable action (played as a hit, return about -1): throughput is compared, not learning.

    python bench/llamagym/side_by_side.py [--quick] [--dir DIR] [--threads 2]
    python bench/llamagym/side_by_side.py --from-json FILE     # the table of saved results
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SYSTEMS = ("llamagym", "imperative", "fit")


@dataclass(frozen=True)
class Model:
    name: str  # as the table shows it
    key: str  # the option that gives its directory: tiny or small
    episodes: int  # played by each serial loop
    fit_epochs: int  # of 256 turns; env steps/s is over all but the first
    fit_options: tuple[str, ...] = ()  # further llamagym_pl.fit options
    rounds: int = 1  # of all three systems in turn; each system's median run is reported


# The 0.66M runs are short (~2 minutes a round) and LlamaGym's rate varied by ~20% between single
# runs (7.6 to 9.4 env steps/s): three rounds, medians.
MODELS = (Model("0.66M", "tiny", 300, 11, rounds=3), Model("58M", "small", 48, 3))
# A smoke run of the wiring, not a measurement: a few episodes, two fit epochs of 32 turns.
QUICK = (Model("0.66M", "tiny", 8, 2, ("--data.num_envs", "8", "--model.num_minibatches", "2")),)

# (system, model): our env steps/s at least this many times LlamaGym's.
SPEED_TARGETS = {
    ("fit", "0.66M"): 10.0,
    ("fit", "58M"): 5.0,
    ("imperative", "0.66M"): 5.0,
    ("imperative", "58M"): 3.0,
}
# (system, model): our peak RSS at most this share of LlamaGym's.
RSS_TARGETS = {("fit", "58M"): 0.5, ("imperative", "58M"): 0.5}
BUSY = 0.1  # cores used by other processes during a run above which its ratio is not trustworthy


def command(system: str, model: Model, path: Path, args: argparse.Namespace, out: Path) -> list[str]:
    """The command line of one run, writing its JSON result to ``out``."""
    common = ["--model", str(path), "--threads", str(args.threads), "--json-out", str(out)]
    if system == "llamagym":
        python = str(args.venv / "bin" / "python")
        return [python, str(HERE / "run_llamagym.py"), "--episodes", str(model.episodes), *common]
    if system == "imperative":
        return [sys.executable, str(HERE / "run_imperative.py"), "--episodes", str(model.episodes), *common]
    epochs = ["--epochs", str(model.fit_epochs)]
    return [sys.executable, str(HERE / "run_fit.py"), *epochs, *common, *model.fit_options]


def run(cmd: list[str], out: Path) -> dict[str, Any]:
    """Run ``cmd`` (output to ``out`` with a .log suffix); its JSON result and its peak RSS."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    log = out.with_suffix(".log")
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        try:
            # wait4, not wait: the child's own resource usage, its peak RSS (KiB) among it.
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C, or SIGTERM (see main): no run left behind
            proc.kill()
            proc.wait()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{Path(cmd[1]).name} failed (exit {proc.returncode}); its output: {log}")
    return {**json.loads(out.read_text()), "peak_rss_mib": usage.ru_maxrss / 1024}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    runs = args.out.parent / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"quick": args.quick, "threads": args.threads, "models": {}}
    for model in QUICK if args.quick else MODELS:
        path = getattr(args, model.key)
        rounds: dict[str, list[dict[str, Any]]] = {system: [] for system in SYSTEMS}
        for k in range(model.rounds):
            for system in SYSTEMS:
                out = runs / f"{system}-{model.key}-{k}.json"
                print(
                    f"running {system} on the {model.name} model (round {k + 1}/{model.rounds}) ...",
                    flush=True,
                )
                rounds[system].append(run(command(system, model, path, args, out), out))
        results["models"][model.name] = {"path": str(path), **{s: median_run(r) for s, r in rounds.items()}}
    return results


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median env steps/s (the lower middle one of an even count), with every run's
    rate and peak RSS beside it."""
    ranked = sorted(runs, key=lambda r: r["env_steps_per_s"])
    middle = ranked[(len(ranked) - 1) // 2]
    return {
        **middle,
        "rounds_env_steps_per_s": [r["env_steps_per_s"] for r in runs],
        "rounds_peak_rss_mib": [r["peak_rss_mib"] for r in runs],
    }


def ratio(results: dict[str, Any], model: str, system: str, key: str) -> float:
    runs = results["models"][model]
    return runs[system][key] / runs["llamagym"][key]


def table(results: dict[str, Any]) -> list[str]:
    """One line per model: env steps/s and peak RSS of each system, our ratios to LlamaGym; under
    it, where a model ran several rounds, every round's rates."""
    lines = [
        f"{'model':6} {'LlamaGym':>9} {'RSS':>6} | {'imperative':>10} {'x':>5} {'RSS':>6} | "
        f"{'fit':>7} {'x':>5} {'RSS':>6}   (env steps/s, training included; peak RSS MiB)"
    ]
    for name, runs in results["models"].items():
        lg, imp, fit = (runs[s] for s in SYSTEMS)
        lines.append(
            f"{name:6} {lg['env_steps_per_s']:9.2f} {lg['peak_rss_mib']:6.0f} | "
            f"{imp['env_steps_per_s']:10.2f} {ratio(results, name, 'imperative', 'env_steps_per_s'):5.1f} "
            f"{imp['peak_rss_mib']:6.0f} | {fit['env_steps_per_s']:7.2f} "
            f"{ratio(results, name, 'fit', 'env_steps_per_s'):5.1f} {fit['peak_rss_mib']:6.0f}"
        )
        rates = {s: runs[s]["rounds_env_steps_per_s"] for s in SYSTEMS if "rounds_env_steps_per_s" in runs[s]}
        if any(len(r) > 1 for r in rates.values()):
            each = "; ".join(f"{s} {' '.join(f'{r:.2f}' for r in rs)}" for s, rs in rates.items())
            lines.append(f"{'':6} rounds (env steps/s; medians above): {each}")
    return lines


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of a model that was run: its value and whether it is met."""
    out = []
    for (system, model), bound in SPEED_TARGETS.items():
        if model in results["models"]:
            value = ratio(results, model, system, "env_steps_per_s")
            what = f"{system} env steps/s >= {bound:g}x LlamaGym's on {model}"
            out.append({"target": what, "value": value, "met": value >= bound})
    for (system, model), bound in RSS_TARGETS.items():
        if model in results["models"]:
            value = ratio(results, model, system, "peak_rss_mib")
            what = f"{system} peak RSS <= {bound:g}x LlamaGym's on {model}"
            out.append({"target": what, "value": value, "met": value <= bound})
    return out


def report(results: dict[str, Any]) -> list[str]:
    quick = ", quick: not a measurement" if results["quick"] else ""
    lines = [f"LlamaGym 0.1.1 side by side ({results['threads']} torch threads{quick})", *table(results)]
    for t in targets(results):
        lines.append(f"target {t['target']}: {'met' if t['met'] else 'NOT met'} ({t['value']:.2f}x)")
    for name, runs in results["models"].items():
        for system in SYSTEMS:
            busy = runs[system].get("other_procs_cpu_per_wall", 0.0)
            if busy > BUSY:
                lines.append(
                    f"warning: other processes used {busy:.2f} cores during {system} on {name}: "
                    "its ratio is not trustworthy; rerun on a quiet machine"
                )
    return lines


def missing(args: argparse.Namespace) -> str | None:
    """Why LlamaGym cannot run here (None: it can)."""
    paths = [args.venv / "bin" / "python", *(getattr(args, m.key) for m in (QUICK if args.quick else MODELS))]
    absent = [str(p) for p in paths if not p.exists()]
    return f"no {', '.join(absent)}" if absent else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_dir = Path(os.environ.get("LLAMAGYM_DIR", ROOT / "bench_results" / "llamagym"))
    p.add_argument(
        "--dir", type=Path, default=default_dir, help="what setup.sh built: venv/, tiny-llama/ ..."
    )
    p.add_argument("--venv", type=Path, default=None, help="LlamaGym's venv (default: DIR/venv)")
    p.add_argument("--tiny", type=Path, default=None, help="the 0.66M model (default: DIR/tiny-llama)")
    p.add_argument("--small", type=Path, default=None, help="the 58M model (default: DIR/small-llama)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every run")
    p.add_argument("--quick", action="store_true", help="a smoke run: the 0.66M model, a few episodes")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: DIR/side_by_side.json)")
    p.add_argument("--from-json", type=Path, default=None, help="print the table of saved results only")
    args = p.parse_args(argv)
    args.venv = args.venv or args.dir / "venv"
    args.tiny = args.tiny or args.dir / "tiny-llama"
    args.small = args.small or args.dir / "small-llama"
    args.out = args.out or args.dir / "side_by_side.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:
        print("\n".join(report(json.loads(args.from_json.read_text()))))
        return 0
    why = missing(args)
    if why is not None:
        print(f"LlamaGym side by side skipped: {why}; build them with: bash bench/llamagym/setup.sh")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # e.g. from `timeout`: stop the child too
    results = measure(args)
    results["targets"] = targets(results)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(report(results)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
