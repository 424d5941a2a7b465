"""Preemption: a scheduler's SIGTERM, or SLURM's SIGUSR1 warning, stops training at a safe point.

What a scheduler sends first is SIGTERM (SLURM at preemption or ``scancel``, Kubernetes, most
batch systems); ``#SBATCH --signal=USR1@90`` makes SLURM send SIGUSR1 90 s before the time
limit. Either stops the run at the next rollout or training step: the epoch in progress is
abandoned, and ``last.ckpt`` (written atomically after every epoch) is the resumable state, so
``--ckpt_path last`` continues exactly as an uninterrupted run would. Nothing is saved
mid-epoch: a rollout cannot be resumed halfway.

Lightning's own handling is used where it does the job: its signal connector composes its SIGTERM
handler with the one installed here (and in DDP forwards SIGTERM to the ranks it launched and
agrees on it at every training step). Its SLURM auto-requeue is not: it saves ``hpc_ckpt_N.ckpt``
from inside the signal handler, mid-step, and a requeued job would resume from that mid-epoch file;
a SIGUSR1 handler installed before ``fit`` keeps Lightning from installing it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
from typing import Any

from llamagym_pl.guards import LlamaGymError, RunAborted

REQUEUE_SIGNAL = signal.SIGUSR1
"""SLURM's advance warning (``#SBATCH --signal=USR1@90``), as Lightning's SLURMEnvironment."""

_received: int | None = None


class Preempted(LlamaGymError):
    """Training stopped at a safe point because a scheduler sent ``signum``.

    The CLI exits with 128 + the signal (143 for SIGTERM, 138 for SIGUSR1), as a shell reports a
    process the signal ended: a preempted run must not look finished to a scheduler, a retry
    loop or ``&&``.
    """

    label = ""

    def __init__(self, signum: int, detail: str = "") -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}{detail}")
        self.signum = signum
        self.exit_status = 128 + signum


def _record(signum: int, frame: Any) -> None:
    global _received
    _received = signum


def on_slurm() -> bool:
    """Whether this process runs as a SLURM task (Lightning's own test: SLURM_NTASKS set, job
    not named ``bash``/``interactive``)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect()


def defer_preemption() -> None:
    """Deliver SIGTERM (and SIGUSR1 on SLURM) as :class:`Preempted` at the next safe point
    (:func:`raise_if_preempted`) instead of ending the process where it stands. Installed by
    ``llamagym_pl.fit`` before ``trainer.fit``."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _record)
    if on_slurm():
        signal.signal(REQUEUE_SIGNAL, _record)


def raise_if_preempted() -> None:
    """Raise :class:`Preempted` if a preemption signal arrived since the process started."""
    if _received is not None:
        raise Preempted(_received)


def received_signal() -> int | None:
    """The preemption signal that arrived, if any (for a decision DDP ranks take together)."""
    return _received


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``ARRAYJOB_TASK`` for an array task, else the job's."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job() -> str:
    """``scontrol requeue`` this job, and return the job id; :class:`RunAborted` in one line if
    that cannot be done (no job id, no ``scontrol``, or it fails)."""
    job = slurm_job_id()
    if not job or not re.fullmatch(r"[0-9_]+", job):
        raise RunAborted(f"cannot requeue: SLURM_JOB_ID={job!r} is not a SLURM job id; resubmit the job")
    fix = "resubmit the job script: it resumes from last.ckpt with --ckpt_path last"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise RunAborted(f"cannot requeue SLURM job {job}: scontrol is not on PATH; {fix}")
    done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise RunAborted(
            f"cannot requeue SLURM job {job}: `scontrol requeue {job}` exited with {done.returncode} "
            f"({said[-1] if said else 'no output'}); {fix}"
        )
    return job
