"""FSDP on CUDA (Lightning refuses FSDP on CPU): skipped without GPUs, as in CI.

With one GPU FSDP shards nothing (it switches to ``NO_SHARD``), so only its own checkpoint path
is exercised there; generation under sharded parameters needs two GPUs or more.
:class:`tests.probes.fsdp_probe.ShardProbe` proves the parameters really were sharded between
forwards, so the test cannot pass without sharding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamagym_pl.tb import read_scalars

REPO = Path(__file__).resolve().parents[1]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def _run(module: str, cwd: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", module, "--config", str(REPO / "experiments/blackjack.yaml"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _fit(run_dir: Path, model_dir: Path, devices: int, *extra: str) -> None:
    _run(
        "llamagym_pl.fit",
        run_dir,
        "--model.name_or_path", str(model_dir),
        "--data.num_envs", "8", "--data.steps_per_env", "4",
        # 8 evaluation episodes per rank: one per eval env.
        "--data.eval_episodes", str(8 * devices), "--data.eval_num_envs", "8",
        "--model.num_minibatches", "2", "--model.update_epochs", "1",
        "--model.lr_schedule", "constant",
        "--trainer.accelerator", "gpu", "--trainer.strategy", "fsdp", "--trainer.devices", str(devices),
        "--trainer.check_val_every_n_epoch", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(run_dir / "runs"),
        "--trainer.logger.init_args.version", "v",
        "--checkpoint.dirpath", str(run_dir / "ckpt"),
        "--trainer.callbacks+=tests.probes.fsdp_probe.ShardProbe",
        f"--trainer.callbacks.out_dir={run_dir / 'probe'}",
        *extra,
    )  # fmt: skip


def _train_evaluate_resume(run_dir: Path, model_dir: Path, devices: int) -> dict[str, list]:
    """2 epochs, ``evaluate`` on the checkpoint, then ``--ckpt_path last`` for a 3rd epoch."""
    _fit(run_dir, model_dir, devices, "--trainer.max_epochs", "2")
    scalars = read_scalars(run_dir / "runs/blackjack/v")
    assert len(scalars["rollout/return_mean"]) == 2
    assert all(v > 0 for _, v in scalars["rollout/generated_tokens_per_s"])  # the policy generated
    # Validation (greedy generation) on every rank, reported over all of their episodes.
    assert [v for _, v in scalars["eval/episodes"]] == [8 * devices] * 2
    # FSDP's default state_dict_type "full": rank 0 writes one ordinary checkpoint file.
    ckpt = run_dir / "ckpt/last.ckpt"
    assert ckpt.is_file()
    _run(
        "llamagym_pl.evaluate",
        run_dir,
        "--model.name_or_path", str(model_dir), "--data.eval_num_envs", "8",
        "--ckpt_path", str(ckpt), "--episodes", "8", "--out", str(run_dir / "eval.json"),
    )  # fmt: skip
    assert json.loads((run_dir / "eval.json").read_text())["episodes"] == 8
    _fit(run_dir, model_dir, devices, "--trainer.max_epochs", "3", "--ckpt_path", "last")
    scalars = read_scalars(run_dir / "runs/blackjack/v")
    assert len(scalars["rollout/return_mean"]) == 3
    return scalars


@pytest.mark.skipif(GPUS < 1, reason="FSDP needs CUDA")
def test_fsdp_on_one_gpu_checkpoints_evaluates_and_resumes(tmp_path: Path, tiny_model_dir: Path) -> None:
    _train_evaluate_resume(tmp_path, tiny_model_dir, devices=1)


@pytest.mark.skipif(GPUS < 2, reason="FSDP shards parameters only across 2+ GPUs (one runs NO_SHARD)")
def test_fsdp_generates_and_trains_with_sharded_parameters(tmp_path: Path, tiny_model_dir: Path) -> None:
    _train_evaluate_resume(tmp_path, tiny_model_dir, devices=GPUS)
    for rank in range(GPUS):
        lines = (tmp_path / "probe" / f"shards{rank}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert [r["epoch"] for r in records] == [0, 1, 2]
        for r in records:
            assert r["strategy"] == "FSDPStrategy" and r["world_size"] == GPUS
            # Between forwards this rank held only its shard, yet it played the rollout.
            assert len(r["full"]) == 2 and r["outside_forward"] != r["full"]
