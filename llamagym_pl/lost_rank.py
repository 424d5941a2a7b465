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
"""

from __future__ import annotations

import re

import torch.distributed as dist

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
    return RankLost(
        f"{lost} was lost (its process died or stopped answering: {why}), so rank {rank} stopped too; "
        f"{resume}"
    )
