"""Preemption and a full disk, provoked for real in ``python -m llamagym_pl.fit`` subprocesses.

SIGTERM and SLURM's SIGUSR1 are sent by :class:`tests.probes.fault_probe.SendSignal` from
inside the run, at a chosen rollout step or minibatch (so the test knows where they land); the
disk fills up through ``RLIMIT_FSIZE`` in the child. One uninterrupted run is the reference.
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fit_runs import deterministic_after, environment, saved
from run_args import tiny_run_args

from llamagym_pl.guards import read_checkpoint
from llamagym_pl.preemption import requeue_slurm_job
from llamagym_pl.tb import read_scalars

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "blackjack.yaml"
EPOCHS = 3
SLURM = {
    "SLURM_NTASKS": "1",
    "SLURM_JOB_NAME": "train",
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost",
}


def fit(model_dir: Path, out: Path, *extra: str, env: dict[str, str] | None = None, limit: int | None = None):
    """One ``fit`` run of ``EPOCHS`` epochs into ``out``; ``limit``: the most bytes a file may hold."""

    def file_size_limit() -> None:
        # Ignored, SIGXFSZ no longer kills the process: a write past the limit fails with EFBIG.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "llamagym_pl.fit",
        *tiny_run_args(CONFIG, model_dir, out, *extra, epochs=EPOCHS),
    ]
    return subprocess.run(
        cmd,
        env={**environment(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=file_size_limit if limit else None,
    )


def signal_at(name: str, epoch: int, phase: str) -> list[str]:
    return [
        "--trainer.callbacks+=tests.probes.fault_probe.SendSignal",
        f"--trainer.callbacks.signal_name={name}",
        f"--trainer.callbacks.epoch={epoch}",
        f"--trainer.callbacks.phase={phase}",
    ]


def last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.startswith("llamagym_pl.fit: ")][-1]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    done = fit(tiny_model_dir, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_sigusr1_and_sigterm_stop_at_a_safe_point_and_resume_exactly(
    uninterrupted: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """SLURM's SIGUSR1 mid-update of epoch 1 (the job requeued through a stand-in scontrol), then
    on the requeued run SIGTERM mid-rollout of epoch 2, then a last resume: the three runs log
    and end with exactly what the uninterrupted run did."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    slurm = {**SLURM, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    out, last = tmp_path / "run", tmp_path / "run" / "ckpt" / "last.ckpt"

    stopped = fit(tiny_model_dir, out, *signal_at("SIGUSR1", 1, "update"), env=slurm)
    assert stopped.returncode == 128 + signal.SIGUSR1, stopped.stderr[-3000:]
    line = last_line(stopped.stderr)
    assert line.startswith("llamagym_pl.fit: stopped by SIGUSR1 in epoch 1, which is abandoned; ")
    assert (
        f"{last} holds the epochs before it: resume with `python -m llamagym_pl.fit --config {CONFIG}" in line
    )
    assert line.endswith("--ckpt_path last` (the same flags); requeued SLURM job 4242")
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert saved(last)["epoch"] == 0
    assert sorted(p.name for p in last.parent.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert not list(out.rglob("hpc_ckpt_*")), "Lightning's own mid-step SLURM checkpoint"

    stopped = fit(tiny_model_dir, out, "--ckpt_path", "last", *signal_at("SIGTERM", 2, "rollout"))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert last_line(stopped.stderr).startswith(
        "llamagym_pl.fit: stopped by SIGTERM in epoch 2, which is abandoned"
    )
    assert saved(last)["epoch"] == 1

    done = fit(tiny_model_dir, out, "--ckpt_path", "last")
    assert done.returncode == 0, done.stderr[-3000:]

    # Each run logged the epochs it finished (version_0: 0, version_1: 1, version_2: 2); merged,
    # they are the uninterrupted run's points, step for step and bit for bit.
    full = deterministic_after(read_scalars(uninterrupted / "runs" / "blackjack" / "version_0"), -1)
    parts = deterministic_after(read_scalars(out / "runs" / "blackjack"), -1)
    assert [v for _, v in parts["epoch"]] == [0, 1, 2]
    assert parts == full
    reference = saved(uninterrupted / "ckpt" / "last.ckpt")["state_dict"]
    for name, value in saved(last)["state_dict"].items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0, msg=name)


