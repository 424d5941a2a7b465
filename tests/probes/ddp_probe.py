"""A callback the DDP test injects into the CLI: dumps what each rank saw and its weights."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class RankProbe(Callback):
    """Writes, per rank and epoch, one line of ``rank{r}.jsonl``: the rollout's first observations,
    its return sum / episode count, and a float64 checksum of the trainable weights after every
    step; and after each validation one line of ``eval_rank{r}.jsonl``: the env seeds of the
    evaluation episodes this rank played and their returns."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self._checksums: list[float] = []
        self._eval: dict[str, list] = {"seeds": [], "returns": []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        total = sum(p.detach().double().sum() for p in pl_module.parameters() if p.requires_grad)
        self._checksums.append(float(total))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        stats = trainer.datamodule.rollout.stats
        done = [ep for ep in stats.episodes if ep.done]
        self._write(
            trainer,
            "rank",
            {
                "first_observations": [ep.observations[0] for ep in stats.episodes],
                "return_sum": sum(ep.env_return for ep in done),
                "episodes": len(done),
                "checksums": self._checksums,
            },
        )
        self._checksums = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._eval = {"seeds": [], "returns": []}
        collector = trainer.datamodule.eval_collector
        if getattr(collector, "probed", False):
            return
        # Record what the evaluation plays without changing it: every episode starts with one
        # env.reset(seed=...), and collect returns the finished episodes.
        collector.probed = True
        for env in collector.envs:
            env.reset = self._recording_reset(env.reset)
        collect = collector.collect

        def recording_collect(*args, **kwargs):
            stats = collect(*args, **kwargs)
            self._eval["returns"] = [ep.env_return for ep in stats.episodes]
            return stats

        collector.collect = recording_collect

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer, "eval_rank", self._eval)

    def _recording_reset(self, reset):
        def recording_reset(*args, **kwargs):
            self._eval["seeds"].append(kwargs["seed"])
            return reset(*args, **kwargs)

        return recording_reset

    def _write(self, trainer, prefix: str, fields: dict) -> None:
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "epoch": trainer.current_epoch,
            **fields,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / f"{prefix}{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
