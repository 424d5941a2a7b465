"""End to end through the CLI, in process: logged metrics, checkpoints, resume, seeding, configs.

The runs are tiny (4 envs x 4 steps, 2 minibatches, 1 update epoch) and shared between tests
through module-scoped fixtures, so the whole module costs about a dozen PPO iterations.
"""

from __future__ import annotations

import importlib
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from run_args import tiny_run_args

from llamagym_pl.datamodule import RolloutDataModule
from llamagym_pl.fit import LlamaGymCLI, build_cli
from llamagym_pl.module import PPOModule
from llamagym_pl.tb import read_scalars
from llamagym_pl.tiny_model import CACHE_ENV

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
CONFIG = EXPERIMENTS / "blackjack.yaml"

REQUIRED_SCALARS = (
    "rollout/return_mean",
    "rollout/episode_length",
    "rollout/invalid_action_rate",
    "train/policy_loss",
    "train/value_loss",
    "train/entropy",
    "train/approx_kl",
    "train/clipfrac",
    "train/explained_variance",
    "train/learning_rate",
    "rollout/env_steps_per_s",
    "rollout/generated_tokens_per_s",
)


def is_timing(tag: str) -> bool:
    """Wall-clock measurements (``*_s``, ``*_per_s``): the only scalars that may differ between
    identical runs."""
    return tag.endswith("_s")


Scalars = dict[str, list[tuple[int, float]]]


