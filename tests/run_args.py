"""The command-line arguments of the tiny ``fit`` runs that tests drive (in process or not)."""

from __future__ import annotations

from pathlib import Path


def tiny_run_args(config: Path, model_dir: Path | None, out: Path, *extra: str, epochs: int = 1) -> list[str]:
    """``fit`` arguments for a tiny run of ``config``: 4 envs x 4 turns, 2 minibatches, 1 update
    epoch, an 8-episode evaluation, logs under ``out/runs`` and checkpoints in ``out/ckpt``; the
    model is ``model_dir`` (None: the config's). ``extra`` come last, so they override any of
    these (LightningCLI keeps a flag's last value)."""
    model = ["--model.name_or_path", str(model_dir)] if model_dir is not None else []
    return [
        "--config", str(config),
        *model,
        "--data.num_envs", "4",
        "--data.steps_per_env", "4",
        "--model.num_minibatches", "2",
        "--model.update_epochs", "1",
        "--trainer.max_epochs", str(epochs),
        "--trainer.logger.init_args.save_dir", str(out / "runs"),
        "--checkpoint.dirpath", str(out / "ckpt"),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--data.eval_episodes", "8",
        "--data.eval_num_envs", "4",
        *extra,
    ]  # fmt: skip
