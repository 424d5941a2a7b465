"""Real Hugging Face architectures with their chat templates, and how models are found and loaded."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants
from model_helpers import FAMILIES, SYSTEM, build_family_model
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from llamagym_pl import ppo
from llamagym_pl.chat import build_messages, encode_prompts
from llamagym_pl.loading import build_policy, load_causal_lm, load_tokenizer
from llamagym_pl.policy import is_peft
from llamagym_pl.spans import encode_episode

OBS = ["your sum is 14 .", "your sum is 19 .", "your sum is 21 ."]
RESP = ["hit", "stick"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer: PreTrainedTokenizerBase = request.getfixturevalue(FAMILIES[request.param])
    return build_family_model(request.param, tokenizer, tmp_path_factory.mktemp(request.param))


def test_generates_through_the_policy(model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(model_dir))
    policy = build_policy(str(model_dir)).eval()
    conversations = [build_messages(tokenizer, SYSTEM, OBS[: i + 1], RESP[:i]) for i in range(2)]
    ids, mask = encode_prompts(tokenizer, conversations)  # (B, L) left padded
    torch.manual_seed(0)
    out = policy.generate(ids, mask, max_new_tokens=4, do_sample=True, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[0] == 2 and ids.shape[1] < out.shape[1] <= ids.shape[1] + 4
    assert torch.equal(out[:, : ids.shape[1]], ids), "generate must continue the prompt, not rewrite it"


def test_episode_masks_decode_to_the_responses(model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(model_dir))
    enc = encode_episode(tokenizer, SYSTEM, OBS, RESP)
    ids = torch.tensor(enc.input_ids)
    turn_index = torch.tensor(enc.turn_index)
    for turn, response in enumerate(RESP):
        tokens = ids[(turn_index == turn) & torch.tensor(enc.action_mask)]
        assert tokenizer.decode(tokens, skip_special_tokens=True).strip() == response


def test_logprobs_equal_minus_hf_cross_entropy(model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(model_dir))
    policy = build_policy(str(model_dir)).eval()
    ids = torch.tensor([encode_episode(tokenizer, SYSTEM, OBS, RESP).input_ids])  # (1, L)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits, values = policy(ids, mask)  # (1, L, V), (1, L)
        hf_loss = AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=ids, labels=ids).loss
    logprobs = ppo.token_logprobs(logits[:, :-1], ids[:, 1:])  # (1, L - 1)
    torch.testing.assert_close(-logprobs.mean(), hf_loss, rtol=1e-5, atol=1e-5)
    assert values.shape == ids.shape and torch.isfinite(values).all()


def test_lora_all_linear_adapts_every_block_but_not_the_head(model_dir: Path) -> None:
    policy = build_policy(str(model_dir), lora_r=2, lora_alpha=4)
    assert is_peft(policy.lm)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_" in n}
    assert len(adapted) >= 3, f"attention and MLP projections should all be adapted, got {adapted}"
    assert not any("lm_head" in n or "embed" in n or "wte" in n for n in trainable)
    assert {n for n in trainable if ".lora_" not in n} == {
        "value_head.summary.weight",
        "value_head.summary.bias",
    }


# --------------------------------------------------------------------------- finding models
@pytest.mark.parametrize("load", [load_tokenizer, load_causal_lm])
def test_missing_model_fails_fast_offline(load, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(OSError, match=r"'nobody/no-such-model-xyz'.*HF_HUB_OFFLINE=1.*local-dir"):
        load("nobody/no-such-model-xyz")
    assert time.monotonic() - start < 3.0, "must not retry the hub"


def test_missing_model_fails_fast_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(OSError, match=r"'nobody/no-such-model-xyz'.*unreachable"):
        load_causal_lm("nobody/no-such-model-xyz")
    assert time.monotonic() - start < 3.0, "must not retry the hub"


def test_missing_local_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="no such local directory"):
        load_tokenizer(str(tmp_path / "nowhere" / "model"))


def test_tokenizer_without_pad_borrows_eos_and_never_resizes(
    chatml_tokenizer: PreTrainedTokenizerBase, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = build_family_model("qwen3", chatml_tokenizer, tmp_path / "nopad")
    # Remove the pad token from the saved tokenizer, as many base models ship.
    unpadded = load_tokenizer(str(model_dir))
    unpadded.pad_token = None
    unpadded.save_pretrained(model_dir)
    with caplog.at_level(logging.INFO, logger="llamagym_pl.loading"):
        tokenizer = load_tokenizer(str(model_dir))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert len([r for r in caplog.records if "no pad token" in r.getMessage()]) == 1
    assert len(tokenizer) == len(chatml_tokenizer), "no token may be added"
    lm = load_causal_lm(str(model_dir))
    assert lm.get_input_embeddings().weight.shape[0] == len(chatml_tokenizer), "embeddings never resized"
    short, long = (build_messages(tokenizer, SYSTEM, OBS[: n + 1], RESP[:n]) for n in (0, 2))
    ids, mask = encode_prompts(tokenizer, [short, long])  # (2, L): the short prompt is left padded
    assert (ids[0][mask[0] == 0] == tokenizer.eos_token_id).all() and not mask[0].all()


def test_cached_hub_model_loads_offline_and_without_network(tiny_model_dir: Path, tmp_path: Path) -> None:
    # A hub cache laid out as huggingface_hub writes it, holding "someone/tiny-chat".
    snapshot = tmp_path / "hub" / "models--someone--tiny-chat" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    script = (
        "import time; from llamagym_pl.loading import load_causal_lm, load_tokenizer\n"
        "start = time.monotonic(); load_tokenizer('someone/tiny-chat'); load_causal_lm('someone/tiny-chat')\n"
        "print('loaded in', time.monotonic() - start)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub")}
    env.pop("TRANSFORMERS_OFFLINE", None)
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    unreachable = {**env, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    for environment in (offline, unreachable):
        out = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True)
        assert out.returncode == 0 and "loaded in" in out.stdout, out.stderr[-2000:]
        seconds = float(out.stdout.split("loaded in")[-1])
        assert seconds < 5, "a cached model must not wait for the hub (its retries take ~25 s per file)"
