"""DDP on CPU (gloo): 2 processes through Lightning's own launcher, as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamagym_pl.tb import read_scalars

REPO = Path(__file__).resolve().parents[1]


def _fit(tmp: Path, model_dir: Path, probe_dir: Path, *extra: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "llamagym_pl.fit",
        "--config",
        str(REPO / "experiments/blackjack.yaml"),
        "--model.name_or_path",
        str(model_dir),
        "--data.num_envs",
        "4",
        "--data.steps_per_env",
        "4",
        "--data.eval_episodes",
        "8",
        "--data.eval_num_envs",
        "4",
        "--model.num_minibatches",
        "2",
        "--model.update_epochs",
        "1",
        "--trainer.accelerator",
        "cpu",
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(tmp / "runs"),
        "--trainer.logger.init_args.version",
        "v",
        "--checkpoint.dirpath",
        str(tmp / "ckpt"),
        "--trainer.callbacks+=tests.probes.ddp_probe.RankProbe",
        f"--trainer.callbacks.out_dir={probe_dir}",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _records(probe_dir: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (probe_dir / f"rank{rank}.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ddp_two_cpu_processes_train_resume_and_reduce(tmp_path: Path, tiny_model_dir: Path) -> None:
    probe = tmp_path / "probe"
    _fit(tmp_path, tiny_model_dir, probe, "--trainer.max_epochs", "2")
    r0, r1 = _records(probe, 0), _records(probe, 1)
    assert [r["world_size"] for r in r0 + r1] == [2] * 4
    for a, b in zip(r0, r1, strict=True):
        # Rank-distinct seeds: the two ranks played different deals.
        assert a["first_observations"] != b["first_observations"]
        # DDP averaged the gradients: replicas stay identical after every optimizer step.
        assert a["checksums"] == pytest.approx(b["checksums"], rel=0, abs=1e-9)
        assert len(a["checksums"]) == 2  # num_minibatches * update_epochs on each rank

    # The logged return is the mean over both ranks' episodes, not rank 0's alone.
    logged = read_scalars(tmp_path / "runs/blackjack/v")["rollout/return_mean"]
    for (_, value), a, b in zip(logged, r0, r1, strict=True):
        both = (a["return_sum"] + b["return_sum"]) / (a["episodes"] + b["episodes"])
        assert value == pytest.approx(both, abs=1e-6)

    # Resume from the DDP checkpoint and train one more epoch on both ranks.
    _fit(tmp_path, tiny_model_dir, probe, "--trainer.max_epochs", "3", "--ckpt_path", "last")
    r0, r1 = _records(probe, 0), _records(probe, 1)
    assert [r["epoch"] for r in r0] == [0, 1, 2] and [r["epoch"] for r in r1] == [0, 1, 2]
    assert r0[2]["checksums"] == pytest.approx(r1[2]["checksums"], rel=0, abs=1e-9)
    assert len(read_scalars(tmp_path / "runs/blackjack/v")["rollout/return_mean"]) == 3
