"""FrozenLake: the agent's text and parsing, and ``experiments/frozenlake.yaml`` end to end (it
parses, and a tiny in-process run of it plays whole episodes on prompts within its budget)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from run_args import tiny_run_args
from transformers import PreTrainedTokenizerBase

from llamagym_pl.agents import FrozenLakeAgent
from llamagym_pl.agents.frozenlake import DEFAULT_SYSTEM_PROMPT
from llamagym_pl.chat import build_messages, encode_text, render
from llamagym_pl.fit import build_cli
from llamagym_pl.tiny_model import CACHE_ENV

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "frozenlake.yaml"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may build into, or read from, the user's model cache."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))


@pytest.mark.parametrize(
    ("state", "text"),
    [
        (0, "You are at row 0, column 0 (cell 0)."),
        (6, "You are at row 1, column 2 (cell 6)."),
        (11, "You are at row 2, column 3 (cell 11)."),
        (14, "You are at row 3, column 2 (cell 14)."),
        (15, "You are at row 3, column 3 (cell 15)."),
    ],
)
def test_observation_names_row_and_column(state: int, text: str) -> None:
    assert FrozenLakeAgent().format_observation(state) == text


def test_observation_of_a_wider_map() -> None:
    # The 8x8 map: cell 19 is row 2, column 3.
    assert FrozenLakeAgent(ncol=8).format_observation(19) == "You are at row 2, column 3 (cell 19)."


@pytest.mark.parametrize(
    ("reply", "action"),
    [("left", 0), ("down", 1), ("right", 2), ("up", 3), ("Go UP, then left.", 3), (" Right ", 2)],
)
def test_extract_action_reads_the_first_direction(reply: str, action: int) -> None:
    assert FrozenLakeAgent().extract_action(reply) == action


@pytest.mark.parametrize("reply", ["", "north", "stay here", "upward"])
def test_a_reply_without_a_direction_raises_naming_it(reply: str) -> None:
    with pytest.raises(ValueError, match=repr(reply)):
        FrozenLakeAgent().extract_action(reply)


def test_action_names_follow_the_env_action_order() -> None:
    agent = FrozenLakeAgent()
    assert [agent.extract_action(name) for name in agent.action_names] == [0, 1, 2, 3]


def test_system_prompt_default_and_override() -> None:
    assert FrozenLakeAgent().get_system_prompt() == DEFAULT_SYSTEM_PROMPT
    assert FrozenLakeAgent(system_prompt="").get_system_prompt() == ""
    with pytest.raises(ValueError, match="ncol=0"):
        FrozenLakeAgent(ncol=0)


def test_yaml_prints_its_config(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_cli(
            args=["--config", str(CONFIG), "--model.name_or_path", str(tiny_model_dir), "--print_config"]
        )
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    data = config["data"]
    assert data["env_id"] == "FrozenLake-v1"
    assert data["env_kwargs"] == {"map_name": "4x4", "is_slippery": True}
    assert data["policy"] == "score"
    assert data["agent"]["class_path"] == "llamagym_pl.agents.FrozenLakeAgent"
    assert data["max_episode_steps"] is None  # the env's own 100-step TimeLimit


def prompt_length(
    tokenizer: PreTrainedTokenizerBase, system: str, observations: list[str], responses: list[str]
) -> int:
    messages = build_messages(tokenizer, system, observations, responses)
    return len(encode_text(tokenizer, render(tokenizer, messages, add_generation_prompt=True)))


def test_tiny_fit_plays_whole_episodes_within_the_prompt_budget(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = tiny_run_args(
        *(CONFIG, tiny_model_dir, tmp_path, "--data.steps_per_env", "24"),
        *("--trainer.check_val_every_n_epoch", "2", "--data.eval_episodes", "4"),
        epochs=2,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: a second thread only waits for a busy core
    try:
        cli = build_cli(args=args)
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    budget = cli.datamodule.hparams.max_prompt_tokens
    assert budget is not None
    tokenizer, stats = cli.model.tokenizer, cli.datamodule.rollout.stats
    episodes = stats.episodes
    assert any(ep.terminated for ep in episodes), "a random walk of 24 steps ends in a hole or the goal"
    for ep in episodes:
        assert ep.env_return in (0.0, 1.0)
        assert set(ep.responses) <= set(FrozenLakeAgent.action_names)
        for t, start in enumerate(ep.prompt_start[: ep.num_turns]):
            n = prompt_length(
                tokenizer, ep.system_prompt, ep.observations[start : t + 1], ep.responses[start:t]
            )
            assert n <= budget
        # Every turn dropped the turns before it: the prompt is the current position only.
        assert ep.prompt_start[: ep.num_turns] == list(range(ep.num_turns))
    assert any(ep.num_turns > 1 for ep in episodes)
    assert cli.trainer.callback_metrics["eval/episodes"] == 4


class _Moves(FrozenLakeAgent):
    action_names = ["move", "move left", "C++"]


@pytest.mark.parametrize(
    ("reply", "action"), [("Move left now", 1), ("move, then move left", 0), ("I'd say c++.", 2), ("MOVE", 0)]
)
def test_first_action_name_takes_whole_names_the_longest_where_they_overlap(reply: str, action: int) -> None:
    assert _Moves().first_action_name(reply) == action


def test_first_action_name_without_action_names_says_so() -> None:
    agent = FrozenLakeAgent()
    agent.action_names = None
    with pytest.raises(ValueError, match="action_names is not set"):
        agent.first_action_name("left")
