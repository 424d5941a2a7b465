"""The GPU check (issue #15) without a GPU: its dry run end to end, its failure without CUDA, and
the bounds it divides by (``bench/gpu_limits.py``) against hand-computed values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.gpu_check import check_row, junit_tests, run_logged  # noqa: E402
from bench.gpu_limits import (  # noqa: E402
    ModelWork,
    decode_bytes,
    forward_flops,
    model_work,
    resolve_peaks,
    spec_for,
    train_flops,
)
from llamagym_pl.loading import build_policy  # noqa: E402
from llamagym_pl.policy import PolicyWithValueHead  # noqa: E402
from llamagym_pl.tiny_model import tiny_vocab  # noqa: E402

RATIOS = {"decode_vs_hbm_bound", "prepare_mfu", "update_mfu"}


def _check(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    cmd = ["bash", str(ROOT / "bench/gpu_check.sh"), "--out", str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # two subprocesses: the bench row and the gpu tests' collection, ~30 s
def test_dry_run_writes_the_json_and_the_report(tmp_path: Path) -> None:
    proc = _check(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] and result["ok"] and result["failed"] == []
    assert {"commit", "started", "wall_s", "env", "parts"} <= result.keys()
    assert result["env"]["torch"] == torch.__version__

    row = result["parts"]["bench_row"]
    assert row["ok"] and row["complete"] and row["problems"] == []
    assert row["ratios"].keys() == RATIOS and all(v > 0 for v in row["ratios"].values())
    assert "DRY-RUN" in row["peaks"]["source"]  # stand-ins, labelled as such
    assert row["rollout"]["decode_tokens"] > 0 and row["rollout"]["hbm_bound_tokens_per_s"] > 0
    assert row["update"]["steps"] == 4 and row["update"]["losses_finite"]  # 2 epochs x 2 minibatches
    assert row["memory"]["peak_mb"] > 0 and row["memory"]["source"] == "peak RSS (CPU)"
    assert row["model"]["num_kv_heads"] < row["model"]["num_heads"]  # grouped-query attention, as Qwen2.5

    tests = result["parts"]["pytest_gpu"]
    assert tests["ok"] and "--collect-only" in tests["command"]
    assert (
        "tests/test_fsdp_gpu.py::test_fsdp_on_one_gpu_checkpoints_evaluates_and_resumes" in tests["collected"]
    )

    report = (tmp_path / "gpu_check.txt").read_text()
    assert report.startswith("llamagym_pl GPU check (issue #15): DRY RUN")
    assert "decode_vs_hbm_bound = " in report and "update_mfu = " in report
    assert report.splitlines()[-1] == "RESULT: PASS"
    assert report in proc.stdout  # printed too
    assert {"bench_row.log", "bench_row.json", "pytest_gpu.log"} <= {p.name for p in tmp_path.iterdir()}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA this would run the real check")
def test_without_cuda_the_check_fails_and_names_its_parts(tmp_path: Path) -> None:
    proc = _check(tmp_path)
    assert proc.returncode == 1
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not result["ok"] and result["failed"] == ["bench_row", "pytest_gpu"]
    assert "no CUDA device visible" in result["parts"]["bench_row"]["error"]
    assert "RESULT: FAIL: bench_row, pytest_gpu" in proc.stdout


# ----------------------------------------------------------------------------- bounds
@pytest.mark.parametrize(
    "name, label",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200 SXM"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"),
        ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"),
        ("NVIDIA A100-PCIE-40GB", "A100 40GB"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA GH200 480GB", None),  # its HBM depends on the model: the device properties decide
    ],
)
def test_device_names_find_their_spec_sheet(name: str, label: str | None) -> None:
    spec = spec_for(name)
    assert (spec.label if spec else None) == label


H100_PROPERTIES = {
    "sms": 132,
    "memory_gb": 85.0,
    "capability": 90,
    "clock_khz": 1_980_000,
    "mem_clock_khz": 2_619_000,
    "bus_bits": 5120,
}


def test_peaks_from_the_sheet_a_mig_slice_the_properties_and_the_flags() -> None:
    h100 = resolve_peaks("NVIDIA H100 80GB HBM3", H100_PROPERTIES)
    assert (h100.bandwidth_gbs, h100.bf16_tflops) == (3350, 989) and h100.source == "spec sheet: H100 SXM"
    # The device properties' own estimate rides along: SMs x FMA/cycle x 2 x boost clock; and double
    # data rate x the bus width in bytes x the memory clock.
    assert h100.properties["bf16_tflops"] == pytest.approx(132 * 2048 * 2 * 1.98e9 / 1e12)
    assert h100.properties["bandwidth_gbs"] == pytest.approx(2 * 5120 / 8 * 2.619e9 / 1e9)
    # A MIG slice: its share of the SMs (compute) and of the memory (bandwidth).
    mig = resolve_peaks(
        "NVIDIA H100 80GB HBM3 MIG 3g.40gb", {**H100_PROPERTIES, "sms": 60, "memory_gb": 40.0}
    )
    assert mig.bf16_tflops == pytest.approx(989 * 60 / 132) and mig.bandwidth_gbs == pytest.approx(3350 / 2)
    unknown = resolve_peaks("NVIDIA Some Future GPU", H100_PROPERTIES)
    assert unknown.bf16_tflops == h100.properties["bf16_tflops"] and "device properties" in unknown.source
    flagged = resolve_peaks("NVIDIA H200", H100_PROPERTIES, bandwidth_override=4000.0)
    assert (flagged.bandwidth_gbs, flagged.bf16_tflops) == (
        4000.0,
        989,
    ) and "--bandwidth-gbs" in flagged.source
    with pytest.raises(ValueError, match="--peak-tflops"):  # Turing: no FMA rate in the table
        resolve_peaks("NVIDIA T4", {**H100_PROPERTIES, "capability": 75})


WORK = ModelWork(
    num_layers=2,
    attn_width=8,
    decode_weight_bytes=1000,
    kv_bytes_per_token=10,
    matmul_frozen=100,
    matmul_trainable=10,
)


def test_decode_bytes_read_the_weights_and_the_growing_cache_every_step() -> None:
    # Batch 3, prompt 4, 2 steps: step 1 attends 5 positions, step 2 attends 6.
    assert decode_bytes(WORK, batch=3, prompt_len=4, steps=2) == (1000 + 3 * 5 * 10) + (1000 + 3 * 6 * 10)


def test_flops_of_a_forward_and_of_a_lora_step() -> None:
    lengths = [3, 1]  # 4 tokens; attention 4 x layers x width x sum(L^2) = 4 * 2 * 8 * 10 = 640
    assert forward_flops(WORK, lengths) == 2 * 110 * 4 + 640
    # Forward 2NT, activation gradients 2NT, weight gradients of the trainable weights only.
    assert train_flops(WORK, lengths) == (4 * 110 + 2 * 10) * 4 + 3 * 640
    full = ModelWork(2, 8, 1000, 10, matmul_frozen=0, matmul_trainable=110)
    assert train_flops(full, lengths) == 6 * 110 * 4 + 3 * 640  # the familiar 6NT


def test_model_work_of_qwen25_05b_shapes() -> None:
    config = Qwen2Config(
        vocab_size=151_936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):  # shapes only, no memory
        lm = Qwen2ForCausalLM(config)
    lm.requires_grad_(False)
    work = model_work(PolicyWithValueHead(lm), act_bytes=2)
    # Per layer: q and o 896x896, k and v 896x128, gate/up/down 896x4864; the tied output layer.
    per_layer = 2 * 896 * 896 + 2 * 896 * 128 + 3 * 896 * 4864
    assert work.matmul_frozen == 24 * per_layer + 151_936 * 896 == 493_961_216
    assert work.matmul_trainable == 896  # the value head
    assert work.decode_weight_bytes == 2 * 494_032_768  # every weight once (Qwen2.5-0.5B's count)
    assert work.kv_bytes_per_token == 2 * 24 * 2 * 64 * 2  # K and V, 24 layers, 2 KV heads of 64, bf16
    assert work.attn_width == 896


def test_model_work_counts_lora_adapters_as_trainable(tiny_model_dir: Path) -> None:
    policy = build_policy(str(tiny_model_dir), lora_r=4)
    work = model_work(policy, act_bytes=4)
    # The tiny Llama: hidden 64, MLP 256, 2 layers, 4 heads without GQA, the output layer tied.
    lora = 2 * (4 * (64 + 64) * 4 + 3 * (64 + 256) * 4)  # A and B of q, k, v, o; gate, up, down
    assert work.matmul_trainable == lora + 64  # and the value head
    assert work.matmul_frozen == 2 * (4 * 64 * 64 + 3 * 64 * 256) + len(tiny_vocab()) * 64
    assert work.kv_bytes_per_token == 2 * 2 * 64 * 4


# ----------------------------------------------------------------------------- verdicts
def _row(decode_vs_hbm_bound: float, update_mfu: float) -> dict:
    return {
        "rollout": {"decode_tokens": 100},
        "update": {"losses_finite": True},
        "peaks": {"bandwidth_gbs": 3350.0, "bf16_tflops": 989.0, "source": "spec sheet: H100 SXM"},
        "ratios": {"decode_vs_hbm_bound": decode_vs_hbm_bound, "prepare_mfu": 0.3, "update_mfu": update_mfu},
    }


def test_a_ratio_above_its_bound_fails_the_row_but_only_notes_a_dry_run() -> None:
    assert check_row(_row(0.2, 0.4), dry_run=False) == ([], [])
    problems, notes = check_row(_row(1.3, 0.4), dry_run=False)
    assert notes == [] and len(problems) == 1 and "--bandwidth-gbs" in problems[0]
    problems, notes = check_row(_row(0.2, 2.0), dry_run=True)
    assert problems == [] and len(notes) == 1 and "--peak-tflops" in notes[0]


def test_junit_outcomes(tmp_path: Path) -> None:
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_fsdp_gpu" name="test_a" time="12.5"/>'
        '<testcase classname="tests.test_fsdp_gpu" name="test_b" time="0.1">'
        '<skipped type="pytest.skip" message="needs 2 GPUs"/></testcase>'
        '<testcase classname="tests.test_fsdp_gpu" name="test_c" time="3">'
        '<failure message="boom"/></testcase>'
        "</testsuite></testsuites>"
    )
    tests = junit_tests(xml)
    assert [(t["id"], t["outcome"], t["message"]) for t in tests] == [
        ("tests/test_fsdp_gpu.py::test_a", "passed", ""),
        ("tests/test_fsdp_gpu.py::test_b", "skipped", "needs 2 GPUs"),
        ("tests/test_fsdp_gpu.py::test_c", "failed", "boom"),
    ]
    assert tests[0]["seconds"] == 12.5


def _alive(pid: int) -> bool:
    """Running (a zombie, killed but not yet reaped by a PID 1 that may never reap, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_a_part_past_its_time_limit_is_killed_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    cmd = ["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"]  # a child, as pytest's fit runs
    rc, seconds = run_logged(cmd, tmp_path / "log", timeout=1.0)
    assert rc is None and seconds < 30
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), f"the part's child process {child} outlived the part"
