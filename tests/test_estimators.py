"""Critic-free estimators (issue #16): GRPO's and GiGPO's advantages against hand values, grouped
rollouts (one initial state per group, full groups), and both in training: the Lightning path
without a value head, and the imperative loop."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path

import gymnasium as gym
import pytest
import torch
from run_args import tiny_run_args
from transformers import AutoModelForCausalLM, AutoTokenizer

from llamagym_pl import fit
from llamagym_pl.actions import ScoreStyle
from llamagym_pl.agents import BlackjackAgent
from llamagym_pl.buffer import build_buffer
from llamagym_pl.episode import Episode
from llamagym_pl.estimators import (
    GroupEstimator,
    group_advantages,
    group_ids,
    grouped_normalize,
    returns_to_go,
)
from llamagym_pl.guards import DEBUG_ENV
from llamagym_pl.rollout import RolloutCollector
from llamagym_pl.tb import read_scalars

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "blackjack.yaml"
SQRT2 = math.sqrt(2.0)


# ----------------------------------------------------------------------------- the math
def test_grouped_normalize_hand_values() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 7.0, 0.1, 0.1, 0.1])
    group = torch.tensor([4, 4, 4, 9, 9, 2, 3, 3, 3])  # any numbers; groups of 3, 2 (equal), 1, 3 (equal)
    # Group 4: mean 2, unbiased std 1. Equal values and a group of one: exactly 0 (0.1 * 3 / 3 != 0.1).
    expected = torch.tensor([-1.0, 0.0, 1.0, 0, 0, 0, 0, 0, 0]) / (1 + 1e-6)
    out = grouped_normalize(x, group)
    torch.testing.assert_close(out, expected, rtol=1e-7, atol=0)
    assert torch.equal(out[3:], torch.zeros(6))  # exactly
    plain = grouped_normalize(x, group, std_norm=False)
    assert torch.equal(plain, torch.tensor([-1.0, 0.0, 1.0, 0, 0, 0, 0, 0, 0]))
    assert plain.dtype == torch.float32


def test_returns_to_go_hand_values() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    out = returns_to_go(rewards, mask, gamma=0.5)
    # 1 + 0.5 * (2 + 0.5 * 3) = 2.75; 2 + 0.5 * 3 = 3.5; padding ignored.
    assert torch.equal(out, torch.tensor([[2.75, 3.5, 3.0], [4.0, 0.0, 0.0]]))


def test_group_ids_share_equal_keys_and_none_is_alone() -> None:
    assert group_ids([(0, 1), None, (0, 1), (2, 0), None]).tolist() == [0, 1, 0, 2, 3]


def test_grpo_gives_every_turn_its_episodes_group_advantage() -> None:
    # Group 0: returns 1 (two turns), 0, -1 -> mean 0, std 1; group 1 (one episode): 0.
    # Episode 2 was truncated after one turn: its return is what it collected (no bootstrap).
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0], [-1.0, 0.0], [5.0, 0.0]])
    mask = torch.tensor([[True, True], [True, True], [True, False], [True, False]])
    group = torch.tensor([0, 0, 0, 1])
    adv, metrics = group_advantages(GroupEstimator("grpo"), rewards, mask, group, group[:, None] * 0, 1.0)
    one = 1 / (1 + 1e-6)
    expected = torch.tensor([[one, one], [0.0, 0.0], [-one, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(adv, expected, rtol=1e-7, atol=0)  # the zeros exactly
    assert metrics["train/group_size_mean"] == 2.0  # groups of 3 and 1
    assert metrics["train/zero_advantage_share"] == 3 / 6  # episode 1's two turns, episode 3's
    assert "train/anchor_group_size_mean" not in metrics
    dr, _ = group_advantages(GroupEstimator("grpo", std_norm=False), rewards * 3, mask, group, group, 1.0)
    assert torch.equal(dr, torch.tensor([[3.0, 3.0], [0.0, 0.0], [-3.0, 0.0], [0.0, 0.0]]))


def test_gigpo_adds_the_anchor_state_advantage() -> None:
    # One group of two episodes that both start in "s0": A then reaches s1 and wins 1, B reaches
    # s2 and wins 0. Turn 0 is one anchor group (same state in one group); s1 and s2 are alone.
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    group = torch.tensor([0, 0])
    anchor = torch.tensor([[0, 1], [0, 2]])
    gigpo = GroupEstimator("gigpo", std_norm=False, step_weight=1.0)
    adv, metrics = group_advantages(gigpo, rewards, mask, group, anchor, gamma=0.5)
    # Episode level: returns 1 vs 0 -> +-0.5. Step level at s0: returns-to-go 0.5 vs 0 -> +-0.25.
    assert torch.equal(adv, torch.tensor([[0.75, 0.5], [-0.75, -0.5]]))
    assert metrics["train/anchor_group_size_mean"] == 4 / 3  # {s0: 2, s1: 1, s2: 1}
    half, _ = group_advantages(GroupEstimator("gigpo", False, 0.5), rewards, mask, group, anchor, 0.5)
    assert torch.equal(half, torch.tensor([[0.625, 0.5], [-0.625, -0.5]]))
    normed, _ = group_advantages(GroupEstimator("gigpo"), rewards, mask, group, anchor, 0.5)
    # With the std: two values d apart from their mean have unbiased std d * sqrt(2), so each
    # level is +-d / (d * sqrt(2) + eps), about +-1/sqrt(2): d = 0.5 (episodes), 0.25 (s0).
    episode, step = 0.5 / (0.5 * SQRT2 + 1e-6), 0.25 / (0.25 * SQRT2 + 1e-6)
    expected = torch.tensor([[episode + step, episode], [-episode - step, -episode]])
    torch.testing.assert_close(normed, expected, rtol=1e-6, atol=0)


def test_the_buffer_numbers_groups_and_anchor_states(tiny_tokenizer) -> None:
    episodes = [
        Episode("sys", ["s0", "s1"], ["hit", "stick"], [0.0, 1.0], terminated=True, group=(0, 0)),
        Episode("sys", ["s0"], ["stick"], [-1.0], terminated=True, group=(0, 0)),
        Episode("sys", ["s0"], ["stick"], [1.0], terminated=True, group=(1, 0)),  # another group
        Episode("sys", ["s1"], ["stick"], [1.0], terminated=True),  # no group: alone
    ]
    buf = build_buffer(tiny_tokenizer, episodes)
    assert buf.group.tolist() == [0, 0, 1, 2]
    anchor = buf.anchor.tolist()
    assert anchor[0][0] == anchor[1][0]  # s0 in group 0, twice
    assert len({anchor[0][0], anchor[0][1], anchor[2][0], anchor[3][0]}) == 4
    assert anchor[1][1] == -1  # padding


# ----------------------------------------------------------------------------- grouped rollouts
@pytest.mark.parametrize("budget", [{"steps_per_env": 3}, {"episodes_per_env": 2}])
def test_a_group_plays_full_sets_of_episodes_from_one_initial_state(
    tiny_policy, tiny_tokenizer, budget
) -> None:
    agent = BlackjackAgent()
    style = ScoreStyle(agent)
    collector = RolloutCollector(
        "Blackjack-v1", {"natural": False, "sab": False}, agent, 6, style, group_size=3
    )
    stats = collector.collect(tiny_policy, tiny_tokenizer, seed=7, epoch=2, **budget)
    groups: dict[tuple[int, int], list[Episode]] = defaultdict(list)
    for ep in stats.episodes:
        groups[ep.group].append(ep)
    assert {g for g, _ in groups} == {0, 1}
    assert all(len(eps) == 3 for eps in groups.values()), {k: len(v) for k, v in groups.items()}
    for eps in groups.values():  # one initial state per group
        assert len({ep.observations[0] for ep in eps}) == 1
    # Different groups (and a group's successive episodes) start from different seeds.
    starts = Counter(eps[0].observations[0] for eps in groups.values())
    assert len(starts) > 1
    # The members played their own replies: not every group's episodes are copies of each other.
    assert any(len({tuple(ep.responses) for ep in eps}) > 1 for eps in groups.values())


def test_group_size_one_plays_the_same_rollout_as_before(tiny_policy, tiny_tokenizer) -> None:
    agent = BlackjackAgent()
    runs = [
        RolloutCollector("Blackjack-v1", None, agent, 4, ScoreStyle(agent), **size).collect(
            tiny_policy, tiny_tokenizer, seed=3, epoch=1, steps_per_env=3
        )
        for size in ({}, {"group_size": 1})
    ]
    assert [ep.observations for ep in runs[0].episodes] == [ep.observations for ep in runs[1].episodes]
    assert all(ep.group is None for ep in runs[1].episodes)


# ----------------------------------------------------------------------------- training
def load(model_dir: Path) -> tuple[AutoModelForCausalLM, AutoTokenizer]:
    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize(
    ("estimator", "config"), [("grpo", "blackjack.yaml"), ("gigpo", "blackjack-generate.yaml")]
)
def test_critic_free_fit_trains_without_a_value_head(
    estimator: str, config: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    argv = tiny_run_args(
        CONFIG.parent / config,
        tiny_model_dir,
        tmp_path,
        "--model.advantage_estimator",
        estimator,
        "--data.group_size",
        "2",
        "--model.update_epochs",
        "2",
        epochs=2,
    )
    fit.main(argv)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert not [k for k in ckpt["state_dict"] if "value_head" in k]
    scalars = read_scalars(next((tmp_path / "runs").glob("*/version_0")))
    assert "train/value_loss" not in scalars and "train/explained_variance" not in scalars
    assert "rollout/value_mean" not in scalars
    assert [v for _, v in scalars["train/group_size_mean"]] == [2.0, 2.0]
    share = [v for _, v in scalars["train/zero_advantage_share"]]
    assert all(0 <= v < 1 for v in share)
    if estimator == "gigpo":
        assert all(v >= 1 for _, v in scalars["train/anchor_group_size_mean"])
    assert any(v > 0 for _, v in scalars["train/approx_kl"])  # it trained


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.advantage_estimator", "grpo"], "data.group_size=1: set data.group_size to 2 or more"),
        (
            ["--model.advantage_estimator", "gigpo", "--data.group_size", "3"],
            "data.num_envs=4 is not a multiple of data.group_size=3",
        ),
        (["--data.group_size", "0"], "data.group_size=0 must be >= 1"),
    ],
)
def test_group_settings_that_cannot_work_are_one_line(
    extra: list[str], message: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        fit.main(tiny_run_args(CONFIG, tiny_model_dir, tmp_path, *extra))
    first, *rest = exit_info.value.code.splitlines()
    assert first.startswith("llamagym_pl.fit: error: ") and message in first
    assert rest == ["(set LLAMAGYM_PL_DEBUG=1 for the traceback)"]
    assert not (tmp_path / "ckpt").exists()  # before any training


def test_the_imperative_loop_groups_consecutive_episodes(tiny_model_dir: Path) -> None:
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    agent = BlackjackAgent(
        model,
        tokenizer,
        "cpu",
        {"max_new_tokens": 2},
        {"batch_size": 8, "group_size": 4, "advantage_estimator": "grpo", "seed": 0, "policy": "score"},
    )
    assert not agent.imperative.policy.has_critic
    assert not [n for n, _ in agent.imperative.policy.named_parameters() if "value_head" in n]
    env = gym.make("Blackjack-v1")
    stats = {}
    for episode in range(8):
        observation, _ = env.reset(seed=100 + episode // 4)  # each group of 4 from one deal
        done = False
        while not done:
            observation, reward, terminated, truncated, _ = env.step(agent.act(observation))
            agent.assign_reward(reward)
            done = terminated or truncated
        stats = agent.terminate_episode()
    assert stats["train/group_size_mean"] == 4.0
    assert "train/value_loss" not in stats and "train/explained_variance" not in stats
    assert 0 <= stats["train/zero_advantage_share"] <= 1


def test_the_imperative_loop_refuses_groups_that_cannot_work(tiny_model_dir: Path) -> None:
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    with pytest.raises(ValueError, match=r"ppo_config_dict\['group_size'\]=3"):
        BlackjackAgent(model, tokenizer, "cpu", None, {"batch_size": 8, "group_size": 3}).act((12, 3, 0))
    with pytest.raises(ValueError, match=r"set ppo_config_dict\['group_size'\] to 2 or more"):
        BlackjackAgent(model, tokenizer, "cpu", None, {"advantage_estimator": "gigpo"}).act((12, 3, 0))


def test_a_grouped_run_resumes_exactly(tiny_model_dir: Path, tmp_path: Path) -> None:
    def run(out: Path, epochs: int, *extra: str) -> dict[str, list]:
        grouped = ("--model.advantage_estimator", "gigpo", "--data.group_size", "2")
        constant = ("--model.lr_schedule", "constant")  # a linear one depends on max_epochs
        cli = fit.build_cli(
            tiny_run_args(CONFIG, tiny_model_dir, out, *grouped, *constant, *extra, epochs=epochs)
        )
        return read_scalars(cli.trainer.logger.log_dir)

    whole = run(tmp_path / "whole", 3)
    run(tmp_path / "part", 2)
    resumed = run(tmp_path / "part", 3, "--ckpt_path", "last")
    split = max(s for s, v in whole["epoch"] if v == 1)
    for tag, points in whole.items():
        if not tag.endswith("_s"):
            assert [p for p in resumed[tag] if p[0] > split] == [p for p in points if p[0] > split], tag
    assert [v for s, v in resumed["epoch"] if s > split] == [2.0]
