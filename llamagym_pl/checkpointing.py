"""Safe saves: checkpoints written atomically, and Ctrl-C delivered at a safe point.

A crash at any moment leaves ``last.ckpt`` a whole epoch (:class:`AtomicCheckpointIO`; a full disk
is :class:`NoSpaceToSave`, the old file kept); Ctrl-C stops at the next training or rollout step
and saves ``interrupted.ckpt`` (:class:`InterruptCheckpoint`), a scheduler's SIGTERM/SIGUSR1 stops
there too (:mod:`llamagym_pl.preemption`); see :mod:`llamagym_pl.guards` for the rest of the
failure modes.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from llamagym_pl.guards import RunAborted
from llamagym_pl.preemption import Preempted, raise_if_preempted, received_signal

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside it, fsyncs, then ``os.replace``\\ s it in.

    A crash at any moment leaves either the old file or the new one, whole. Lightning 2.6's
    own save is atomic only by luck: its fsspec transaction stages the file in the system temp
    dir and commits with ``shutil.move``, which is a rename only when that dir shares a
    filesystem with the checkpoint (else a copy a crash can cut short), never fsyncs, and leaks
    the staged file if the process dies before the move. Remote paths keep Lightning's way.
    A disk that fills up (or a quota, or a file size limit) is :class:`NoSpaceToSave`.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")  # one writer per path: rank 0
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            no_space = _no_space(err)
            if no_space is not None:
                raise NoSpaceToSave(path, checkpoint_nbytes(checkpoint), no_space) from err
            raise
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""Disk full, quota exceeded, file size limit (``ulimit -f``): no room for the checkpoint."""


class NoSpaceToSave(RunAborted):
    """A checkpoint did not fit on its disk; the previous one is untouched and no partial file
    is left (so ``--ckpt_path last`` resumes the last whole epoch)."""

    def __init__(self, path: Path, nbytes: int, err: OSError) -> None:
        super().__init__(
            f"no space to save checkpoint in {path.parent} (needs ~{nbytes / 2**20:.1f} MB, "
            f"OSError: [Errno {err.errno}] {err.strerror}); free space there or set "
            "checkpoint.dirpath to a disk with room, then resume the last whole epoch with "
            "--ckpt_path last"
        )


def _no_space(err: BaseException | None) -> OSError | None:
    """The out-of-space ``OSError`` behind ``err``, if any: ``torch.save`` reports a failed write
    as a ``RuntimeError`` whose context is the ``OSError``."""
    for _ in range(8):  # a chain is short; a cycle must not loop forever
        if err is None:
            return None
        if isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS:
            return err
        err = err.__cause__ or err.__context__
    return None


def checkpoint_nbytes(obj: Any) -> int:
    """The bytes of the tensors in a checkpoint (nested dicts, lists, tuples): about its file size."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(checkpoint_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(checkpoint_nbytes(v) for v in obj)
    return 0


_interrupt_requested = False


def _defer_sigint(signum: int, frame: Any) -> None:
    global _interrupt_requested
    if _interrupt_requested:
        raise KeyboardInterrupt  # a second Ctrl-C: at once
    _interrupt_requested = True


def defer_interrupts() -> None:
    """Deliver Ctrl-C at the next safe point (:func:`raise_if_interrupted`: every training step and
    every rollout step) rather than wherever the signal lands.

    A ``KeyboardInterrupt`` raised inside library code can leave it broken for the shutdown that
    follows (e.g. a lock of TensorBoard's writer queue taken and never released, so the final
    flush waits forever). A second Ctrl-C interrupts at once. Installed by ``llamagym_pl.fit``.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _defer_sigint)


def raise_if_interrupted() -> None:
    """Raise the ``KeyboardInterrupt`` that a deferred Ctrl-C asked for, if any, or the
    :class:`~llamagym_pl.preemption.Preempted` of a scheduler's signal."""
    global _interrupt_requested
    if _interrupt_requested:
        _interrupt_requested = False
        raise KeyboardInterrupt
    raise_if_preempted()


class InterruptCheckpoint(L.Callback):
    """On Ctrl-C, save ``interrupted.ckpt`` beside ``last.ckpt`` before Lightning exits (status 1).

    It holds the state mid-epoch (part of a rollout trained on), for inspection or evaluation;
    ``--ckpt_path last`` still resumes from ``last.ckpt``, the last completed epoch, so the
    resumed run matches an uninterrupted one. Not Lightning's ``OnExceptionCheckpoint``: its file
    is a candidate of ``ckpt_path="last"`` (and ``fit`` then resumes from it even without
    ``ckpt_path``), which would resume mid-epoch.
    """

    FILENAME = "interrupted.ckpt"

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        signum = received_signal() or 0
        if trainer.world_size > 1:
            # DDP: a rank that alone was signalled must not leave the others waiting in the
            # gradient all-reduce, so the ranks stop together if any of them was.
            signum = int(
                trainer.strategy.reduce(torch.tensor(signum, device=pl_module.device), reduce_op="max")
            )
        if signum:
            raise Preempted(signum)
        raise_if_interrupted()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        if not isinstance(exception, KeyboardInterrupt) or dirpath is None:
            return
        path = os.path.join(dirpath, self.FILENAME)
        trainer.save_checkpoint(path, weights_only=False)  # the full state, optimizer included
        log.warning(
            "interrupted: saved %s (mid-epoch); `--ckpt_path last` resumes the last whole epoch", path
        )
