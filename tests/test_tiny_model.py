"""The offline tiny model: deterministic build, loadable with Auto classes, cached by name."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from llamagym_pl import tiny_model
from llamagym_pl.actions import GenerateStyle
from llamagym_pl.agents import BlackjackAgent
from llamagym_pl.chat import unknown_words
from llamagym_pl.rollout import RolloutCollector
from llamagym_pl.tiny_model import (
    BUILD_INFO_FILE,
    CACHE_ENV,
    DEFAULT_TINY,
    build_tiny_model,
    build_tiny_tokenizer,
    resolve_model_path,
    tiny_vocab,
)


def test_same_seed_builds_identical_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = build_tiny_model(tmp_path / "again")
    first = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    second = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)
    assert (
        AutoTokenizer.from_pretrained(again).get_vocab()
        == AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()
    )


def test_other_seed_changes_weights_not_vocab(tmp_path: Path, tiny_model_dir: Path) -> None:
    other = build_tiny_model(tmp_path / "other", seed=1)
    a = AutoModelForCausalLM.from_pretrained(tiny_model_dir).model.embed_tokens.weight
    b = AutoModelForCausalLM.from_pretrained(other).model.embed_tokens.weight
    assert not torch.equal(a, b)
    assert (
        AutoTokenizer.from_pretrained(other).get_vocab()
        == AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()
    )


def test_reloads_with_consistent_config(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = model.config
    assert config.model_type == "llama"
    assert config.vocab_size == len(tiny_tokenizer) == len(tiny_vocab())
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    for key in ("bos", "eos", "pad"):
        token_id = getattr(tiny_tokenizer, f"{key}_token_id")
        assert getattr(config, f"{key}_token_id") == token_id
        assert getattr(model.generation_config, f"{key}_token_id") == token_id
    info = json.loads((tiny_model_dir / BUILD_INFO_FILE).read_text())
    assert info["hidden_size"] == 64 and info["vocab_size"] == len(tiny_tokenizer)


def test_word_level_tokenizer(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    assert tiny_tokenizer.decode(tiny_tokenizer("hit", add_special_tokens=False)["input_ids"]) == "hit"
    ids = tiny_tokenizer("Your sum is 14.", add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.convert_ids_to_tokens(ids) == ["your", "sum", "is", "14", "."]
    assert tiny_tokenizer.unk_token_id not in ids
    for token in ("<|system|>", "<|user|>", "<|assistant|>", "<s>", "</s>", "<pad>"):
        assert len(tiny_tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    assert tiny_vocab(["zebra", "hit"])[-1] == "zebra"  # extra words appended, duplicates dropped


def test_chat_template(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "your sum is 14"},
        {"role": "assistant", "content": "hit"},
        {"role": "user", "content": "your sum is 20"},
    ]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s> <|system|> be brief </s> <|user|> your sum is 14 </s> "
        "<|assistant|> hit </s> <|user|> your sum is 20 </s> <|assistant|>"
    )


def test_generate_stops_at_eos(tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompt = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hit or stick"}], tokenize=False, add_generation_prompt=True
    )
    inputs = tiny_tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    eos = tiny_tokenizer.eos_token_id
    # A random model rarely says "</s>"; bias it so that it must, and check generation stops there
    # using only the eos id saved in the model's generation config.
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, sequence_bias={(eos,): 100.0})
    assert out[0, inputs["input_ids"].shape[1] :].tolist() == [eos]
    free = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert free.shape[1] <= inputs["input_ids"].shape[1] + 8


def test_resolve_model_path_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    builds: list[dict] = []
    real_build = tiny_model.build_tiny_model

    def counting_build(out_dir: Path, **kwargs: int) -> Path:
        builds.append(kwargs)
        return real_build(out_dir, **kwargs)

    monkeypatch.setattr(tiny_model, "build_tiny_model", counting_build)
    path = resolve_model_path(DEFAULT_TINY)
    assert Path(path) == tmp_path / "cache" / "tiny"
    assert resolve_model_path(DEFAULT_TINY) == path
    assert builds == [{}]
    AutoModelForCausalLM.from_pretrained(path)

    sized = resolve_model_path("tiny-h32-l1")
    assert builds[-1] == {"hidden_size": 32, "num_layers": 1}
    config = AutoModelForCausalLM.from_pretrained(sized).config
    assert (config.hidden_size, config.num_hidden_layers) == (32, 1)


@pytest.mark.parametrize("name", ["gpt2", "meta-llama/Llama-2-7b-chat-hf", "/models/tiny", "tinyllama"])
def test_resolve_model_path_passes_other_names(name: str) -> None:
    assert resolve_model_path(name) == name


def test_rebuild_replaces_existing_dir_and_cli(tmp_path: Path) -> None:
    out = tmp_path / "m"
    build_tiny_model(out, hidden_size=32, num_heads=2)
    tiny_model.main(["--out", str(out), "--hidden-size", "16", "--num-layers", "1", "--num-heads", "2"])
    info = json.loads((out / BUILD_INFO_FILE).read_text())
    assert (info["hidden_size"], info["num_layers"], info["num_heads"]) == (16, 1, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary dirs left behind


def test_rejects_indivisible_heads(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="divisible"):
        build_tiny_model(tmp_path / "bad", hidden_size=30, num_heads=4)


class GuessAgent(BlackjackAgent):
    """A user's agent whose words the tiny vocabulary lacks ("guess", "number", "lucky")."""

    def get_system_prompt(self) -> str:
        return "Guess my number. Answer hit or stick."

    def format_observation(self, observation) -> str:
        return f"Your lucky sum is {int(observation[0])}."


def test_words_the_tiny_vocabulary_lacks_are_named_once(
    tiny_policy, tiny_tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue #13: a word-level vocabulary silently read a user's unknown words as <unk>."""
    collector = RolloutCollector("Blackjack-v1", None, GuessAgent(), num_envs=2, style=GenerateStyle(1))
    with caplog.at_level(logging.WARNING, logger="llamagym_pl.chat"):
        collector.collect(tiny_policy, tiny_tokenizer, seed=0, epoch=0, steps_per_env=2)
        collector.collect(tiny_policy, tiny_tokenizer, seed=0, epoch=1, steps_per_env=2)
    warnings = [r.getMessage() for r in caplog.records if "cannot tell them apart" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once, not per prompt
    assert "guess, number, lucky" in warnings[0] and "--extra-words guess number lucky" in warnings[0]
    caplog.clear()
    # The fix it names works: a tiny model built with those words reads them.
    with caplog.at_level(logging.WARNING, logger="llamagym_pl.chat"):
        RolloutCollector("Blackjack-v1", None, BlackjackAgent(), num_envs=2, style=GenerateStyle(1)).collect(
            tiny_policy, tiny_tokenizer, seed=0, epoch=0, steps_per_env=2
        )
    assert not [r for r in caplog.records if "cannot tell them apart" in r.getMessage()]
    assert unknown_words(build_tiny_tokenizer(["guess", "number", "lucky"]), ["Guess my lucky number."]) == []
    assert unknown_words(tiny_tokenizer, ["Guess my lucky number."]) == ["guess", "lucky", "number"]
