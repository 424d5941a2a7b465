"""Rollouts play whole episodes (issue #12, item 9): a step budget lets the episode running at its
end finish, so long episodes reach their late states in training; ``data.episodes_per_env`` sizes
an epoch in episodes; an episode that never ends stops the rollout with an error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import pytest
from run_args import tiny_run_args
from transformers import PreTrainedTokenizerBase

from llamagym_pl.actions import GenerateStyle
from llamagym_pl.agents import BlackjackAgent
from llamagym_pl.datamodule import RolloutDataModule
from llamagym_pl.fit import build_cli, main
from llamagym_pl.guards import DEBUG_ENV, ConfigError
from llamagym_pl.policy import PolicyWithValueHead
from llamagym_pl.rollout import RolloutCollector
from llamagym_pl.stats import rollout_metrics
from llamagym_pl.tb import read_scalars

TURNS = "LlamaGymTest/Turns-v0"
CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "blackjack.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Turns(gym.Env):
    """Episodes of exactly ``length`` turns (None: they never end), reward 1 a turn. The
    observation is the turn number, dressed as a Blackjack hand (the player's sum) so that
    :class:`BlackjackAgent` reads it and ``experiments/blackjack.yaml`` can train on it."""

    action_space = gym.spaces.Discrete(2)
    observation_space = gym.spaces.Tuple(
        (gym.spaces.Discrete(10**6), gym.spaces.Discrete(11), gym.spaces.Discrete(2))
    )

    def __init__(self, length: int | None = 50, **_: Any) -> None:  # ignores Blackjack's env_kwargs
        self.length = length

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t = 0
        return (0, 10, 0), {}

    def step(self, action: int):
        self.t += 1
        ended = self.length is not None and self.t >= self.length
        return (self.t, 10, 0), 1.0, ended, False, {}


gym.register(TURNS, entry_point=Turns)


def turn_of(observation: str) -> int:
    """The turn number of a formatted :class:`Turns` observation."""
    return int(observation.split("Your sum is ")[1].split(".")[0])


@pytest.mark.parametrize(
    "budget",
    [("--data.steps_per_env", "4"), ("--data.steps_per_env", "null", "--data.episodes_per_env", "1")],
    ids=["steps_per_env", "episodes_per_env"],
)
def test_a_small_budget_trains_on_every_turn_of_50_turn_episodes(
    budget: tuple[str, ...], tiny_model_dir: Path, tmp_path: Path
) -> None:
    # 2 envs, 4 turns each: each env's first episode runs on to its 50th turn. No evaluation.
    args = tiny_run_args(
        *(CONFIG, tiny_model_dir, tmp_path, "--data.env_id", TURNS, "--data.num_envs", "2", *budget),
        *("--trainer.check_val_every_n_epoch", "2"),
    )  # fmt: skip
    cli = build_cli(args=args)
    data = cli.datamodule
    episodes, stats = data.rollout.stats.episodes, data.rollout.stats
    assert [ep.num_turns for ep in episodes] == [50, 50]
    assert all(ep.terminated for ep in episodes)
    assert stats.env_steps == 100  # the rule: 4 turns started, the running episode finished
    for ep in episodes:
        assert [turn_of(obs) for obs in ep.observations] == list(range(50))
    # The reply to turn 49's observation is trained on: action tokens of turn 49 in a trained row.
    buf = data.rollout.buffer
    trained = buf.turn_index[: buf.num_train_rows]
    assert int(trained.max()) == 49 and buf.turn_mask.sum(1).tolist() == [50, 50]
    scalars = read_scalars(cli.trainer.logger.log_dir)
    assert scalars["rollout/env_steps"] == [(scalars["rollout/env_steps"][0][0], 100.0)]
    for tag, value in (("rollout/episodes", 2), ("rollout/episode_length", 50), ("rollout/return_mean", 50)):
        assert [v for _, v in scalars[tag]] == [value], tag


def collector(length: int | None, num_envs: int = 2, **kwargs: Any) -> RolloutCollector:
    """Plays :class:`Turns` episodes; prompts hold one observation (a budget of 40 tokens), so
    long episodes stay short for the tiny model."""
    kwargs = {"max_prompt_tokens": 40, **kwargs}
    return RolloutCollector(TURNS, {"length": length}, BlackjackAgent(), num_envs, GenerateStyle(1), **kwargs)


@pytest.mark.parametrize(("length", "steps", "turns"), [(3, 3, 3), (3, 4, 6), (3, 7, 9), (1, 2, 2)])
def test_each_env_starts_episodes_until_its_budget_and_finishes_the_last(
    length: int,
    steps: int,
    turns: int,
    tiny_policy: PolicyWithValueHead,
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    stats = collector(length).collect(tiny_policy, tiny_tokenizer, seed=0, epoch=0, steps_per_env=steps)
    assert stats.env_steps == 2 * turns
    assert [ep.num_turns for ep in stats.episodes] == [length] * (2 * turns // length)
    assert all(ep.terminated and len(ep.observations) == length for ep in stats.episodes)
    metrics = rollout_metrics(stats)
    assert metrics["rollout/episodes"] == len(stats.episodes)
    assert metrics["rollout/return_mean"] == metrics["rollout/episode_length"] == length


def test_episodes_per_env_plays_that_many_whole_episodes(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    stats = collector(3, num_envs=3).collect(tiny_policy, tiny_tokenizer, seed=0, epoch=0, episodes_per_env=2)
    assert [ep.num_turns for ep in stats.episodes] == [3] * 6
    assert all(ep.terminated for ep in stats.episodes) and stats.env_steps == 18


def test_an_episode_that_never_ends_stops_the_rollout(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    endless = collector(None, num_envs=1)
    with pytest.raises(ConfigError) as err:
        endless.collect(tiny_policy, tiny_tokenizer, seed=0, epoch=0, steps_per_env=1)
    message = str(err.value)
    assert "env 0 of 'LlamaGymTest/Turns-v0' has played 101 turns" in message
    assert "set data.max_episode_steps" in message and "\n" not in message
    # With a time limit the rollout is bounded however long the episode: no error.
    limited = collector(None, num_envs=1, max_episode_steps=120)
    stats = limited.collect(tiny_policy, tiny_tokenizer, seed=0, epoch=0, steps_per_env=1)
    (episode,) = stats.episodes
    assert episode.truncated and episode.num_turns == 120 and len(episode.observations) == 121


def test_steps_and_episodes_per_env_exclude_each_other(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data.steps_per_env=4 and data.episodes_per_env=2: set one"):
        RolloutDataModule(BlackjackAgent(), steps_per_env=4, episodes_per_env=2)
    with pytest.raises(ValueError, match=r"data.episodes_per_env=0 must be >= 1"):
        RolloutDataModule(BlackjackAgent(), episodes_per_env=0)
    assert RolloutDataModule(BlackjackAgent()).budget == {"steps_per_env": 8}  # the default
    assert RolloutDataModule(BlackjackAgent(), episodes_per_env=3).budget == {"episodes_per_env": 3}
    # From the command line: one line, naming the fix.
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(DEBUG_ENV, raising=False)
        with pytest.raises(SystemExit) as exit_info:
            main(tiny_run_args(CONFIG, tiny_model_dir, tmp_path, "--data.episodes_per_env", "2"))
    message = exit_info.value.code
    assert isinstance(message, str) and "Traceback" not in message
    assert message.startswith("llamagym_pl.fit: error: data.steps_per_env=4 and data.episodes_per_env=2")


def test_more_minibatches_than_whole_episodes_is_a_config_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    # 4 envs x 1 episode: exactly 4 episodes, so at most 4 minibatches.
    budget = ("--data.steps_per_env", "null", "--data.episodes_per_env", "1", "--model.num_minibatches", "5")
    with pytest.raises(ConfigError) as err:
        build_cli(args=tiny_run_args(CONFIG, tiny_model_dir, tmp_path, *budget), run_fit=False)
    assert str(err.value) == (
        "model.num_minibatches=5 is more than a rollout can have episodes "
        "(data.num_envs x data.episodes_per_env = 4); lower it to at most 4"
    )
