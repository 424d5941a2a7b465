"""A callback the fault tests inject into the CLI: sends a real signal to its own process at a
chosen point of a chosen epoch on a chosen rank (SIGKILL: the rank dies; SIGTERM/SIGUSR1: a
scheduler's preemption)."""

from __future__ import annotations

import os
import signal
from typing import Any

from lightning.pytorch.callbacks import Callback


class SendSignal(Callback):
    """At ``epoch`` on global rank ``rank``, send ``signal_name`` to this process: in ``phase``
    ``"rollout"`` at the rollout's ``step``-th env step, in ``"update"`` before minibatch ``step``."""

    def __init__(self, signal_name: str, epoch: int, phase: str, rank: int = 0, step: int = 1) -> None:
        self.signum = signal.Signals[signal_name]
        self.epoch, self.phase, self.rank, self.step = epoch, phase, rank, step

    def _due(self, trainer: Any) -> bool:
        return trainer.current_epoch == self.epoch and trainer.global_rank == self.rank

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.phase != "rollout":
            return
        collector = trainer.datamodule.collector
        env_step, count = collector._step, [0]

        def step(*args: Any, **kwargs: Any) -> Any:
            if self._due(trainer):
                count[0] += 1
                if count[0] == self.step:
                    os.kill(os.getpid(), self.signum)
            return env_step(*args, **kwargs)

        collector._step = step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.phase == "update" and self._due(trainer) and batch_idx == self.step:
            os.kill(os.getpid(), self.signum)
