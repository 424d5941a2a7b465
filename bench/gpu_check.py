"""``bash bench/gpu_check.sh --out DIR``: issue #15's GPU check, one command on one CUDA GPU.

Two parts, each in a process of its own, so that a crash or a hang in one still leaves the
other's result and the report:

- ``bench_row`` (``bench/gpu_row.py``): a random Qwen2.5-0.5B-shaped policy with LoRA in bf16
  through our rollout, preparation and update code: decode tokens/s against the HBM-bandwidth
  bound, the MFU of the preparation pass and of the update, peak GPU memory;
- ``pytest_gpu``: ``pytest -m gpu`` (FSDP through the CLI, ``tests/test_fsdp_gpu.py``).

Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.txt`` (each part's log beside them) after each
part, prints the report, and exits 1 naming the parts that failed. The parts' time limits
(``--bench-timeout`` 210 s, ``--tests-timeout`` 300 s) keep it under 10 minutes; on one H100/H200
it should take about 5 (an estimate: no GPU run has been made yet). ``--dry-run``: the CPU, tiny
shapes, stand-in peaks, the gpu tests only collected; under a minute.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GiB = 1024.0  # MiB per GiB


def run_logged(cmd: list[str], log: Path, timeout: float) -> tuple[int | None, float]:
    """Run ``cmd`` in the repository root, stdout and stderr to ``log``; (exit status, seconds).

    Status None: killed at ``timeout``. The command runs in a session of its own, and the whole
    session is killed, so that pytest's ``fit`` subprocesses do not outlive it on the GPU.
    """
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, time.perf_counter() - start


def last_error(log: Path, lines: int = 3) -> str:
    """The end of a failed part's log: a traceback's last lines name the error."""
    tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-lines:]
    return " | ".join(line.strip() for line in tail)


def check_row(row: dict[str, Any], dry_run: bool) -> tuple[list[str], list[str]]:
    """(problems, notes) of a complete bench row: what fails it, and what is only worth saying.

    A ratio above 1 means the peak figure it divides by is too low for this device (5% allowed
    for boost clocks and timer granularity); on a dry run the peaks are stand-ins, so it is a note.
    """
    problems, notes = [], []
    if row["rollout"]["decode_tokens"] <= 0:
        problems.append("no decode step was timed (did every reply end at its first token?)")
    if not row["update"]["losses_finite"]:
        problems.append("a PPO minibatch loss was not finite")
    peaks, ratios = row["peaks"], row["ratios"]
    for name, key, unit, flag in (
        ("decode_vs_hbm_bound", "bandwidth_gbs", "GB/s", "--bandwidth-gbs"),
        ("prepare_mfu", "bf16_tflops", "TFLOP/s", "--peak-tflops"),
        ("update_mfu", "bf16_tflops", "TFLOP/s", "--peak-tflops"),
    ):
        if ratios[name] > 1.05:
            figure = f"{peaks[key]:g} {unit} ({peaks['source']})"
            text = f"{name} = {ratios[name]:.2f} > 1: {figure} is too low for this device; pass {flag}"
            (notes if dry_run else problems).append(text)
    return problems, notes


def bench_part(args: argparse.Namespace) -> dict[str, Any]:
    """``bench/gpu_row.py`` in a subprocess; its JSON is the part's result."""
    out, log = args.out / "bench_row.json", args.out / "bench_row.log"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_row.py"), "--out", str(out)]
    cmd += ["--dry-run"] if args.dry_run else []
    for flag in ("bandwidth_gbs", "peak_tflops", "num_envs", "steps_per_env", "max_new_tokens"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    out.unlink(missing_ok=True)  # never a previous run's row
    rc, seconds = run_logged(cmd, log, args.bench_timeout)
    row = json.loads(out.read_text()) if out.exists() else {}
    if row.get("complete"):
        row["problems"], row["notes"] = check_row(row, args.dry_run)
    ok = rc == 0 and row.get("complete", False) and not row.get("problems")
    part = {"ok": ok, "rc": rc, "seconds": seconds, "log": log.name, "command": cmd[1:], **row}
    if rc is None:
        part["error"] = f"killed after {args.bench_timeout:.0f} s (--bench-timeout)"
    elif not ok:
        part["error"] = "; ".join(row.get("problems") or [last_error(log)])
    return part


def junit_tests(xml: Path) -> list[dict[str, Any]]:
    """Each test of pytest's JUnit XML: id, outcome (passed/failed/error/skipped), seconds, message."""
    tests = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = node.get("message", "")
                break
        # Module-level tests (ours): classname "tests.test_fsdp_gpu" is the file.
        test_id = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        tests.append(
            {"id": test_id, "outcome": outcome, "seconds": float(case.get("time", 0)), "message": message}
        )
    return tests


def pytest_part(args: argparse.Namespace) -> dict[str, Any]:
    """``pytest -m gpu`` in a subprocess; on a dry run only collected (no GPU to run them on)."""
    log, xml = args.out / "pytest_gpu.log", args.out / "pytest_gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
    cmd += ["--collect-only", "-q"] if args.dry_run else ["-rA", f"--junitxml={xml}"]
    xml.unlink(missing_ok=True)  # never a previous run's results
    rc, seconds = run_logged(cmd, log, args.tests_timeout)
    part: dict[str, Any] = {"rc": rc, "seconds": seconds, "log": log.name, "command": cmd[1:]}
    if args.dry_run:
        ids = [line.strip() for line in log.read_text().splitlines() if "::" in line]
        part.update(ok=rc == 0 and bool(ids), collected=ids, counts={"collected": len(ids)})
        if not part["ok"]:
            part["error"] = f"collecting the gpu tests failed (exit {rc}): {last_error(log)}"
        return part
    tests = junit_tests(xml) if xml.exists() else []
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    # All skipped means the tests saw no GPU, which is a failure of a GPU check.
    part.update(ok=rc == 0 and counts["passed"] > 0, tests=tests, counts=counts)
    if rc is None:
        part["error"] = f"killed after {args.tests_timeout:.0f} s (--tests-timeout)"
    elif not part["ok"]:
        bad = [f"{t['id']}: {t['message'][:200]}" for t in tests if t["outcome"] in ("failed", "error")]
        part["error"] = "; ".join(bad) or f"exit {rc}, {counts}: {last_error(log)}"
    return part


def commit() -> str:
    """The checked-out commit (``+dirty`` with local changes); ``unknown`` outside a git checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        )
    except FileNotFoundError:  # no git on the machine
        return "unknown"
    if sha.returncode != 0:
        return "unknown"
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def row_lines(row: dict[str, Any]) -> list[str]:
    """The bench row in a few lines: the model and peaks, then rollout, preparation, update, memory."""
    m, w, r, p, u = row["model"], row["model"]["work"], row["rollout"], row["prepare"], row["update"]
    peaks, memory = row["peaks"], row["memory"]
    unit, scale = ("GiB", GiB) if memory["source"].startswith("torch.cuda") else ("MiB", 1.0)
    shape = f"{m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_heads']}/{m['num_kv_heads']} heads"
    bytes_per_step = (
        f"{w['decode_weight_bytes'] / 1e9:.3g} GB weights + {w['kv_bytes_per_token']:,} B KV/token"
    )
    return [
        f"  model    {shape}, vocab {m['vocab_size']}: {m['parameters'] / 1e6:.1f}M parameters, "
        f"{m['trainable_parameters'] / 1e6:.2f}M trainable (LoRA r={m['lora_r']}, value head)",
        f"           {m['dtype']}",
        f"  peaks    {peaks['bandwidth_gbs']:g} GB/s, {peaks['bf16_tflops']:g} bf16 TFLOP/s "
        f"({peaks['source']})",
        f"  rollout  {r['num_envs']} envs, {r['env_steps']} env steps, {r['generate_calls']} generate calls "
        f"of <= {r['max_new_tokens']} tokens, {r['rollout_s']:.2f} s",
        f"  decode   {r['decode_tokens_per_s']:,.0f} tok/s, HBM bound "
        f"{r['hbm_bound_tokens_per_s']:,.0f} tok/s ({bytes_per_step}; KV "
        f"{r['kv_share_of_bound']:.0%} of the bytes)",
        f"           decode_vs_hbm_bound = {r['decode_vs_hbm_bound']:.3f}; prefill "
        f"{r['prefill_s'] / r['generate_s']:.0%} of generate time; whole rollout "
        f"{r['reply_tokens_per_s']:,.0f} reply tok/s",
        f"  prepare  {p['tokens']:,} tokens in {p['seconds']:.2f} s: prepare_mfu = {p['mfu']:.3f} "
        "(FLOPs 2*N*T + attention)",
        f"  update   {u['steps']} steps, {u['tokens']:,} tokens (padding {u['padding']:.0%}) in "
        f"{u['seconds']:.2f} s: update_mfu = {u['mfu']:.3f}",
        f"           FLOPs {u['flops_formula']}",
        f"           first step approx_kl {u['first_step_approx_kl']:.2g}, "
        f"clipfrac {u['first_step_clipfrac']:.2g}",
        f"  memory   peak {memory['peak_mb'] / scale:.2f} {unit}: rollout {r['peak_memory_mb'] / scale:.2f}, "
        f"prepare {p['peak_memory_mb'] / scale:.2f}, update {u['peak_memory_mb'] / scale:.2f} "
        f"({memory['source']})",
    ]


def format_report(result: dict[str, Any]) -> str:
    """The short text report: a header, one verdict per part with its numbers, the result."""
    env = result.get("env") or {}
    device = f"{env['device_name']} x{env['device_count']}" if env.get("device_name") else "no CUDA device"
    mode = (
        "DRY RUN (CPU, tiny shapes, stand-in peaks: the ratios mean nothing)" if result["dry_run"] else "CUDA"
    )
    lines = [
        f"llamagym_pl GPU check (issue #15): {mode}",
        f"commit {result['commit']}, {result['started']}, {result.get('wall_s', 0):.0f} s",
        f"device: {device}; torch "
        f"{env.get('torch')} (CUDA {env.get('torch_cuda') or 'none: a CPU build'}), transformers "
        f"{env.get('transformers')}, peft {env.get('peft')}",
    ]
    for name, part in result["parts"].items():
        verdict = "PASS" if part["ok"] else "FAIL"
        ran = f" ({part['seconds']:.0f} s, log {part['log']})" if "log" in part else ""
        lines.append(f"{verdict} {name}{ran}")
        if part.get("error"):
            lines.append(f"  error: {part['error']}")
        if name == "bench_row" and part.get("complete"):
            lines += row_lines(part)
            lines += [f"  note: {n}" for n in part.get("notes", [])]
        if name == "pytest_gpu" and any(part.get("counts", {}).values()):
            lines.append("  " + ", ".join(f"{v} {k}" for k, v in part["counts"].items() if v))
            lines += [
                f"  {t['outcome']:7s} {t['id']} ({t['seconds']:.0f} s) {t['message'][:160]}"
                for t in part.get("tests", [])
            ]
            if result["dry_run"]:
                lines += [f"  collected {test_id}" for test_id in part["collected"]]
                lines.append("  dry run: collected only, not run (they need CUDA)")
    failed = result["failed"]
    lines.append(f"RESULT: {'FAIL: ' + ', '.join(failed) if failed else 'PASS'}")
    return "\n".join(lines) + "\n"


def save(result: dict[str, Any], out: Path) -> str:
    """Write the JSON and the text report (after every part: a later hang loses nothing)."""
    result["failed"] = [name for name, part in result["parts"].items() if not part["ok"]]
    result["ok"] = not result["failed"]
    report = format_report(result)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu_check.txt").write_text(report)
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out", type=Path, required=True, help="where gpu_check.json, gpu_check.txt and the logs go"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="the CPU, tiny shapes, stand-in peaks, tests only collected"
    )
    p.add_argument(
        "--bandwidth-gbs", type=float, help="HBM bandwidth, GB/s (default: looked up from the device name)"
    )
    p.add_argument(
        "--peak-tflops", type=float, help="dense bf16 TFLOP/s (default: looked up from the device name)"
    )
    p.add_argument("--num-envs", type=int, help="the bench row's generate batch (default 128)")
    p.add_argument("--steps-per-env", type=int, help="the bench row's turns per env (default 4)")
    p.add_argument("--max-new-tokens", type=int, help="the bench row's reply length (default 32)")
    p.add_argument("--skip-bench", action="store_true", help="only the tests")
    p.add_argument("--skip-tests", action="store_true", help="only the bench row")
    p.add_argument("--bench-timeout", type=float, default=210.0, help="seconds (default 210)")
    p.add_argument("--tests-timeout", type=float, default=300.0, help="seconds (default 300)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    result: dict[str, Any] = {
        "dry_run": args.dry_run,
        "commit": commit(),
        "started": now,
        "env": None,
        "parts": {},
    }
    # The row first: it reports the device (and its absence) within seconds, the tests take minutes.
    if not args.skip_bench:
        print(f"bench row: bench/gpu_row.py (log {args.out / 'bench_row.log'}) ...", flush=True)
        result["parts"]["bench_row"] = part = bench_part(args)
        result["env"] = part.get("env")
        save(result, args.out)
    if not args.skip_tests:
        no_cuda = not args.dry_run and result["env"] is not None and not result["env"]["cuda_available"]
        if no_cuda:
            result["parts"]["pytest_gpu"] = {
                "ok": False,
                "error": "not run: no CUDA device visible (see bench_row)",
            }
        else:
            print(f"gpu tests: pytest -m gpu (log {args.out / 'pytest_gpu.log'}) ...", flush=True)
            result["parts"]["pytest_gpu"] = pytest_part(args)
    result["wall_s"] = time.perf_counter() - start
    print(save(result, args.out), end="")
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.txt'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
