"""A callback the fault tests inject into the CLI: sends a real signal to its own process at a
chosen point of a chosen epoch on a chosen rank (SIGKILL: the rank dies; SIGTERM/SIGUSR1: a
scheduler's preemption)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback


class SendSignal(Callback):
    """At ``epoch`` on global rank ``rank``, send ``signal_name`` to this process: in ``phase``
    ``"rollout"`` at the rollout's ``step``-th env step, in ``"update"`` before minibatch ``step``.
    With ``out_dir``, each rank writes its pid to ``pid{rank}`` there, and the signalled one the
    time it sent the signal to ``signalled``."""

    def __init__(
        self,
        signal_name: str,
        epoch: int,
        phase: str,
        rank: int = 0,
        step: int = 1,
        out_dir: str | None = None,
    ) -> None:
        self.signum = signal.Signals[signal_name]
        self.epoch, self.phase, self.rank, self.step = epoch, phase, rank, step
        self.out_dir = Path(out_dir) if out_dir else None

    def _send(self) -> None:
        if self.out_dir is not None:
            (self.out_dir / "signalled").write_text(repr(time.time()))
        os.kill(os.getpid(), self.signum)

    def _due(self, trainer: Any) -> bool:
        return trainer.current_epoch == self.epoch and trainer.global_rank == self.rank

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / f"pid{trainer.global_rank}").write_text(str(os.getpid()))
        if self.phase != "rollout":
            return
        collector = trainer.datamodule.collector
        env_step, count = collector._step, [0]

        def step(*args: Any, **kwargs: Any) -> Any:
            if self._due(trainer):
                count[0] += 1
                if count[0] == self.step:
                    self._send()
            return env_step(*args, **kwargs)

        collector._step = step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.phase == "update" and self._due(trainer) and batch_idx == self.step:
            self._send()