def test_a_missing_scontrol_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in SLURM.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol there
    with pytest.raises(Exception) as err:
        requeue_slurm_job()
    assert str(err.value) == (
        "cannot requeue SLURM job 4242: scontrol is not on PATH; resubmit the job script: it resumes "
        "from last.ckpt with --ckpt_path last"
    )


def test_a_full_disk_keeps_the_last_checkpoint_and_says_how_much_room_is_needed(
    uninterrupted: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    (out / "ckpt").mkdir(parents=True)
    last = out / "ckpt" / "last.ckpt"
    last.write_bytes((uninterrupted / "ckpt" / "last.ckpt").read_bytes())  # epoch 2, whole
    before = hashlib.sha256(last.read_bytes()).hexdigest()
    size = last.stat().st_size

    # Room for the logs and configs, not for a checkpoint: the save after epoch 3 fails.
    done = fit(tiny_model_dir, out, "--ckpt_path", "last", "--trainer.max_epochs", "4", limit=size // 2)
    assert done.returncode == 1, done.stderr[-3000:]
    line = last_line(done.stderr)
    match = re.fullmatch(
        f"llamagym_pl.fit: error: no space to save checkpoint in {re.escape(str(last.parent))} "
        r"\(needs ~([\d.]+) MB, OSError: \[Errno 27\] File too large\); free space there or set "
        "checkpoint.dirpath to a disk with room, then resume the last whole epoch with --ckpt_path last",
        line,
    )
    assert match, line
    assert float(match.group(1)) == pytest.approx(size / 2**20, rel=0.1)  # a checkpoint's size
    assert "Traceback" not in done.stderr
    assert hashlib.sha256(last.read_bytes()).hexdigest() == before
    assert read_checkpoint(last)["epoch"] == 2
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]  # no partial file for `last`


_OBSERVED = """
import subprocess, sys, time
from llamagym_pl import lost_rank
from lightning.pytorch.strategies.launchers import subprocess_script as launcher
lost_rank.watch_children("prog", lambda: "resume with X")
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
launcher._launch_process_observer([child])  # what Lightning's DDP launcher calls in rank 0
print(child.pid, flush=True)
time.sleep(30)  # rank 0 busy without a collective (a rollout): the observer must stop it
"""


def test_rank_0_reports_a_dead_child_in_one_line_when_lightnings_observer_sees_it_first() -> None:
    """Lightning's child observer SIGKILLed rank 0 silently (exit -9) when it noticed a dead child
    before rank 0's next collective did; now it is the same one line and exit status 1."""
    env = {**os.environ, "WORLD_SIZE": "2", "NODE_RANK": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _OBSERVED], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    child = int(proc.stdout.readline())
    os.kill(child, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=25)  # the observer polls every 5 s
    assert proc.returncode == 1, stderr
    # (Lightning's own log line, "Child process with PID ... terminated", may come before it)
    assert stderr.strip().splitlines()[-1] == (
        "prog: error: rank 1 of 2 was lost (its process died or stopped answering: killed by SIGKILL), "
        "so rank 0 stopped too; resume with X"
    )


_MAIN_THREAD_FIRST = """
import subprocess, sys, time
from llamagym_pl import lost_rank
from lightning.pytorch.strategies.launchers import subprocess_script as launcher
lost_rank.watch_children("prog", lambda: "resume with X")
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
launcher._launch_process_observer([child])
print(child.pid, flush=True)
sys.stdin.readline()  # the test has killed the child: the collective fails at once
lost = lost_rank.rank_lost(RuntimeError("Connection reset by peer"), 0, 2, "resume with Y")
time.sleep(7)  # the way out (Lightning's teardown): meanwhile the observer sees the dead child
raise SystemExit(f"prog: error: {lost}")
"""


def test_the_observer_lets_the_main_thread_print_the_line_it_claimed() -> None:
    """When rank 0's collective saw the lost rank first, the observer exited at its next poll
    (os._exit) before the main thread had printed: exit 1 with no line at all."""
    env = {**os.environ, "WORLD_SIZE": "2", "NODE_RANK": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _MAIN_THREAD_FIRST],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    os.kill(int(proc.stdout.readline()), signal.SIGKILL)
    _, stderr = proc.communicate("\n", timeout=40)
    assert proc.returncode == 1, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("prog:")]
    assert lines == [
        "prog: error: rank 1 of 2 was lost (its process died or stopped answering: Connection reset by "
        "peer), so rank 0 stopped too; resume with Y"
    ]
