"""A callback the FSDP test injects into the CLI: is the policy really sharded between forwards?"""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class ShardProbe(Callback):
    """Writes ``shards{r}.jsonl``: per epoch, once the rollout has been played, the shape of the
    LM's input embedding as code outside FSDP's forward sees it (FSDP leaves a flat slice of this
    rank's shard, or an empty tensor, when it shards) and its full shape under
    ``summon_full_params``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        def embedding_shape() -> list[int]:
            return list(pl_module.policy.lm.get_input_embeddings().weight.shape)

        outside = embedding_shape()
        with FSDP.summon_full_params(trainer.strategy.model, writeback=False):
            full = embedding_shape()
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "epoch": trainer.current_epoch,
            "strategy": type(trainer.strategy).__name__,
            "outside_forward": outside,
            "full": full,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / f"shards{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
