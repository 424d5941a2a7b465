"""Hyperparameter sweeps (:mod:`llamagym_pl.sweep`), in process, on tiny trials.

Each trial is a 2-epoch fit of 4-8 envs x 4 turns with an 8-episode greedy evaluation after every
epoch (about a second); the module's sweeps share one 3-trial study where they can.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from llamagym_pl import sweep  # noqa: E402  (needs optuna)
from llamagym_pl.fit import build_cli, fit  # noqa: E402
from llamagym_pl.tb import read_scalars  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "blackjack.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PARAMS = {
    "model.learning_rate": {"type": "float", "low": "1e-4", "high": "1e-2", "log": True},
    "model.ent_coef": {"type": "float", "low": 0.0, "high": 0.05},
    "data.num_envs": {"type": "categorical", "choices": [4, 8]},
}


def write_space(path: Path, model_dir: Path, params: dict[str, Any] = PARAMS, **top: Any) -> Path:
    """A space file of tiny trials (2 epochs, evaluated after each) over ``params``."""
    space = {
        "objective": {"metric": "eval/return_mean", "direction": "maximize"},
        "pruner": "none",
        "fixed": {
            "model.name_or_path": str(model_dir),
            "data.steps_per_env": 4,
            "model.num_minibatches": 2,
            "model.update_epochs": 1,
            "trainer.max_epochs": 2,
            "trainer.check_val_every_n_epoch": 1,
            "trainer.enable_progress_bar": False,
            "trainer.enable_model_summary": False,
            "data.eval_episodes": 8,
            "data.eval_num_envs": 4,
        },
        "params": params,
        **top,
    }
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def sweep_argv(space: Path, root: Path, trials: int, *extra: str) -> list[str]:
    db = f"sqlite:///{root / 'study.db'}"
    return ["--config", str(CONFIG), "--space", str(space), "--trials", str(trials)] + [
        "--storage", db, "--out", str(root / "out"), *extra,
    ]  # fmt: skip


def load(root: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'study.db'}")


@pytest.fixture(scope="module")
def study(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 3-trial sweep: its files, and its trials as it left them."""
    root = tmp_path_factory.mktemp("sweep")
    space = write_space(root / "space.yaml", tiny_model_dir)
    done = sweep.main(sweep_argv(space, root, 3))
    return {"root": root, "space": space, "trials": done.get_trials(), "best": done.best_trial}


def test_three_trial_sweep(study: dict[str, Any]) -> None:
    trials, out = study["trials"], study["root"] / "out"
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert len({t.params["model.learning_rate"] for t in trials}) == 3  # TPE sampled each anew
    for t in trials:
        assert 1e-4 <= t.params["model.learning_rate"] <= 1e-2
        assert t.params["data.num_envs"] in (4, 8)
        run = out / f"trial-{t.number}"
        assert t.user_attrs["run_dir"] == str(run)
        assert (run / "checkpoints" / "last.ckpt").is_file()
        # The trial's own fit config, as Lightning saved it, holds the sampled settings.
        config = yaml.safe_load((run / "version_0" / "config.yaml").read_text())
        assert config["model"]["learning_rate"] == t.params["model.learning_rate"]
        assert config["data"]["num_envs"] == t.params["data.num_envs"]
        # The objective is the last greedy evaluation the trial logged; each one was reported.
        logged = [value for _, value in read_scalars(run / "version_0")["eval/return_mean"]]
        assert len(logged) == 2  # after epochs 1 and 2
        assert t.intermediate_values == pytest.approx({1: logged[0], 2: logged[1]})
        assert t.value == pytest.approx(logged[-1])
    assert study["best"].value == max(t.value for t in trials)


def test_best_yaml_trains(study: dict[str, Any]) -> None:
    """best.yaml is a complete fit config: the best trial's settings, run dirs of its own."""
    out, best = study["root"] / "out", study["best"]
    config = yaml.safe_load((out / "best.yaml").read_text())
    assert config["model"]["learning_rate"] == best.params["model.learning_rate"]
    assert config["model"]["ent_coef"] == best.params["model.ent_coef"]
    assert config["data"]["num_envs"] == best.params["data.num_envs"]
    assert config["checkpoint"]["dirpath"] == str(out / "best" / "checkpoints")
    cli = build_cli(["--config", str(out / "best.yaml"), "--trainer.max_epochs", "1"], run_fit=False)
    fit(cli)
    assert (out / "best" / "checkpoints" / "last.ckpt").is_file()
    assert cli.model.hparams.learning_rate == best.params["model.learning_rate"]


