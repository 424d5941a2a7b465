"""FSDP on CUDA: sharded training with generation. Skipped on machines without CUDA (CI has none)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamagym_pl.tb import read_scalars

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP test needs CUDA"),
]


def test_fsdp_trains_and_generates_on_all_gpus(tmp_path: Path, tiny_model_dir: Path) -> None:
    devices = torch.cuda.device_count()
    cmd = [
        sys.executable, "-m", "llamagym_pl.fit",
        "--config", str(REPO / "experiments/blackjack.yaml"),
        "--model.name_or_path", str(tiny_model_dir),
        "--data.num_envs", "8", "--data.steps_per_env", "4",
        "--data.eval_episodes", "16", "--data.eval_num_envs", "8",
        "--model.num_minibatches", "2", "--model.update_epochs", "1",
        "--trainer.accelerator", "gpu", "--trainer.strategy", "fsdp", "--trainer.devices", str(devices),
        "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.logger.init_args.version", "v",
        "--checkpoint.dirpath", str(tmp_path / "ckpt"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars = read_scalars(tmp_path / "runs/blackjack/v")
    assert len(scalars["rollout/return_mean"]) == 2
    assert "eval/return_mean" in scalars
    assert (tmp_path / "ckpt/last.ckpt").exists()
