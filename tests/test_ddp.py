"""DDP on CPU (gloo): 2 processes through Lightning's own launcher, as a user would run it.

One module-scoped run trains 2 epochs with validation every epoch, then resumes from its
``last.ckpt`` for a third; a second run trains the 3 epochs without stopping. Each rank's
:class:`tests.probes.ddp_probe.RankProbe` dumps what it played and its weights, to compare with
what was logged.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamagym_pl import evaluate
from llamagym_pl.tb import read_scalars

REPO = Path(__file__).resolve().parents[1]
EVAL_EPISODES, EVAL_NUM_ENVS = 8, 4


def _run(module: str, cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, "--config", str(REPO / "experiments/blackjack.yaml"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 or not check, proc.stderr[-3000:]
    return proc


def _fit(run_dir: Path, model_dir: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(
        "llamagym_pl.fit",
        run_dir,
        "--model.name_or_path", str(model_dir),
        "--data.num_envs", "4", "--data.steps_per_env", "4",
        "--data.eval_episodes", str(EVAL_EPISODES), "--data.eval_num_envs", str(EVAL_NUM_ENVS),
        "--model.num_minibatches", "2", "--model.update_epochs", "1",
        # Constant: a linear schedule decays over max_epochs, which the resumed run raises.
        "--model.lr_schedule", "constant",
        "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2",
        "--trainer.check_val_every_n_epoch", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(run_dir / "runs"),
        "--trainer.logger.init_args.version", "v",
        "--checkpoint.dirpath", str(run_dir / "ckpt"),
        "--trainer.callbacks+=tests.probes.ddp_probe.RankProbe",
        f"--trainer.callbacks.out_dir={run_dir / 'probe'}",
        *extra,
        check=check,
    )  # fmt: skip


def _records(run_dir: Path, prefix: str, rank: int) -> list[dict]:
    lines = (run_dir / "probe" / f"{prefix}{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _scalars(run_dir: Path) -> dict[str, list[float]]:
    return {k: [v for _, v in pts] for k, pts in read_scalars(run_dir / "runs/blackjack/v").items()}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """2 epochs, then ``--ckpt_path last`` for a 3rd: the run the tests below inspect."""
    run_dir = tmp_path_factory.mktemp("ddp_resumed")
    _fit(run_dir, tiny_model_dir, "--trainer.max_epochs", "2")
    _fit(run_dir, tiny_model_dir, "--trainer.max_epochs", "3", "--ckpt_path", "last")
    return run_dir


@pytest.mark.slow
def test_ranks_play_distinct_episodes_and_stay_identical(resumed: Path) -> None:
    r0, r1 = _records(resumed, "rank", 0), _records(resumed, "rank", 1)
    # The resumed run went on from epoch 2: it did not replay epochs 0 and 1.
    assert [r["epoch"] for r in r0] == [0, 1, 2] and [r["epoch"] for r in r1] == [0, 1, 2]
    assert [r["world_size"] for r in r0 + r1] == [2] * 6
    for a, b in zip(r0, r1, strict=True):
        # Rank-distinct seeds: the two ranks played different deals.
        assert a["first_observations"] != b["first_observations"]
        # DDP averaged the gradients: replicas stay identical after every optimizer step.
        assert a["checksums"] == pytest.approx(b["checksums"], rel=0, abs=1e-9)
        assert len(a["checksums"]) == 2  # num_minibatches * update_epochs on each rank

    # The logged return is the mean over both ranks' episodes, not rank 0's alone.
    logged = _scalars(resumed)["rollout/return_mean"]
    pooled = [
        (a["return_sum"] + b["return_sum"]) / (a["episodes"] + b["episodes"])
        for a, b in zip(r0, r1, strict=True)
    ]
    assert logged == pytest.approx(pooled, abs=1e-6)


@pytest.mark.slow
def test_evaluation_splits_episodes_across_ranks_and_reports_all_of_them(resumed: Path) -> None:
    e0, e1 = _records(resumed, "eval_rank", 0), _records(resumed, "eval_rank", 1)
    assert [r["epoch"] for r in e0] == [0, 1, 2] and [r["epoch"] for r in e1] == [0, 1, 2]
    scalars = _scalars(resumed)
    for i, (a, b) in enumerate(zip(e0, e1, strict=True)):
        # Each rank played half of data.eval_episodes, on deals no other rank played.
        assert len(a["seeds"]) == len(a["returns"]) == EVAL_EPISODES // 2
        assert len(b["seeds"]) == len(b["returns"]) == EVAL_EPISODES // 2
        assert not set(a["seeds"]) & set(b["seeds"])
        # The logged numbers are over all EVAL_EPISODES episodes of both ranks.
        returns = a["returns"] + b["returns"]
        mean = sum(returns) / len(returns)
        stderr = math.sqrt(sum((r - mean) ** 2 for r in returns) / (len(returns) - 1) / len(returns))
        assert scalars["eval/episodes"][i] == EVAL_EPISODES
        assert scalars["eval/return_mean"][i] == pytest.approx(mean, abs=1e-6)
        assert scalars["eval/return_stderr"][i] == pytest.approx(stderr, abs=1e-6)
        assert scalars["eval/win_rate"][i] == pytest.approx(sum(r > 0 for r in returns) / len(returns))
    # Every evaluation plays the same deals (a fixed seed stream per rank).
    assert all(r["seeds"] == e0[0]["seeds"] for r in e0) and all(r["seeds"] == e1[0]["seeds"] for r in e1)


@pytest.mark.slow
def test_ddp_checkpoint_evaluates_in_one_process_like_rank_0(resumed: Path, tiny_model_dir: Path) -> None:
    """``evaluate`` reads the DDP checkpoint and, given training's DDP flags, evaluates in one
    process (with a note): on rank 0's share of the deals it reproduces rank 0's evaluation."""
    out = resumed / "eval.json"
    proc = _run(
        "llamagym_pl.evaluate",
        resumed,
        "--model.name_or_path", str(tiny_model_dir),
        "--data.eval_num_envs", str(EVAL_NUM_ENVS),
        "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2",
        "--ckpt_path", str(resumed / "ckpt/last.ckpt"),
        "--episodes", str(EVAL_EPISODES // 2),
        "--out", str(out),
    )  # fmt: skip
    assert "note: evaluate plays all episodes in this one process" in proc.stderr
    results = json.loads(out.read_text())
    rank0 = _records(resumed, "eval_rank", 0)[-1]["returns"]  # after epoch 2: last.ckpt's weights
    assert results["episodes"] == len(rank0)
    assert results["return_mean"] == pytest.approx(sum(rank0) / len(rank0), abs=1e-12)


@pytest.mark.slow
def test_resume_from_ddp_checkpoint_continues_like_an_uninterrupted_run(
    resumed: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    _fit(tmp_path, tiny_model_dir, "--trainer.max_epochs", "3")
    for rank in (0, 1):
        assert _records(resumed, "rank", rank) == _records(tmp_path, "rank", rank)
        assert _records(resumed, "eval_rank", rank) == _records(tmp_path, "eval_rank", rank)
    resumed_scalars, straight = _scalars(resumed), _scalars(tmp_path)
    for key in ("rollout/return_mean", "train/policy_loss", "train/value_loss", "eval/return_mean"):
        assert resumed_scalars[key] == straight[key], key


def _kill(rank: int, epoch: int, phase: str, out_dir: Path) -> list[str]:
    """Flags for a real SIGKILL of ``rank`` at ``epoch``'s rollout (3rd env step) or update
    (before minibatch 1), see :class:`tests.probes.fault_probe.SendSignal`."""
    return [
        "--trainer.callbacks+=tests.probes.fault_probe.SendSignal",
        "--trainer.callbacks.signal_name=SIGKILL",
        f"--trainer.callbacks.epoch={epoch}",
        f"--trainer.callbacks.phase={phase}",
        f"--trainer.callbacks.rank={rank}",
        f"--trainer.callbacks.step={3 if phase == 'rollout' else 1}",
        f"--trainer.callbacks.out_dir={out_dir}",
    ]


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (an exited process nobody reaped yet has an empty command line)."""
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except FileNotFoundError:
        return False


