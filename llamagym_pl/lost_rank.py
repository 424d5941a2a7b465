"""A DDP rank that dies or hangs: the others stop with one line naming it, not a gloo traceback.

A rank notices a lost peer at its next collective (the rollout has none: at the latest when
the rollout ends; in the update every minibatch all-reduces its gradients). How long that
takes:

- gloo (CPU): a dead peer's sockets close, so the collective fails at once ("Connection reset
  by peer"); a peer that hangs alive is waited for up to the process-group timeout
  (Lightning's ``DDPStrategy(timeout=...)``, 30 min by default) before "Timed out waiting".
- NCCL (GPU): a dead or hung peer leaves the collective waiting until the process-group timeout;
  then PyTorch's watchdog (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default) aborts the
  communicator and ends the process, without a Python exception to turn into a line here.

Rank 0 started the other ranks as its children (Lightning's subprocess launcher) and a thread
of Lightning's polls them every 5 s: when one has died it SIGKILLs every process, rank 0 too,
with no line of ours. Whichever notices first, the collective or that poll, rank 0 says the
same line: :func:`watch_children` puts an observer in its place that reports and exits with 1.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable

import torch.distributed as dist
from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
from lightning.pytorch.strategies.launchers import subprocess_script as pytorch_launcher

from llamagym_pl.guards import RunAborted

PEER_FAILURE = re.compile(
    r"Connection (?:reset|closed) by peer|Broken pipe|Timed out waiting[^.\n]*|Socket Timeout"
    r"|NCCL communicator was aborted|connection to [^\n]* (?:was )?(?:closed|lost)",
    re.IGNORECASE,
)
"""What gloo (and the TCP store) say when a peer process is gone or does not answer."""


class RankLost(RunAborted):
    """Another DDP rank died or stopped answering; this one stopped too."""


def peer_failure(err: BaseException) -> str | None:
    """What ``err`` (or an error it was raised from) says about a lost peer, or None when it is
    some other error. Gloo raises a plain ``RuntimeError``; newer paths a ``DistError``."""
    for _ in range(8):  # a chain is short; a cycle must not loop forever
        if err is None:
            return None
        match = PEER_FAILURE.search(str(err))
        if match:
            return match.group(0)
        if isinstance(err, dist.DistError):
            return str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        err = err.__cause__ or err.__context__
    return None


def rank_lost(err: BaseException, rank: int, world_size: int, resume: str) -> RankLost | None:
    """The one-line :class:`RankLost` for ``err`` seen on ``rank`` of ``world_size``, or None if
    ``err`` is not a lost peer. With two ranks the lost one is the other; with more, which one
    is not known here (a collective fails on every survivor alike)."""
    if world_size < 2:
        return None
    why = peer_failure(err)
    if why is None:
        return None
    lost = f"rank {1 - rank} of 2" if world_size == 2 else f"another of the {world_size} ranks"
    _REPORTED.set()  # the child observer must not say it a second time
    return _lost_line(lost, why, rank, resume)


def _lost_line(lost: str, why: str, rank: int, resume: str) -> RankLost:
    return RankLost(
        f"{lost} was lost (its process died or stopped answering: {why}), so rank {rank} stopped too; "
        f"{resume}"
    )


_REPORTED = threading.Event()
"""Set once this process has reported a lost rank (by either path)."""

REPORT_GRACE_S = 30.0
"""How long the child observer lets the main thread print its line and exit before exiting itself."""


def exit_status(returncode: int) -> str:
    """How a child ended, from ``Popen.returncode``: a signal by name, or an exit status."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class _ReportingObserver(fabric_launcher._ChildProcessObserver):
    """Lightning's child observer, but what it does on a dead child is: one line, exit 1."""

    def __init__(self, prog: str, resume: Callable[[], str], **kwargs) -> None:
        super().__init__(**kwargs)
        self._prog, self._resume = prog, resume

    def _terminate_all(self) -> None:
        # Children are this node's local ranks 1..n-1; rank 0 of node k is global rank k * n.
        first = int(os.environ.get("NODE_RANK", "0")) * (len(self._child_processes) + 1)
        world = int(os.environ.get("WORLD_SIZE", len(self._child_processes) + 1))
        dead = [(first + i + 1, p.returncode) for i, p in enumerate(self._child_processes) if p.returncode]
        for proc in self._child_processes:  # as Lightning does: no rank may be left waiting
            proc.send_signal(self._termination_signal)
        if _REPORTED.is_set():
            # The main thread has built its line and is on its way out: exiting now could cut it
            # off before it prints. This thread is a daemon: the main one's exit ends it.
            time.sleep(REPORT_GRACE_S)
        else:
            _REPORTED.set()
            rank, code = dead[0]  # Lightning calls this only once a child has failed
            line = _lost_line(f"rank {rank} of {world}", exit_status(code), first, self._resume())
            print(f"{self._prog}: error: {line}", file=sys.stderr, flush=True)
        os._exit(1)  # from this thread: the main one may be blocked in a collective


def watch_children(prog: str, resume: Callable[[], str]) -> None:
    """Make the child observer that Lightning's DDP launcher starts in rank 0 report a dead child
    as ``prog: error: rank N of W was lost (...)`` with ``resume()`` and exit 1, instead of
    SIGKILLing rank 0 silently (``resume`` is called then, when the last checkpoint is known)."""

    def launch(child_processes: list) -> None:
        _ReportingObserver(prog, resume, child_processes=child_processes, main_pid=os.getpid()).start()

    pytorch_launcher._launch_process_observer = launch
