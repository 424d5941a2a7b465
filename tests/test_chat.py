"""Action masks and value positions are right for several chat templates."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llamagym_pl.chat import build_messages, encode_prompts, encode_text, render, supports_system_role
from llamagym_pl.spans import encode_episode

SYSTEM = "you are an expert player."
OBSERVATIONS = ["your sum is 14.", "your sum is 17.", "your sum is 20."]
RESPONSES = ["hit", "hit again", "stick"]
NEXT_OBSERVATION = "your sum is 21."


@dataclass(frozen=True)
class Case:
    fixture: str
    turn_texts: tuple[str, ...]  # decoded action tokens of each turn: the reply + end of turn
    prompt_end: str  # the token right before each reply: the end of the generation prompt
    system_role: bool


CASES = {
    "tiny": Case("tiny_tokenizer", ("hit </s>", "hit again </s>", "stick </s>"), "<|assistant|>", True),
    "llama2": Case("llama2_tokenizer", (" hit </s>", " hit again </s>", " stick </s>"), "]", True),
    "chatml": Case(
        "chatml_tokenizer", ("hit<|im_end|>", "hit again<|im_end|>", "stick<|im_end|>"), "\n", True
    ),
    "nosystem": Case(
        "nosystem_tokenizer",
        ("hit<end_of_turn>", "hit again<end_of_turn>", "stick<end_of_turn>"),
        "\n",
        False,
    ),
}


@pytest.fixture(params=list(CASES))
def case(request: pytest.FixtureRequest) -> tuple[Case, PreTrainedTokenizerBase]:
    spec = CASES[request.param]
    return spec, request.getfixturevalue(spec.fixture)


def _turn_tokens(tokenizer: PreTrainedTokenizerBase, ids: list[int], turn_index: list[int], turn: int) -> str:
    return tokenizer.decode([i for i, t in zip(ids, turn_index, strict=True) if t == turn])


@pytest.mark.parametrize("bootstrap", [False, True])
def test_action_tokens_are_the_replies(case: tuple[Case, PreTrainedTokenizerBase], bootstrap: bool) -> None:
    spec, tokenizer = case
    observations = OBSERVATIONS + [NEXT_OBSERVATION] if bootstrap else OBSERVATIONS
    episode = encode_episode(tokenizer, SYSTEM, observations, RESPONSES)
    ids = episode.input_ids
    assert len(episode.action_mask) == len(episode.turn_index) == len(ids)
    assert episode.action_mask == [t >= 0 for t in episode.turn_index]
    for turn, expected in enumerate(spec.turn_texts):
        assert _turn_tokens(tokenizer, ids, episode.turn_index, turn) == expected
        positions = [i for i, t in enumerate(episode.turn_index) if t == turn]
        assert positions == list(range(positions[0], positions[-1] + 1))  # one contiguous span
        assert episode.value_positions[turn] == positions[0] - 1
        assert tokenizer.convert_ids_to_tokens(ids[episode.value_positions[turn]]) == spec.prompt_end
    # The whole episode is exactly the rendered conversation.
    messages = build_messages(tokenizer, SYSTEM, observations, RESPONSES)
    assert ids == encode_text(tokenizer, render(tokenizer, messages, add_generation_prompt=bootstrap))
    if bootstrap:
        assert episode.bootstrap_position == len(ids) - 1
        assert tokenizer.convert_ids_to_tokens(ids[-1]) == spec.prompt_end
        assert not episode.action_mask[-1]
    else:
        assert episode.bootstrap_position is None


def test_system_prompt_placement(case: tuple[Case, PreTrainedTokenizerBase]) -> None:
    spec, tokenizer = case
    assert supports_system_role(tokenizer) is spec.system_role
    messages = build_messages(tokenizer, SYSTEM, OBSERVATIONS[:1], [])
    if spec.system_role:
        assert messages[0] == {"role": "system", "content": SYSTEM}
        assert messages[1] == {"role": "user", "content": OBSERVATIONS[0]}
    else:
        assert messages == [{"role": "user", "content": f"{SYSTEM}\n\n{OBSERVATIONS[0]}"}]
    assert SYSTEM in render(tokenizer, messages, add_generation_prompt=True)
    assert build_messages(tokenizer, None, OBSERVATIONS[:1], []) == [
        {"role": "user", "content": OBSERVATIONS[0]}
    ]


def test_nosystem_folds_system_into_first_user_turn(nosystem_tokenizer: PreTrainedTokenizerBase) -> None:
    episode = encode_episode(nosystem_tokenizer, SYSTEM, OBSERVATIONS[:2], RESPONSES[:1])
    text = nosystem_tokenizer.decode(episode.input_ids)
    assert text == (
        f"<bos><start_of_turn>user\n{SYSTEM}\n\n{OBSERVATIONS[0]}<end_of_turn>\n"
        f"<start_of_turn>model\nhit<end_of_turn>\n"
        f"<start_of_turn>user\n{OBSERVATIONS[1]}<end_of_turn>\n<start_of_turn>model\n"
    )


def test_system_role_detection_catches_silent_drop(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert supports_system_role(tokenizer)
    # A template that skips system messages without complaint; the cache must notice the change.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'system' %}"
        "{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s> ' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    assert not supports_system_role(tokenizer)
    assert build_messages(tokenizer, "be brief", ["hi"], []) == [
        {"role": "user", "content": "be brief\n\nhi"}
    ]


def test_prefix_unstable_template_is_refused(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # Renders the last user message differently, so a prompt is not a prefix of the full episode.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.last and m['role'] == 'user' %}{{ 'last ' }}{% endif %}"
        "{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s> ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    with pytest.raises(ValueError, match="not prefix-stable"):
        encode_episode(tokenizer, None, OBSERVATIONS[:2], RESPONSES[:2])


def test_missing_chat_template_is_a_clear_error(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match=r"no chat template.*tokenizer\.chat_template"):
        encode_episode(tokenizer, None, OBSERVATIONS[:1], RESPONSES[:1])
    with pytest.raises(ValueError, match=re.escape(str(tiny_model_dir))):
        render(tokenizer, [{"role": "user", "content": "hi"}], add_generation_prompt=True)


def test_response_count_is_checked(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="responses"):
        build_messages(tiny_tokenizer, None, OBSERVATIONS[:1], RESPONSES[:3])
    with pytest.raises(ValueError, match="at least one observation"):
        build_messages(tiny_tokenizer, None, [], [])


def test_encode_text_adds_no_second_bos(llama2_tokenizer: PreTrainedTokenizerBase) -> None:
    messages = build_messages(llama2_tokenizer, SYSTEM, OBSERVATIONS[:1], [])
    ids = encode_text(llama2_tokenizer, render(llama2_tokenizer, messages, add_generation_prompt=True))
    assert ids[0] == llama2_tokenizer.bos_token_id and ids[1] != llama2_tokenizer.bos_token_id


def test_encode_prompts_left_pads(case: tuple[Case, PreTrainedTokenizerBase]) -> None:
    _, tokenizer = case
    conversations = [
        build_messages(tokenizer, SYSTEM, OBSERVATIONS[:1], []),
        build_messages(tokenizer, SYSTEM, OBSERVATIONS, RESPONSES[:2]),
    ]
    input_ids, attention_mask = encode_prompts(tokenizer, conversations)
    assert input_ids.dtype == attention_mask.dtype == torch.long
    assert input_ids.shape == attention_mask.shape and input_ids.shape[0] == 2
    assert bool(attention_mask[:, -1].all())
    for row, messages in enumerate(conversations):
        expected = encode_text(tokenizer, render(tokenizer, messages, add_generation_prompt=True))
        pad = input_ids.shape[1] - len(expected)
        assert input_ids[row, pad:].tolist() == expected
        assert attention_mask[row].tolist() == [0] * pad + [1] * len(expected)
        assert (input_ids[row, :pad] == tokenizer.pad_token_id).all()
    assert attention_mask[0, 0] == 0  # the shorter prompt really was padded