@pytest.fixture(scope="module", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Nothing in this module may build into, or read from, the user's model cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
        yield


class Run:
    """One in-process ``fit`` and what it left behind."""

    def __init__(self, cli: LlamaGymCLI, ckpt_dir: Path) -> None:
        self.cli = cli
        self.ckpt_dir = ckpt_dir
        self.log_dir = Path(cli.trainer.logger.log_dir)
        self.scalars: Scalars = read_scalars(self.log_dir)
        self.weights = {k: v.detach().clone() for k, v in cli.model.policy.state_dict().items()}


def fit(model_dir: Path, out: Path, *extra: str, epochs: int = 2) -> Run:
    """A tiny run logging under ``out/runs`` and checkpointing to ``out/ckpt``."""
    # A linear schedule depends on max_epochs, which differs between a 4-epoch run and a 2-epoch
    # run resumed to 4; the comparisons below need the same LR in both.
    args = tiny_run_args(CONFIG, model_dir, out, "--model.lr_schedule", "constant", *extra, epochs=epochs)
    return Run(build_cli(args=args), out / "ckpt")


def deterministic(scalars: Scalars) -> Scalars:
    return {tag: points for tag, points in scalars.items() if not is_timing(tag)}


def after_step(scalars: Scalars, step: int) -> Scalars:
    """The points logged after ``step`` (hp_metric is logged at step 0 by every run)."""
    return {tag: [(s, v) for s, v in pts if s > step] for tag, pts in deterministic(scalars).items()}


def assert_same_scalars(a: Scalars, b: Scalars) -> None:
    assert a.keys() == b.keys()
    for tag in a:
        assert [s for s, _ in a[tag]] == [s for s, _ in b[tag]], tag
        torch.testing.assert_close(
            torch.tensor([v for _, v in a[tag]]),
            torch.tensor([v for _, v in b[tag]]),
            rtol=0,
            atol=0,
            msg=tag,
        )


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A 2-epoch run, again, and with another data seed; a 4-epoch run; two resumptions of the
    2-epoch run's checkpoints (copied, so that run's own files stay as it left them)."""
    root = tmp_path_factory.mktemp("fit")
    threads = torch.get_num_threads()
    # One thread: these models are tiny, and on a shared 2-core machine a second OpenMP thread
    # spins waiting for a busy core (measured 5x slower under load).
    torch.set_num_threads(1)
    try:
        out: dict[str, Any] = {"root": root}
        out["two"] = fit(tiny_model_dir, root / "two")
        shutil.copytree(root / "two" / "ckpt", root / "resumed" / "ckpt")
        shutil.copytree(root / "two" / "ckpt", root / "last" / "ckpt")
        out["two_again"] = fit(tiny_model_dir, root / "two_again")
        out["other_seed"] = fit(tiny_model_dir, root / "other_seed", "--data.seed", "1")
        out["four"] = fit(tiny_model_dir, root / "four", epochs=4)
        last = str(root / "resumed" / "ckpt" / "last.ckpt")
        out["resumed"] = fit(tiny_model_dir, root / "resumed", "--ckpt_path", last, epochs=4)
        out["resumed_last"] = fit(tiny_model_dir, root / "last", "--ckpt_path", "last", epochs=3)
        yield out
    finally:
        torch.set_num_threads(threads)


def test_logs_every_scalar_and_saves_last_checkpoint(runs: dict[str, Any]) -> None:
    run: Run = runs["two"]
    missing = [tag for tag in REQUIRED_SCALARS if tag not in run.scalars]
    assert not missing, f"not logged: {missing}"
    for tag in REQUIRED_SCALARS:
        values = [v for _, v in run.scalars[tag]]
        assert len(values) == 2, f"{tag} should be logged once per epoch, got {run.scalars[tag]}"
        assert all(math.isfinite(v) for v in values), tag
    assert all(v > 0 for tag in REQUIRED_SCALARS if is_timing(tag) for _, v in run.scalars[tag])
    assert [v for _, v in run.scalars["train/learning_rate"]] == pytest.approx([1e-3, 1e-3])

    last = run.ckpt_dir / "last.ckpt"
    assert last.is_file()
    # Hyperparameters are plain values: the checkpoint loads with weights_only.
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1  # the last of epochs 0, 1
    assert ckpt["hyper_parameters"]["name_or_path"] == str(run.cli.model.hparams.name_or_path)


def test_resume_continues_exactly(runs: dict[str, Any]) -> None:
    four: Run = runs["four"]
    resumed: Run = runs["resumed"]
    split = max(s for s, _ in runs["two"].scalars["epoch"])  # the step of epoch 2's end
    tail = after_step(four.scalars, split)
    assert tail["rollout/return_mean"], "the 4-epoch run logged nothing after epoch 2"
    assert [v for _, v in tail["epoch"]] == [2.0, 3.0]
    assert_same_scalars(after_step(resumed.scalars, split), tail)
    assert four.weights.keys() == resumed.weights.keys()
    for name in four.weights:
        torch.testing.assert_close(resumed.weights[name], four.weights[name], rtol=0, atol=0, msg=name)


def test_ckpt_path_last_resolves_in_checkpoint_dirpath(runs: dict[str, Any]) -> None:
    run: Run = runs["resumed_last"]
    assert Path(run.cli.trainer.ckpt_path) == runs["root"] / "last" / "ckpt" / "last.ckpt"
    # It resumed from epoch 2, so epoch 3 is the 4-epoch run's epoch 3.
    split = max(s for s, _ in runs["two"].scalars["epoch"])
    tail = after_step(run.scalars, split)
    assert [v for _, v in tail["epoch"]] == [2.0]
    expected = {tag: pts[: len(tail[tag])] for tag, pts in after_step(runs["four"].scalars, split).items()}
    assert_same_scalars(tail, expected)


def test_same_seed_gives_identical_runs(runs: dict[str, Any]) -> None:
    first, again = runs["two"], runs["two_again"]
    assert_same_scalars(deterministic(first.scalars), deterministic(again.scalars))
    for name in first.weights:
        torch.testing.assert_close(first.weights[name], again.weights[name], rtol=0, atol=0, msg=name)


def test_another_data_seed_plays_other_episodes(runs: dict[str, Any]) -> None:
    returns = [v for _, v in runs["two"].scalars["rollout/return_mean"]]
    other = [v for _, v in runs["other_seed"].scalars["rollout/return_mean"]]
    assert len(returns) == len(other) == 2
    assert returns != other


def test_print_config(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_cli(
            args=["--config", str(CONFIG), "--model.name_or_path", str(tiny_model_dir), "--print_config"]
        )
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["model"]["name_or_path"] == str(tiny_model_dir)
    assert config["data"]["num_envs"] == yaml.safe_load(CONFIG.read_text())["data"]["num_envs"]
    assert config["data"]["agent"]["class_path"] == "llamagym_pl.agents.BlackjackAgent"
    assert config["checkpoint"]["save_last"] is True


def _class_paths(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "class_path" and isinstance(value, str):
                yield value
            else:
                yield from _class_paths(value)
    elif isinstance(node, list):
        for value in node:
            yield from _class_paths(value)


FIT_CONFIGS = sorted(p for p in EXPERIMENTS.glob("*.yaml") if not p.name.startswith("sweep-"))
SWEEP_SPACES = sorted(EXPERIMENTS.glob("sweep-*.yaml"))  # search spaces, for llamagym_pl.sweep


@pytest.mark.parametrize("space", SWEEP_SPACES, ids=lambda p: p.name)
def test_every_sweep_space_checks_against_its_experiment(space: Path, tiny_model_dir: Path) -> None:
    sweep_space = pytest.importorskip("llamagym_pl.sweep_space")  # the [sweep] extra
    from llamagym_pl.sweep import check_space

    base = EXPERIMENTS / space.name.removeprefix("sweep-")
    check_space(
        sweep_space.load_space(space), ["--config", str(base), "--model.name_or_path", str(tiny_model_dir)]
    )


@pytest.mark.parametrize("config", FIT_CONFIGS, ids=lambda p: p.name)
def test_every_experiment_yaml_parses(
    config: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = yaml.safe_load(config.read_text())
    for class_path in _class_paths(raw):
        module = class_path.rpartition(".")[0]
        try:
            importlib.import_module(module)
        except ImportError as err:  # only an optional package may be missing
            pytest.skip(f"{config.name} needs {module}: {err}")
    monkeypatch.chdir(tmp_path)  # relative log/checkpoint dirs of the YAML land here
    cli = build_cli(
        args=["--config", str(config), "--model.name_or_path", str(tiny_model_dir)], run_fit=False
    )
    assert isinstance(cli.model, PPOModule)
    assert isinstance(cli.datamodule, RolloutDataModule)
    # The YAML's values reach the objects, not just the parser.
    for key, value in raw.get("model", {}).items():
        if key != "name_or_path":
            assert cli.model.hparams[key] == value, f"model.{key}"
    for key, value in raw.get("data", {}).items():
        if key != "agent":
            assert cli.datamodule.hparams[key] == value, f"data.{key}"
    if "max_epochs" in raw.get("trainer", {}):
        assert cli.trainer.max_epochs == raw["trainer"]["max_epochs"]


@pytest.mark.parametrize("policy", ["generate", "score"])
def test_mixed_precision_rollout_is_scored_as_it_trains(
    tiny_model_dir: Path, tmp_path: Path, policy: str
) -> None:
    """Under bf16-mixed the rollout and its old log-probs run in the training step's autocast, so
    the first minibatch (the whole rollout, before any update) has a PPO ratio of exactly 1.
    Scored without autocast, the approx-KL here was 2.6e-8 (score) and 1.8e-7 (generate)."""
    run = fit(
        tiny_model_dir,
        tmp_path,
        *("--data.policy", policy, "--trainer.precision", "bf16-mixed", "--model.num_minibatches", "1"),
        *("--data.num_envs", "8", "--trainer.check_val_every_n_epoch", "5"),
        epochs=1,
    )
    ((_, approx_kl),) = run.scalars["train/approx_kl"]
    assert abs(approx_kl) < 1e-9
    assert run.scalars["train/clipfrac"][0][1] == 0.0
