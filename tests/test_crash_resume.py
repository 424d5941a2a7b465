"""Crashes lose nothing: SIGKILL mid-run, then ``--ckpt_path last`` continues exactly; Ctrl-C
saves a checkpoint and exits at once; a checkpoint file is always whole.

The runs are real ``python -m llamagym_pl.fit`` subprocesses (one thread each, tiny settings).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fit_runs import deterministic_after, environment, saved
from run_args import tiny_run_args

from llamagym_pl.checkpointing import (
    AtomicCheckpointIO,
    InterruptCheckpoint,
    defer_interrupts,
    raise_if_interrupted,
)
from llamagym_pl.fit import build_cli
from llamagym_pl.tb import read_scalars

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "blackjack.yaml"
EPOCHS = 6


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # in-process work here is tiny, and the machine is shared
    yield
    torch.set_num_threads(threads)


def command(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llamagym_pl.fit",
        *tiny_run_args(CONFIG, model_dir, out, *extra, epochs=EPOCHS),
    ]


def run(model_dir: Path, out: Path, *extra: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        command(model_dir, out, *extra), env=environment(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


def start(model_dir: Path, out: Path, *extra: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "stderr.txt", "w")  # a file, not a pipe: a full pipe would block the run
    return subprocess.Popen(
        command(model_dir, out, *extra), env=environment(), stdout=subprocess.DEVNULL, stderr=log
    )


def wait_for_epoch(proc: subprocess.Popen, path: Path, epoch: int, out: Path) -> None:
    """Poll until ``path`` holds ``epoch`` or later, while ``proc`` is still running."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        ckpt = saved(path)
        if ckpt is not None and ckpt["epoch"] >= epoch:
            return
        if proc.poll() is not None:
            pytest.fail(
                f"the run exited ({proc.returncode}) early:\n{(out / 'stderr.txt').read_text()[-3000:]}"
            )
        time.sleep(0.02)
    pytest.fail(f"no checkpoint of epoch {epoch} in time")


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    run(tiny_model_dir, tmp_path / "full")
    out = tmp_path / "crash"
    last = out / "ckpt" / "last.ckpt"
    proc = start(tiny_model_dir, out)
    wait_for_epoch(proc, last, 1, out)  # epochs 0 and 1 are saved; a later one is running
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = saved(last)["epoch"]  # whole, whenever the kill came
    assert 1 <= killed_at < EPOCHS - 1

    run(tiny_model_dir, out, "--ckpt_path", "last")

    full = read_scalars(tmp_path / "full" / "runs" / "blackjack" / "version_0")
    resumed = read_scalars(out / "runs" / "blackjack" / "version_1")
    split = next(s for s, v in full["epoch"] if v == killed_at)  # the step epoch `killed_at` ended at
    expected, got = deterministic_after(full, split), deterministic_after(resumed, split)
    assert [v for _, v in got["epoch"]] == list(range(killed_at + 1, EPOCHS))
    assert got.keys() == expected.keys()
    for tag in expected:
        assert got[tag] == expected[tag], tag  # same steps, bit-identical values
    full_weights = saved(tmp_path / "full" / "ckpt" / "last.ckpt")["state_dict"]
    resumed_weights = saved(last)["state_dict"]
    for name, value in full_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=0, atol=0, msg=name)


def test_ctrl_c_saves_a_checkpoint_and_exits(tiny_model_dir: Path, tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ckpt"
    proc = start(tiny_model_dir, tmp_path, "--trainer.max_epochs", "1000")
    wait_for_epoch(proc, ckpt_dir / "last.ckpt", 0, tmp_path)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert time.monotonic() - sent < 10
    assert proc.returncode == 1  # Lightning's graceful shutdown exits with status 1
    interrupted = saved(ckpt_dir / InterruptCheckpoint.FILENAME)
    assert interrupted is not None, (tmp_path / "stderr.txt").read_text()[-3000:]
    last = saved(ckpt_dir / "last.ckpt")
    assert interrupted["global_step"] >= last["global_step"]  # mid-epoch, after the last whole one
    assert "`--ckpt_path last` resumes the last whole epoch" in (tmp_path / "stderr.txt").read_text()


def test_the_cli_saves_checkpoints_atomically(tiny_model_dir: Path, tmp_path: Path) -> None:
    cli = build_cli(args=command(tiny_model_dir, tmp_path)[3:], run_fit=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1}, path)

    def dies_halfway(obj: Any, f: Any) -> None:
        f.write(b"the first half of a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_ctrl_c_is_delivered_at_the_next_safe_point() -> None:
    """The first SIGINT only asks for a stop, raised by raise_if_interrupted (each training step
    and rollout step); a second one interrupts at once."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        defer_interrupts()
        os.kill(os.getpid(), signal.SIGINT)  # handled right here: must not raise yet
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()
        raise_if_interrupted()  # delivered once
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second press
    finally:
        signal.signal(signal.SIGINT, previous)
        try:
            raise_if_interrupted()
        except KeyboardInterrupt:
            pass
