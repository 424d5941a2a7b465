"""``bench/bench.py --quick`` runs and reports every number the full bench reports (not timed), and
the limit it compares with counts the necessary work (``bench/limit.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the bench scripts are not part of the installed package

from bench.limit import (  # noqa: E402
    Limit,
    bare_generate,
    bare_update,
    encoded_tokens,
    random_padding,
    reply_lengths,
    shared_prefix,
)

ROW_KEYS = {
    "model", "device", "num_envs", "env_steps_per_s", "episodes_per_s", "generated_tokens_per_s",
    "prompt_tokens_per_s", "update_tokens_per_s", "rollout_vs_limit", "rollout_vs_replay",
    "generate_vs_limit", "generate_vs_replay", "update_vs_limit", "update_vs_replay",
    "update_vs_limit_wall", "update_vs_replay_wall", "update_encoded_per_trained_token",
    "rollout_encoded_per_generated_token", "update_padding", "update_padding_random", "split_s",
    "total_s", "peak_rss_mb",
}  # fmt: skip
WORK_KEYS = ("encoded_tokens", "replay_tokens", "head_positions", "replay_head_positions")
SPLIT_KEYS = {"generation", "scoring", "update", "env", "other"}


def test_quick_bench_writes_the_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "LLAMAGYM_PL_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "bench/bench.py", "--quick", "--devices", "cpu", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())

    rows = result["settings"]
    assert [(r["model"], r["num_envs"]) for r in rows] == [("tiny", 1), ("tiny", 8)]
    for row in rows:
        assert ROW_KEYS <= row.keys()
        assert row["split_s"].keys() == SPLIT_KEYS
        assert sum(row["split_s"].values()) == pytest.approx(row["total_s"])
        assert row["rollout_vs_limit"] > 0 and row["update_vs_limit"] > 0
        assert 0.0 <= row["update_padding"] < 1.0 and 0.0 <= row["update_padding_random"] < 1.0
        assert row["update_padding"] <= 0.10 + 1e-9  # the rows packed past the prefix (llamagym_pl.packing)
        for name in ("rollout", "update"):
            tokens, replay, heads, replay_heads = (row[f"{name}_{key}"] for key in WORK_KEYS)
            assert 0 < tokens <= replay and 0 < heads <= replay_heads
        # The update trains every reply token; its replay ran the LM head at every position.
        assert row["update_replay_head_positions"] == row["update_replay_tokens"]
        assert row["update_encoded_per_trained_token"] == pytest.approx(
            row["update_encoded_tokens"] / row["update_head_positions"]
        )
        assert row["env_steps"] >= row["num_envs"] * row["steps_per_env"]  # and the last hands finish
    one, eight = rows
    # One env: no padding and no prefix shared with another row, so the rollout's limit is its
    # replay; eight envs share their system prompt.
    assert one["rollout_encoded_tokens"] == one["rollout_replay_tokens"]
    assert eight["rollout_encoded_tokens"] < eight["rollout_replay_tokens"]
    assert eight["update_encoded_tokens"] < eight["update_replay_tokens"]
    assert [s["num_envs"] for s in result["speedup"]] == [8]  # no 64 row in quick mode: the largest

    fits = result["fit"]
    assert fits["default"]["epochs"] == 2 and fits["default"]["env_steps_per_s"] > 0
    assert len(fits["long"]["rss_mb"]) == fits["long"]["epochs"] == 3
    assert set(result["targets"]) >= {"rollout_vs_limit (num_envs >= 32)", "speedup (64 envs vs 1)"}

    # The table: a header, one line per setting (printed as it finishes and again at the end).
    lines = proc.stdout.splitlines()
    assert sum(line.split()[:3] == ["model", "dev", "envs"] for line in lines) == 2
    assert all(col in lines[1].split() for col in ("roll/lim", "roll/rep", "upd/rep", "enc/trn", "rnd"))
    assert sum(line.split()[:3] == ["tiny", "cpu", "8"] for line in lines) == 2
    assert any(line.startswith("speedup tiny/cpu: 8 envs vs 1") for line in lines)
    assert f"wrote {out}" in lines


def test_shared_prefix_keeps_a_token_of_each_row_and_counts_it_once() -> None:
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 7]]) == 2
    assert shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter row keeps its last token
    assert shared_prefix([[1, 2, 3]]) == 0 and shared_prefix([[1, 2], [3, 4]]) == 0
    assert encoded_tokens([4, 5, 3], prefix=2) == 12 - 2 * 2
    assert encoded_tokens([4], prefix=0) == 4


def test_reply_lengths_end_at_the_first_eos() -> None:
    new = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]])  # eos 2, then generate's padding
    assert reply_lengths(new, 2) == [2, 4, 1]
    assert reply_lengths(new, [7, 2]) == [2, 3, 1]
    assert reply_lengths(new, None) == [4, 4, 4]


def test_random_padding() -> None:
    assert random_padding(torch.tensor([3, 3, 3, 3]), 2, 2) == 0.0
    # One minibatch: every pass pads the three short rows to 4.
    assert random_padding(torch.tensor([1, 1, 1, 4]), 1, 3) == pytest.approx(1 - 7 / 16)


def tiny_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    return LlamaForCausalLM(config)


def test_bare_update_counts_the_necessary_work() -> None:
    lm = tiny_lm()
    # Right padded rows sharing their first 3 tokens; replies (action tokens) at the ends.
    ids = torch.tensor([[1, 4, 5, 6, 7, 8], [1, 4, 5, 9, 10, 0], [1, 4, 5, 11, 0, 0]])
    mask = (ids > 0).long()
    actions = torch.zeros_like(mask, dtype=torch.bool)
    actions[0, 4:6] = actions[1, 4] = actions[2, 3] = True
    limit = Limit.on(torch.device("cpu"))
    bare_update(lm, ids, mask, actions, limit)
    assert (limit.tokens, limit.replay_tokens) == (3 + 3 + 2 + 1, 18)
    assert (limit.heads, limit.replay_heads) == (4, 18)
    assert limit.necessary.seconds <= limit.replay.seconds  # every part scaled by a share <= 1
    assert all(p.grad is None for p in lm.parameters())  # measured only: no gradients left behind


def test_bare_generate_counts_the_necessary_work() -> None:
    lm = tiny_lm()
    ids = torch.tensor([[0, 1, 4, 5, 6], [1, 4, 5, 7, 8]])  # left padded, prefix [1, 4, 5] shared
    limit = Limit.on(torch.device("cpu"))
    bare_generate(lm, ids, (ids > 0).long(), [1, 3], limit)
    # Prefill: 3 shared + 1 + 2 own tokens of 10; two steps for the second row's 2 further tokens.
    assert (limit.tokens, limit.replay_tokens) == (6 + 2, 10 + 2 * 2)
    assert (limit.heads, limit.replay_heads) == (1 + 3, 2 + 2 * 2)
