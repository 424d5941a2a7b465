"""``bench/llamagym/side_by_side.py``: the skip line without LlamaGym's venv, the command lines, and
the table and targets of saved results (fake ones: LlamaGym never runs in the test suite)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the bench scripts are not part of the installed package

from bench.llamagym.side_by_side import MODELS, QUICK, command, main, median_run, parse_args, targets  # noqa: E402


def fake_results() -> dict:
    def run(steps_per_s: float, rss: float, busy: float = 0.0) -> dict:
        return {"env_steps_per_s": steps_per_s, "peak_rss_mib": rss, "other_procs_cpu_per_wall": busy}

    return {
        "quick": False,
        "threads": 2,
        "models": {
            "0.66M": {"llamagym": run(10.0, 800), "imperative": run(60.0, 600), "fit": run(120.0, 1200)},
            "58M": {"llamagym": run(0.5, 5000), "imperative": run(1.0, 2000), "fit": run(2.0, 6000, 0.5)},
        },
    }


def test_without_llamagym_one_line_says_how_to_build_it(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "bench/llamagym/side_by_side.py", "--dir", str(tmp_path / "absent")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("LlamaGym side by side skipped: no ")
    assert "bash bench/llamagym/setup.sh" in lines[0]
    assert not (tmp_path / "absent").exists()  # nothing run, nothing written


def test_arguments_default_to_what_setup_builds(tmp_path: Path) -> None:
    args = parse_args(["--dir", str(tmp_path), "--tiny", "/models/tiny"])
    assert args.venv == tmp_path / "venv" and args.small == tmp_path / "small-llama"
    assert args.tiny == Path("/models/tiny") and args.out == tmp_path / "side_by_side.json"
    out = tmp_path / "r.json"
    lg = command("llamagym", MODELS[0], args.tiny, args, out)
    assert lg[0] == str(tmp_path / "venv" / "bin" / "python") and lg[1].endswith("run_llamagym.py")
    assert lg[lg.index("--episodes") + 1] == "300" and lg[lg.index("--model") + 1] == "/models/tiny"
    fit = command("fit", QUICK[0], args.tiny, args, out)
    assert fit[0] == sys.executable and fit[fit.index("--epochs") + 1] == "2"
    assert fit[-4:] == list(QUICK[0].fit_options)  # the quick run's smaller fit


def test_table_and_targets_from_saved_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    saved = tmp_path / "side_by_side.json"
    saved.write_text(json.dumps(fake_results()))
    assert main(["--from-json", str(saved)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("LlamaGym 0.1.1 side by side (2 torch threads")
    assert lines[1].split()[:4] == ["model", "LlamaGym", "RSS", "|"]
    assert lines[2].split() == "0.66M 10.00 800 | 60.00 6.0 600 | 120.00 12.0 1200".split()
    assert lines[3].split()[:2] == ["58M", "0.50"]
    verdicts = {line.split(":")[0]: line.split(": ")[1] for line in lines if line.startswith("target ")}
    assert verdicts == {
        "target fit env steps/s >= 10x LlamaGym's on 0.66M": "met (12.00x)",
        "target fit env steps/s >= 5x LlamaGym's on 58M": "NOT met (4.00x)",
        "target imperative env steps/s >= 5x LlamaGym's on 0.66M": "met (6.00x)",
        "target imperative env steps/s >= 3x LlamaGym's on 58M": "NOT met (2.00x)",
        "target fit peak RSS <= 0.5x LlamaGym's on 58M": "NOT met (1.20x)",
        "target imperative peak RSS <= 0.5x LlamaGym's on 58M": "met (0.40x)",
    }
    assert lines[-1].startswith("warning: other processes used 0.50 cores during fit on 58M")


def test_targets_of_a_quick_run_cover_its_model_only() -> None:
    results = fake_results()
    del results["models"]["58M"]
    assert [t["target"].endswith("0.66M") for t in targets(results)] == [True, True]


def test_several_rounds_report_each_systems_median_run_and_every_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rounds = [
        {"env_steps_per_s": rate, "peak_rss_mib": rss} for rate, rss in ((9.0, 700), (7.0, 900), (8.0, 800))
    ]
    middle = median_run(rounds)
    assert (middle["env_steps_per_s"], middle["peak_rss_mib"]) == (8.0, 800)  # the median run, whole
    assert middle["rounds_env_steps_per_s"] == [9.0, 7.0, 8.0]
    assert median_run(rounds[:2])["env_steps_per_s"] == 7.0  # even count: the lower middle run
    results = fake_results()
    results["models"]["0.66M"]["llamagym"] = middle
    saved = tmp_path / "side_by_side.json"
    saved.write_text(json.dumps(results))
    assert main(["--from-json", str(saved)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[:4] == ["0.66M", "8.00", "800", "|"]
    assert lines[3].split() == "rounds (env steps/s; medians above): llamagym 9.00 7.00 8.00".split()