def _lost_rank_line(stderr: str, lost: int, survivor: int) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("llamagym_pl.fit: error: ")]
    assert len(lines) == 1, stderr[-3000:]
    assert re.match(
        f"llamagym_pl.fit: error: rank {lost} of 2 was lost \\(its process died or stopped answering: "
        # Rank 0's collective fails, or Lightning's observer of its children sees rank 1 dead first
        f"(Connection (reset|closed) by peer|killed by SIGKILL)\\), so rank {survivor} stopped too; ",
        lines[0],
    ), lines[0]
    assert lines[0].endswith("--ckpt_path last` (the same flags)"), lines[0]
    return lines[0]


@pytest.mark.slow
def test_a_lost_rank_stops_the_other_with_one_line_and_last_resumes_exactly(
    resumed: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Rank 1 is SIGKILLed in the update of epoch 1; on resuming, rank 0 in the rollout of epoch 2
    (rank 1, its child, is left alone); a last resume finishes: what each rank played and its
    weights after every step are those of the uninterrupted run."""
    epochs = ("--trainer.max_epochs", "3")
    began = time.monotonic()
    proc = _fit(tmp_path, tiny_model_dir, *epochs, *_kill(1, 1, "update", tmp_path / "k1"), check=False)
    stopped_after = time.time() - float((tmp_path / "k1" / "signalled").read_text())
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _lost_rank_line(proc.stderr, lost=1, survivor=0)
    config = REPO / "experiments/blackjack.yaml"
    resume = f"resume with `python -m llamagym_pl.fit --config {config} ... --ckpt_path last`"
    assert f"{tmp_path / 'ckpt' / 'last.ckpt'} holds the epochs before it: {resume}" in line
    assert "Traceback" not in proc.stderr
    assert stopped_after < 10, stopped_after  # the survivor stops at its next collective, at once

    # Rank 1 is rank 0's child: the pipes close when it has exited too.
    proc = _fit(
        tmp_path,
        tiny_model_dir,
        *epochs,
        "--ckpt_path",
        "last",
        *_kill(0, 2, "rollout", tmp_path / "k0"),
        check=False,
    )
    stopped_after = max(stopped_after, time.time() - float((tmp_path / "k0" / "signalled").read_text()))
    assert proc.returncode == -signal.SIGKILL
    _lost_rank_line(proc.stderr, lost=0, survivor=1)
    assert "Traceback" not in proc.stderr
    assert not _running(int((tmp_path / "k0" / "pid1").read_text())), "rank 1 still runs"

    _fit(tmp_path, tiny_model_dir, *epochs, "--ckpt_path", "last")
    print(f"survivors stopped {stopped_after:.1f} s after the kill; 3 runs: {time.monotonic() - began:.0f} s")
    for rank in (0, 1):
        assert _records(tmp_path, "rank", rank) == _records(resumed, "rank", rank)
        assert _records(tmp_path, "eval_rank", rank) == _records(resumed, "eval_rank", rank)
    untimed = lambda run: {k: v for k, v in _scalars(run).items() if not k.endswith("_s")}  # noqa: E731
    assert untimed(tmp_path) == untimed(resumed)  # all but wall-clock timings


def _evaluate_error(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    assert isinstance(exit_info.value.code, str), "expected a one-line error"
    return exit_info.value.code


def test_evaluate_refuses_to_run_once_per_launched_process(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun (which sets WORLD_SIZE) every process would play every episode."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = [
        "--config",
        str(REPO / "experiments/blackjack.yaml"),
        "--model.name_or_path",
        str(tiny_model_dir),
    ]
    message = _evaluate_error([*config, "--ckpt_path", str(tmp_path / "last.ckpt")])
    assert message.startswith("llamagym_pl.evaluate: error: evaluate runs in one process")
    assert "start it with plain python" in message


def test_evaluate_names_the_fix_for_a_sharded_checkpoint_directory(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    sharded = tmp_path / "last.ckpt"  # FSDP with state_dict_type: sharded saves a directory
    sharded.mkdir()
    config = [
        "--config",
        str(REPO / "experiments/blackjack.yaml"),
        "--model.name_or_path",
        str(tiny_model_dir),
    ]
    message = _evaluate_error([*config, "--ckpt_path", str(sharded)])
    assert "is a directory" in message
    assert f"lightning.pytorch.utilities.consolidate_checkpoint {sharded}" in message
