"""``python -m llamagym_pl.evaluate --config <yaml> --ckpt_path <ckpt> [--episodes N] [--out F]``.

Greedy decoding on fixed, seeded evaluation deals, batched over ``data.eval_num_envs`` envs.
Prints mean return ± standard error, win/draw/loss and invalid-action rates, and writes them
as JSON (default: ``eval.json`` beside the checkpoint). The same config file as for training
is used, so the agent, env and model settings match the run.

Evaluation runs in this one process. DDP runs' checkpoints are ordinary files (rank 0 wrote
them), and FSDP's default ``state_dict_type: full`` writes one file too (a ``sharded``
directory must be consolidated first). A config that trains on several processes
(``trainer.strategy: ddp``, ``devices: 4``) is accepted, with a note that those settings apply
to training only; under torchrun or srun with several tasks evaluate refuses to start (each
task would play every episode).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from llamagym_pl.fit import SETUP_ERRORS, LlamaGymCLI, build_cli
from llamagym_pl.guards import ConfigError, check_checkpoint_fits, one_line_errors, read_checkpoint

DEFAULT_EPISODES = 20_000


class EvaluateCLI(LlamaGymCLI):
    """The training CLI (same config file and flags) plus evaluation's own two flags."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        episodes = "Greedy evaluation episodes (rounded up to a multiple of data.eval_num_envs)."
        parser.add_argument("--episodes", type=int, default=DEFAULT_EPISODES, help=episodes)
        out = "Where to write the JSON results (default: eval.json beside the checkpoint)."
        parser.add_argument("--out", type=str | None, default=None, help=out)


def load_weights(module, ckpt_path: str) -> None:
    """Load a Lightning checkpoint's weights (``weights_only``: no pickled code runs).

    Refuses a checkpoint of another model or LoRA setup by name (see
    :func:`~llamagym_pl.guards.check_checkpoint_fits`); a LoRA checkpoint gets its frozen base
    weights from the model built from the config, as when resuming.
    """
    path = Path(ckpt_path)
    if path.is_dir():
        raise ConfigError(
            f"checkpoint {ckpt_path!r} is a directory (an FSDP checkpoint saved with state_dict_type: "
            "sharded); consolidate it into one file first: python -m "
            f"lightning.pytorch.utilities.consolidate_checkpoint {ckpt_path}, then pass "
            f"--ckpt_path {ckpt_path}.consolidated"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path!r} does not exist; pass the path of a .ckpt file")
    checkpoint = read_checkpoint(path, resume=False)
    check_checkpoint_fits(module, checkpoint, ckpt_path)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])


def main(argv: list[str] | None = None) -> dict:
    with one_line_errors("llamagym_pl.evaluate", SETUP_ERRORS):
        return _evaluate(argv)


def _evaluate(argv: list[str] | None) -> dict:
    cli = build_cli(args=argv, run_fit=False, cli_class=EvaluateCLI)
    episodes, out = cli.config.get("episodes"), cli.config.get("out")
    ckpt_path = cli.config.get("ckpt_path")
    if not ckpt_path:
        raise SystemExit("evaluate needs --ckpt_path PATH (a checkpoint written by llamagym_pl.fit)")
    _check_one_process(cli.trainer)
    module, datamodule = cli.model, cli.datamodule
    load_weights(module, ckpt_path)
    results = datamodule.evaluate(module.policy, module.tokenizer, episodes)
    results["ckpt_path"] = str(ckpt_path)
    print(
        f"mean return {results['return_mean']:+.4f} ± {results['return_stderr']:.4f} (s.e.) over "
        f"{results['episodes']} episodes | win {results['win_rate']:.3f} draw {results['draw_rate']:.3f} "
        f"loss {results['loss_rate']:.3f} | invalid actions {results['invalid_action_rate']:.4f}"
    )
    out_path = Path(out) if out else Path(ckpt_path).with_name("eval.json")
    out_path.write_text(json.dumps(results, indent=2))
    print(f"wrote {out_path}")
    return results


def _check_one_process(trainer) -> None:
    """Evaluation plays every episode here; training's multi-process settings do not apply."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun (and Lightning's own launcher)
    environment = getattr(trainer.strategy, "cluster_environment", None)
    external = environment is not None and environment.creates_processes_externally
    if launched > 1 or (external and trainer.world_size > 1):
        raise ConfigError(
            f"evaluate runs in one process, but a launcher (torchrun, srun) started "
            f"{max(launched, trainer.world_size)}: start it with plain python, or as one task"
        )
    if trainer.world_size > 1:
        print(
            f"note: evaluate plays all episodes in this one process; the {trainer.world_size}-process "
            "trainer settings (strategy, devices, num_nodes) apply to training only",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
