"""`fit_to_budget`: long episodes drop their oldest turns, never the system prompt or the present."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from llamagym_pl.chat import (
    PromptBudgetError,
    build_messages,
    encode_text,
    fit_to_budget,
    prompt_start,
    render,
)

SYSTEM = "you are an expert blackjack player . answer hit or stick ."
OBS = [f"your sum is {n} . the dealer shows {n - 9} ." for n in range(12, 20)]  # 8 turns
RESP = ["hit", "stick", "hit", "hit", "stick", "hit", "stick", "hit"]


def _length(tokenizer: PreTrainedTokenizerBase, observations: list[str], responses: list[str]) -> int:
    messages = build_messages(tokenizer, SYSTEM, observations, responses)
    prompt = len(observations) > len(responses)
    return len(encode_text(tokenizer, render(tokenizer, messages, add_generation_prompt=prompt)))


@pytest.fixture(params=["tiny_tokenizer", "llama2_tokenizer", "chatml_tokenizer", "nosystem_tokenizer"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    return request.getfixturevalue(request.param)


def test_everything_kept_within_budget(tokenizer: PreTrainedTokenizerBase) -> None:
    full = _length(tokenizer, OBS, RESP[:-1])
    assert fit_to_budget(tokenizer, SYSTEM, OBS, RESP[:-1], full) == (OBS, RESP[:-1])


@pytest.mark.parametrize("keep", [1, 3, 6])
def test_drops_exactly_the_oldest_pairs_that_do_not_fit(
    tokenizer: PreTrainedTokenizerBase, keep: int
) -> None:
    # Budget = the length with `keep` observations: the result keeps exactly those.
    budget = _length(tokenizer, OBS[-keep:], RESP[:-1][len(OBS) - keep :])
    observations, responses = fit_to_budget(tokenizer, SYSTEM, OBS, RESP[:-1], budget)
    assert observations == OBS[-keep:], "the newest turns, in order, with the current observation"
    assert responses == RESP[len(OBS) - keep : len(OBS) - 1]
    assert _length(tokenizer, observations, responses) <= budget
    # One token less and one more pair must go (unless only the present is left).
    if keep > 1:
        fewer = fit_to_budget(tokenizer, SYSTEM, OBS, RESP[:-1], budget - 1)[0]
        assert len(fewer) < keep


def test_system_prompt_is_kept(tokenizer: PreTrainedTokenizerBase) -> None:
    budget = _length(tokenizer, OBS[-2:], RESP[-3:-2])
    observations, responses = fit_to_budget(tokenizer, SYSTEM, OBS, RESP[:-1], budget)
    messages = build_messages(tokenizer, SYSTEM, observations, responses)
    # With or without a system role (Gemma folds it into the first user turn), it is rendered.
    assert SYSTEM in render(tokenizer, messages, add_generation_prompt=True)


def test_finished_episode_keeps_its_last_pair(tokenizer: PreTrainedTokenizerBase) -> None:
    budget = _length(tokenizer, OBS[-1:], RESP[-1:])
    assert fit_to_budget(tokenizer, SYSTEM, OBS, RESP, budget) == (OBS[-1:], RESP[-1:])


def test_too_small_a_budget_names_the_lengths(tokenizer: PreTrainedTokenizerBase) -> None:
    needed = _length(tokenizer, OBS[-1:], [])
    with pytest.raises(
        PromptBudgetError, match=rf"render to {needed} tokens, more than max_prompt_tokens={needed - 1}"
    ) as err:
        fit_to_budget(tokenizer, SYSTEM, OBS, RESP[:-1], needed - 1)
    assert (err.value.needed, err.value.budget) == (needed, needed - 1)
    assert isinstance(err.value, ValueError)


def test_search_from_the_previous_start_finds_the_same_prompts(tokenizer: PreTrainedTokenizerBase) -> None:
    # As a conversation grows turn by turn, each prompt's start never moves back, so the rollout
    # may start each search where the previous one ended.
    budget = _length(tokenizer, OBS[:3], RESP[:2])
    previous = 0
    for t in range(len(OBS)):
        start = prompt_start(tokenizer, SYSTEM, OBS[: t + 1], RESP[:t], budget, min_start=previous)
        assert start == prompt_start(tokenizer, SYSTEM, OBS[: t + 1], RESP[:t], budget)
        assert previous <= start <= t, "the current observation is kept"
        previous = start
    assert previous > 0
    with pytest.raises(ValueError, match="must keep the current observation"):
        prompt_start(tokenizer, SYSTEM, OBS[:2], RESP[:1], budget, min_start=2)


def test_rejects_mismatched_turns(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="observations"):
        fit_to_budget(tiny_tokenizer, SYSTEM, OBS[:2], RESP[:4], 100)
    with pytest.raises(ValueError, match="observations"):
        fit_to_budget(tiny_tokenizer, SYSTEM, [], [], 100)
