"""TextWorld: the Gymnasium adapter's step semantics, the agent's text, the tiny-textworld vocabulary
and short in-process training runs on one generated game (made once, into a temporary cache)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from run_args import tiny_run_args
from transformers import AutoTokenizer

pytest.importorskip("textworld", reason="TextWorld is optional: pip install -e '.[textworld]'")

from llamagym_pl import evaluate  # noqa: E402 - after the skip: these need textworld
from llamagym_pl.agents.textworld import TextWorldAgent  # noqa: E402
from llamagym_pl.envs import TEXTWORLD_ID  # noqa: E402
from llamagym_pl.envs.textworld import META_REPLY, is_meta_command, make_game  # noqa: E402
from llamagym_pl.envs.textworld_words import WORDS  # noqa: E402
from llamagym_pl.episode import sample_space  # noqa: E402
from llamagym_pl.fit import build_cli  # noqa: E402
from llamagym_pl.tb import read_scalars  # noqa: E402
from llamagym_pl.tiny_model import CACHE_ENV, resolve_model_path, tiny_vocab  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "textworld.yaml"
GAME = {"seed": 1, "world_size": 2, "nb_objects": 4, "quest_length": 2}  # the YAML's game


@pytest.fixture(scope="session")
def tw_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the game (made once per session) and the tiny-textworld model."""
    cache = tmp_path_factory.mktemp("tw_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(cache))
        make_game(**GAME)
        resolve_model_path("tiny-textworld")
    return cache


@pytest.fixture(autouse=True)
def _use_tw_cache(tw_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tw_cache))


def make(**kwargs) -> gym.Env:
    return gym.make(TEXTWORLD_ID, **{**GAME, **kwargs})


@pytest.fixture
def env() -> Iterator[gym.Env]:
    env = make(max_episode_steps=10)
    yield env
    env.close()


def test_reset_returns_text_and_admissible_commands(env: gym.Env) -> None:
    obs, info = env.reset(seed=0)
    assert isinstance(obs, str) and "$$$$" in obs  # TextWorld's banner: the agent strips it
    assert env.observation_space.contains(obs)
    commands = info["admissible_commands"]
    assert commands and all(isinstance(c, str) and env.action_space.contains(c) for c in commands)
    assert info["won"] is False and info["lost"] is False and info["score"] == 0
    assert info["max_score"] >= 1
    assert info["policy_commands"][0] in commands


def test_walkthrough_wins_with_score_delta_rewards(env: gym.Env) -> None:
    _, info = env.reset(seed=0)
    walkthrough = info["policy_commands"]
    score = info["score"]
    for t, command in enumerate(walkthrough):
        _, reward, terminated, truncated, info = env.step(command)
        assert reward == info["score"] - score  # TextWorld's score is cumulative; rewards are its steps
        score = info["score"]
        last = t == len(walkthrough) - 1
        assert terminated is last and truncated is False
    assert info["won"] is True and score == info["max_score"] > 0


def test_useless_command_gives_no_reward(env: gym.Env) -> None:
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step("look")
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert info["admissible_commands"]


