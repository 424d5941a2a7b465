"""A callback the DDP test injects into the CLI: dumps what each rank saw and its weights."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class RankProbe(Callback):
    """Writes ``rank{r}.jsonl``: per epoch, the episodes' first observations, the rollout's
    return sum / episode count, and a float64 checksum of the trainable weights after every step."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self._checksums: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        total = sum(p.detach().double().sum() for p in pl_module.parameters() if p.requires_grad)
        self._checksums.append(float(total))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        stats = trainer.datamodule.last_stats
        done = [ep for ep in stats.episodes if ep.done]
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "epoch": trainer.current_epoch,
            "first_observations": [ep.observations[0] for ep in stats.episodes],
            "return_sum": sum(ep.env_return for ep in done),
            "episodes": len(done),
            "checksums": self._checksums,
        }
        self._checksums = []
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
