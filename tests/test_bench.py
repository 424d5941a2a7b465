"""``bench/bench.py --quick`` runs and reports every number the full bench reports (not timed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {
    "model", "device", "num_envs", "env_steps_per_s", "episodes_per_s", "generated_tokens_per_s",
    "prompt_tokens_per_s", "update_tokens_per_s", "rollout_vs_limit", "update_vs_limit",
    "update_padding", "split_s", "total_s", "peak_rss_mb",
}  # fmt: skip
SPLIT_KEYS = {"generation", "scoring", "update", "env", "other"}


def test_quick_bench_writes_the_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "LLAMAGYM_PL_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "bench/bench.py", "--quick", "--devices", "cpu", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())

    rows = result["settings"]
    assert [(r["model"], r["num_envs"]) for r in rows] == [("tiny", 1), ("tiny", 8)]
    for row in rows:
        assert ROW_KEYS <= row.keys()
        assert row["split_s"].keys() == SPLIT_KEYS
        assert sum(row["split_s"].values()) == pytest.approx(row["total_s"])
        assert row["rollout_vs_limit"] > 0 and row["update_vs_limit"] > 0
        assert 0.0 <= row["update_padding"] < 1.0
        assert row["env_steps"] >= row["num_envs"] * row["steps_per_env"]  # and the last hands finish
    assert [s["num_envs"] for s in result["speedup"]] == [8]  # no 64 row in quick mode: the largest

    fits = result["fit"]
    assert fits["default"]["epochs"] == 2 and fits["default"]["env_steps_per_s"] > 0
    assert len(fits["long"]["rss_mb"]) == fits["long"]["epochs"] == 3
    assert set(result["targets"]) >= {"rollout_vs_limit (num_envs >= 32)", "speedup (64 envs vs 1)"}

    # The table: a header, one line per setting (printed as it finishes and again at the end).
    lines = proc.stdout.splitlines()
    assert sum(line.split()[:3] == ["model", "dev", "envs"] for line in lines) == 2
    assert sum(line.split()[:3] == ["tiny", "cpu", "8"] for line in lines) == 2
    assert any(line.startswith("speedup tiny/cpu: 8 envs vs 1") for line in lines)
    assert f"wrote {out}" in lines