def test_time_limit_truncates_without_terminating() -> None:
    assert gym.spec(TEXTWORLD_ID).max_episode_steps == 50
    env = make(max_episode_steps=3)
    env.reset(seed=0)
    flags = [env.step("look")[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]
    env.close()


def test_meta_commands_never_reach_the_game(env: gym.Env) -> None:
    _, info = env.reset(seed=0)
    for command in ("quit", "restart", "undo"):  # would ask "Are you sure?" or rewind the score
        obs, reward, terminated, _, after = env.step(command)
        assert (obs, reward, terminated) == (META_REPLY, 0.0, False)
        assert after["admissible_commands"] == info["admissible_commands"]
    rewards = [env.step(c)[1] for c in info["policy_commands"]]
    assert sum(rewards) == info["max_score"]
    for command in ("Q", "look. quit", "look then restart", "  save game"):
        assert is_meta_command(command), command
    for command in ("take type Q keycard", "examine quilt", "look", "go south"):
        assert not is_meta_command(command), command


def test_seeded_games_and_episodes_are_reproducible(tw_cache: Path) -> None:
    def play(env_seed: int) -> list:
        env = make(max_episode_steps=6)
        obs, info = env.reset(seed=env_seed)
        rng = np.random.default_rng(env_seed)
        trace: list = [obs]
        for _ in range(6):
            step = env.step(str(rng.choice(info["admissible_commands"])))
            info = step[4]
            trace.append(step[:4])
            if step[2] or step[3]:
                break
        env.close()
        return trace

    assert play(3) == play(3)
    games = tw_cache / "tw_games"
    path = games / "custom-ws2-no4-ql2-seed1.z8"
    mtime = path.stat().st_mtime_ns
    assert make_game(**GAME) == path and path.stat().st_mtime_ns == mtime  # made once, then reused
    assert not [p for p in games.iterdir() if p.name.startswith(".")]  # no temporary folders left
    other = make(seed=2)
    assert other.reset(seed=0)[1]["objective"] != make().reset(seed=0)[1]["objective"]


def test_action_space_samples_game_commands(env: gym.Env) -> None:
    space = env.action_space
    space.seed(0)
    first = [space.sample() for _ in range(5)]
    space.seed(0)
    assert [space.sample() for _ in range(5)] == first
    assert set(first) <= set(space.commands)
    assert not space.contains("") and not space.contains("go north\nquit")
    # The rollout's random fallback for an invalid reply plays one of the game's commands.
    assert sample_space(space, np.random.default_rng(0)) in space.commands


def test_agent_strips_banner_prompt_and_whitespace(env: gym.Env) -> None:
    agent = TextWorldAgent()
    obs, info = env.reset(seed=0)
    text = agent.format_observation(obs)
    assert text.startswith(" ".join(info["objective"].split()))
    assert "$$" not in text and "\n" not in text and "  " not in text
    assert not text.endswith(("0/1", ">")) and "=-0/" not in text  # no prompt, no status line
    room = agent.format_observation(env.step(info["policy_commands"][0])[0])
    assert room.startswith("-= ") and not room.endswith(">")


def test_agent_extracts_the_first_line() -> None:
    agent = TextWorldAgent()
    assert agent.extract_action("  Go south \nand then close it") == "Go south"
    for empty in ("", " \n \n"):
        with pytest.raises(ValueError, match="no command"):
            agent.extract_action(empty)


def test_tiny_textworld_vocabulary_covers_the_game(tw_cache: Path, env: gym.Env) -> None:
    assert len(set(WORDS)) == len(WORDS) and not set(WORDS) & set(tiny_vocab())
    assert tiny_vocab(WORDS)[: len(tiny_vocab())] == tiny_vocab()  # tiny's token ids unchanged
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("tiny-textworld"))
    assert resolve_model_path("tiny-textworld") == str(tw_cache / "tiny-textworld")
    agent = TextWorldAgent()
    obs, info = env.reset(seed=0)
    texts = [agent.get_system_prompt(), agent.format_observation(obs), *info["admissible_commands"]]
    for command in info["policy_commands"]:
        obs, *_, info = env.step(command)
        texts += [agent.format_observation(obs), *info["admissible_commands"]]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text


@pytest.mark.parametrize("policy", ["score", "generate"])
def test_fit_and_evaluate_in_process(policy: str, tw_cache: Path, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on a shared CPU (see tests/test_fit.py)
    try:
        args = tiny_run_args(
            *(CONFIG, None, tmp_path, "--data.policy", policy, "--data.max_new_tokens", "4"),
            *("--data.num_envs", "2", "--data.steps_per_env", "3", "--data.max_episode_steps", "4"),
            *(
                "--trainer.check_val_every_n_epoch",
                "1",
                "--data.eval_episodes",
                "2",
                "--data.eval_num_envs",
                "2",
            ),
            epochs=2,
        )
        cli = build_cli(args=args)
        scalars = read_scalars(Path(cli.trainer.logger.log_dir))
        for tag in ("rollout/invalid_action_rate", "train/policy_loss", "train/entropy", "eval/return_mean"):
            values = [v for _, v in scalars[tag]]
            assert len(values) == 2 and all(math.isfinite(v) for v in values), tag
        # Each env starts episodes for 3 turns; the last one plays on to its end (4 turns at most).
        assert all(6.0 <= v <= 2 * (2 + 4) for _, v in scalars["rollout/env_steps"])
        if policy == "score":  # admissible commands only: nothing is ever invalid
            assert [v for _, v in scalars["rollout/invalid_action_rate"]] == [0.0, 0.0]
        ckpt = tmp_path / "ckpt" / "last.ckpt"
        result = evaluate.main([*args, "--ckpt_path", str(ckpt), "--episodes", "2"])
        assert result["episodes"] == 2 and 0.0 <= result["win_rate"] <= 1.0
        assert os.path.isfile(ckpt.with_name("eval.json"))
    finally:
        torch.set_num_threads(threads)