def test_rerun_resumes_the_study(study: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    root, space = study["root"], study["space"]
    sweep.main(sweep_argv(space, root, 4))
    trials = load(root, space.stem).get_trials()
    assert len(trials) == 4
    # The first three are the first run's; the new one samples new settings (the sampler's seed
    # moves on with the study), evaluated like the others.
    assert [t.params for t in trials[:3]] == [t.params for t in study["trials"]]
    assert trials[3].params not in [t.params for t in study["trials"]]
    assert trials[3].state == optuna.trial.TrialState.COMPLETE
    table = capsys.readouterr().out
    assert all(f"| {n} " in table for n in range(4)) and "best: trial" in table
    # Already 4 finished: the same command again runs none.
    sweep.main(sweep_argv(space, root, 4))
    assert "none to run" in capsys.readouterr().out
    assert len(load(root, space.stem).get_trials()) == 4


def test_same_seed_same_trial(study: dict[str, Any], tmp_path: Path) -> None:
    """A new study with the same --seed samples the same first trial, which scores the same."""
    first = sweep.main(sweep_argv(study["space"], tmp_path, 1)).trials[0]
    assert first.params == study["trials"][0].params
    assert first.value == study["trials"][0].value


def test_pruned_trial_stops_early(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A threshold no return reaches: the trial is pruned at its first evaluation, after 1 of 3
    epochs (the sweep then has no completed trial, and says so); a 1-epoch trial is not."""
    space = write_space(tmp_path / "space.yaml", tiny_model_dir, pruner={"name": "threshold", "lower": 2.0})
    with pytest.raises(SystemExit, match="no trial of study 'space' completed"):
        sweep.main(sweep_argv(space, tmp_path, 1, "--", "--trainer.max_epochs", "3"))
    (trial,) = load(tmp_path, "space").get_trials()
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [1]
    ckpts = sorted(p.name for p in (tmp_path / "out" / "trial-0" / "checkpoints").iterdir())
    assert ckpts == ["epoch=0-step=2.ckpt", "last.ckpt"]  # the fit stopped after that epoch
    # A trial whose first evaluation is its last is not pruned: stopping there saves nothing.
    sweep.main(sweep_argv(space, tmp_path, 2, "--", "--trainer.max_epochs", "1"))
    assert load(tmp_path, "space").trials[1].state == optuna.trial.TrialState.COMPLETE


def test_failing_trial_is_marked_and_the_sweep_goes_on(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A setting the parser accepts but fit refuses (a negative learning rate): each trial is marked
    FAIL with that one line, and the next trial still runs."""
    params = {"model.learning_rate": {"type": "categorical", "choices": [-1.0]}}
    space = write_space(tmp_path / "space.yaml", tiny_model_dir, params)
    with pytest.raises(SystemExit, match="no trial of study 'space' completed"):
        sweep.main(sweep_argv(space, tmp_path, 2))
    trials = load(tmp_path, "space").get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL] * 2
    assert [t.user_attrs["error"] for t in trials] == ["model.learning_rate=-1.0 must be > 0"] * 2


BROKEN = {
    "unknown key": (
        {"model.learnig_rate": {"type": "float", "low": 1e-4, "high": 1e-2}},
        "model.learnig_rate = 0.0001: unrecognized arguments: --model.learnig_rate 0.0001 "
        "(did you mean 'model.learning_rate'?)",
    ),
    "prefix of a key": (
        {"model.learning_rat": {"type": "float", "low": 1e-4, "high": 1e-2}},
        "unrecognized arguments: --model.learning_rat",
    ),
    "empty range": (
        {"model.ent_coef": {"type": "float", "low": 0.05, "high": 0.05}},
        "model.ent_coef: empty range, low 0.05 must be below high 0.05",
    ),
    "wrong type": (
        {"data.num_envs": {"type": "categorical", "choices": [4, "many"]}},
        "data.num_envs = 'many': Parser key \"data.num_envs\": Expected a <class 'int'>. Got value: many",
    ),
    "log of zero": (
        {"model.ent_coef": {"type": "float", "low": 0, "high": 0.05, "log": True}},
        "model.ent_coef: a log range needs low > 0, got 0",
    ),
    "unknown type": (
        {"model.ent_coef": {"type": "uniform"}},
        "model.ent_coef: expected {type: float|int|categorical",
    ),
    "run dir key": (
        {"checkpoint.dirpath": {"type": "categorical", "choices": ["a"]}},
        "checkpoint.dirpath is set by the sweep",
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_space_is_one_line(
    case: str, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params, message = BROKEN[case]
    space = write_space(tmp_path / "space.yaml", tiny_model_dir, params)
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(sweep_argv(space, tmp_path, 2))
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"llamagym_pl.sweep: error: search space {space}: ")
    assert message in line
    assert not (tmp_path / "study.db").exists()  # checked before any study or trial


def test_broken_objective_and_pruner(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for top, message in (
        (
            {"objective": {"metric": "rollout/return_mean", "direction": "maximize"}},
            "must be a greedy evaluation",
        ),
        (
            {"pruner": {"name": "median", "patience": 3}},
            "pruner: median: MedianPruner.__init__() got an unexpected",
        ),
    ):
        space = write_space(tmp_path / "space.yaml", tiny_model_dir, **top)
        with pytest.raises(SystemExit) as exit_info:
            sweep.main(sweep_argv(space, tmp_path, 2))
        assert exit_info.value.code == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("llamagym_pl.sweep: error: search space") and message in line


def test_wandb_offline_sweep(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--trainer.logger lightning.pytorch.loggers.WandbLogger`` offline, through a 2-trial sweep:
    each trial is its own W&B run (named after the trial) holding its greedy evaluation."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    space = write_space(tmp_path / "space.yaml", tiny_model_dir)
    logger = ["--trainer.logger", "lightning.pytorch.loggers.WandbLogger"]
    done = sweep.main(
        sweep_argv(space, tmp_path, 2, "--", *logger, "--trainer.logger.init_args.project", "t")
    )
    assert [t.state for t in done.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    runs = sorted((tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2  # not one run that both trials logged into
    for n, run in enumerate(runs):
        record = run.read_bytes()  # protobuf records: metric keys and the run's name are plain bytes
        assert b"eval/return_mean" in record and f"trial-{n}".encode() in record
    assert math.isfinite(done.best_value)
