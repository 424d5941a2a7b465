"""``make bench``: rollout and PPO-update throughput, against the model's own limit.

Per setting (model x device x num_envs) it plays Blackjack-v1 with ``RolloutCollector``, builds
and scores the buffer and runs PPO minibatch steps, and prints env steps/s, episodes/s, token
rates, the time split, peak RSS, and the ratios to the limit, the bare model's time for the
necessary work (``*/lim``), and to its replay of the very same passes (``*/rep``, the old
definition; see ``bench/limit.py``), with the encoded tokens per trained token and the update's
padding (with our minibatch sampler, and with minibatches drawn at random). Then the whole fit
loop of ``experiments/blackjack-generate.yaml`` and the RSS of a 40-epoch run. Writes everything
to ``bench_results/bench.json``. (``make bench`` then runs LlamaGym side by side,
``bench/llamagym/side_by_side.py``, once its venv is built.)

Rates and the split are wall time. On the CPU the ratios to the limit are CPU time of this
process (one torch thread by default), so that other tenants of a shared machine do not move
them; the wall-time ratios are in the JSON too (``*_vs_limit_wall``, ``*_vs_replay_wall``).

    python bench/bench.py [--quick] [--threads N] [--models tiny,mid] [--num-envs 1,8,32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import transformers

from bench.fit_probe import fit_probes, fit_probes_in_child
from bench.measure import Setting, run_setting, snapshot
from llamagym_pl.loading import load_causal_lm, load_tokenizer
from llamagym_pl.policy import PolicyWithValueHead
from llamagym_pl.tiny_model import BUILD_INFO_FILE, build_tiny_model, resolve_model_path, tiny_vocab

ROOT = Path(__file__).resolve().parent.parent
MID_VOCAB = 32_000
TARGETS = {
    "rollout_vs_limit": 1.25,
    "update_vs_limit": 1.25,
    # Minibatches are random (a row's length depends on the actions); their rows run packed past
    # the shared prefix (llamagym_pl.packing): update_padding is what those forwards padded,
    # update_padding_random what one forward per minibatch would pad (no target).
    "update_padding": 0.10,
    "speedup": 30.0,
}


def model_path(name: str) -> str:
    """``tiny``: the default offline model; ``mid``: hidden 512, 8 layers, a 32k vocabulary."""
    if name == "tiny":
        return resolve_model_path("tiny")
    if name == "mid":
        path = ROOT / "bench_results" / "models" / "mid"
        if not (path / BUILD_INFO_FILE).exists():
            # Dummy words pad the word-level vocabulary to a Llama-sized output layer.
            extra = [f"w{i}" for i in range(MID_VOCAB - len(tiny_vocab()))]
            build_tiny_model(path, hidden_size=512, num_layers=8, num_heads=8, extra_words=extra)
        return str(path)
    raise ValueError(f"unknown model {name!r}: use tiny or mid")


def plan(args: argparse.Namespace) -> list[Setting]:
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    settings = []
    for device in devices:
        for model in args.models:
            for n in args.num_envs:
                if args.quick:
                    settings.append(Setting(model, device, n, steps_per_env=2, num_minibatches=2, repeats=1))
                elif model == "tiny" or device == "cuda":
                    # The experiment's update (4 epochs x 4 minibatches) on 8 steps per env; one
                    # env gets more steps, so that its rate is not a handful of calls.
                    steps = 64 if n == 1 else 8
                    settings.append(Setting(model, device, n, steps_per_env=steps, update_epochs=4))
                else:
                    # The mid model needs ~300x the tiny one's compute per token: fewer steps, and
                    # scoring and one update step on 32 of the episodes, keep the whole bench
                    # within ~10 minutes on two cores.
                    steps = 8 if n == 1 else 2
                    settings.append(
                        Setting(model, device, n, steps, max_update_steps=1, max_train_episodes=32)
                    )
    return settings


def run_settings(settings: list[Setting]) -> list[dict[str, Any]]:
    rows, loaded = [], {}
    for s in settings:
        key = (s.model, s.device)
        if key not in loaded:
            loaded.clear()  # one model in memory at a time
            path = model_path(s.model)
            policy = PolicyWithValueHead(load_causal_lm(path)).to(s.device)
            loaded[key] = (policy, snapshot(policy), load_tokenizer(path))
        policy, state, tokenizer = loaded[key]
        t0 = time.perf_counter()
        row = run_setting(policy, state, tokenizer, s)
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


# ----------------------------------------------------------------------------- report
COLUMNS = (
    ("model", 5, "{}"), ("dev", 4, "{}"), ("envs", 4, "{}"),
    ("steps/s", 8, "{:.0f}"), ("eps/s", 7, "{:.0f}"), ("gen tok/s", 9, "{:.0f}"),
    ("prm tok/s", 9, "{:.0f}"), ("upd tok/s", 9, "{:.0f}"),
    ("roll/lim", 8, "{:.2f}"), ("roll/rep", 8, "{:.2f}"), ("gen/lim", 7, "{:.2f}"),
    ("upd/lim", 7, "{:.2f}"), ("upd/rep", 7, "{:.2f}"), ("enc/trn", 7, "{:.1f}"),
    ("upd pad", 7, "{:.1%}"), ("rnd pad", 7, "{:.1%}"),
    ("gen", 4, "{:.0%}"), ("score", 5, "{:.0%}"), ("upd", 4, "{:.0%}"), ("env", 4, "{:.0%}"),
    ("other", 5, "{:.0%}"), ("RSS MB", 7, "{:.0f}"),
)  # fmt: skip
"""The table's columns: ``*/lim`` our time over the limit (the bare model's time for the necessary
work), ``*/rep`` over the bare replay of the same passes; ``enc/trn`` the tokens an update must
encode per token it trains; ``upd pad`` the padding in the update's forwards (the prefix once, the
rows packed), ``rnd pad`` in one padded forward per random minibatch."""


def row_values(row: dict[str, Any]) -> list[Any]:
    split, total = row["split_s"], row["total_s"]
    return [
        row["model"], row["device"], row["num_envs"],
        row["env_steps_per_s"], row["episodes_per_s"], row["generated_tokens_per_s"],
        row["prompt_tokens_per_s"], row["update_tokens_per_s"],
        row["rollout_vs_limit"], row["rollout_vs_replay"], row["generate_vs_limit"],
        row["update_vs_limit"], row["update_vs_replay"], row["update_encoded_per_trained_token"],
        row["update_padding"], row["update_padding_random"],
        *(split[k] / total for k in ("generation", "scoring", "update", "env", "other")),
        row["peak_rss_mb"],
    ]  # fmt: skip


def format_row(row: dict[str, Any]) -> str:
    return " ".join(fmt.format(v).rjust(w) for (_, w, fmt), v in zip(COLUMNS, row_values(row), strict=True))


def header() -> str:
    return " ".join(name.rjust(w) for name, w, _ in COLUMNS)


def speedups(rows: list[dict[str, Any]], num_envs: int) -> list[dict[str, Any]]:
    """Env steps/s at ``num_envs`` (or the largest count run) over num_envs = 1, per model."""
    out = []
    for model, device in dict.fromkeys((r["model"], r["device"]) for r in rows):
        mine = {r["num_envs"]: r for r in rows if (r["model"], r["device"]) == (model, device)}
        if 1 not in mine or len(mine) < 2:
            continue
        n = num_envs if num_envs in mine else max(mine)
        ratio = mine[n]["env_steps_per_s"] / mine[1]["env_steps_per_s"]
        # The same ratio for the bare model's time: what batching could give at best.
        bound = mine[n]["limit_env_steps_per_s"] / mine[1]["limit_env_steps_per_s"]
        replay = mine[n]["replay_env_steps_per_s"] / mine[1]["replay_env_steps_per_s"]
        out.append(
            {
                "model": model,
                "device": device,
                "num_envs": n,
                "speedup": ratio,
                "limit_speedup": bound,
                "replay_speedup": replay,
            }
        )
    return out


def check_targets(rows: list[dict[str, Any]], speed: list[dict[str, Any]]) -> dict[str, Any]:
    big = [r for r in rows if r["num_envs"] >= 32]

    def verdict(key: str, items: list[dict[str, Any]]) -> dict[str, Any]:
        bad = [f"{r['model']}/{r['device']}/{r['num_envs']}" for r in items if r[key] > TARGETS[key]]
        return {"target": TARGETS[key], "met": not bad if items else None, "missed_by": bad}

    return {
        "rollout_vs_limit (num_envs >= 32)": verdict("rollout_vs_limit", big),
        "update_vs_limit (num_envs >= 32)": verdict("update_vs_limit", big),
        "update_padding (num_envs >= 32)": verdict("update_padding", big),
        "speedup (64 envs vs 1)": {
            "target": TARGETS["speedup"],
            "met": all(s["speedup"] >= TARGETS["speedup"] for s in speed) if speed else None,
            "values": {f"{s['model']}/{s['device']}/{s['num_envs']}": s["speedup"] for s in speed},
        },
    }


def report(result: dict[str, Any]) -> None:
    for s in result["speedup"]:
        print(
            f"speedup {s['model']}/{s['device']}: {s['num_envs']} envs vs 1: {s['speedup']:.1f}x env steps/s "
            f"(the bare model gives {s['limit_speedup']:.1f}x for the necessary work, "
            f"{s['replay_speedup']:.1f}x replaying our passes)"
        )
    fits = result.get("fit")
    if fits:
        d, long = fits["default"], fits["long"]
        rss_slope = long["rss_slope_mb_per_epoch"]
        slope_text = (
            "n/a (too few epochs)" if rss_slope is None else f"{rss_slope:+.2f} MB/epoch over the last half"
        )
        print(
            f"end-to-end fit of {' '.join(['blackjack-generate.yaml', *d['overrides']])} (validation off): "
            f"{d['env_steps_per_s']:.0f} env steps/s after epoch 0 ({d['epochs']} epochs, "
            f"rollout {d['rollout_share']:.0%} of the time); peak RSS {d['peak_rss_mb']:.0f} MB"
        )
        print(
            f"RSS over {long['epochs']} epochs of small settings: {long['rss_mb'][0]:.0f} -> "
            f"{long['rss_mb'][-1]:.0f} MB, slope {slope_text}"
        )
    for name, t in result["targets"].items():
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        bound = ">=" if name.startswith("speedup") else "<="
        extra = t.get("missed_by") or t.get("values") or ""
        print(f"target {name} {bound} {t['target']}: {verdict} {extra}")


def meta(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run (tiny model, 1 and 8 envs)")
    p.add_argument("--out", type=Path, default=ROOT / "bench_results" / "bench.json")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust on a shared box)")
    p.add_argument("--models", type=lambda s: s.split(","), default=None)
    p.add_argument("--num-envs", type=lambda s: [int(n) for n in s.split(",")], default=None)
    p.add_argument("--devices", type=lambda s: s.split(","), default=None)
    p.add_argument("--no-fit", action="store_true", help="skip the end-to-end and memory runs")
    p.add_argument("--fit-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.models is None:
        args.models = ["tiny"] if args.quick else ["tiny", "mid"]
    if args.num_envs is None:
        args.num_envs = [1, 8] if args.quick else [1, 8, 32, 64, 128]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    if args.fit_child is not None:
        args.fit_child.write_text(json.dumps(fit_probes(quick=False)))
        return {}
    result: dict[str, Any] = {"meta": meta(args)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {os.getloadavg()}")
    print(header())
    rows = run_settings(plan(args))
    result["settings"] = rows
    result["speedup"] = speedups(rows, 64)
    if not args.no_fit:
        result["fit"] = fit_probes(quick=True) if args.quick else fit_probes_in_child(args.threads)
    result["targets"] = check_targets(rows, result["speedup"])
    print()
    print(header())
    for row in rows:
        print(format_row(row))
    report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
