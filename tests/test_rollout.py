"""`RolloutCollector` on Blackjack-v1 with the tiny model: seeding, invalid actions, budgets."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import gymnasium as gym
import pytest
from transformers import PreTrainedTokenizerBase

from llamagym_pl.actions import GenerateStyle
from llamagym_pl.agents import BlackjackAgent
from llamagym_pl.agents.blackjack import HIT, STICK
from llamagym_pl.episode import Episode
from llamagym_pl.loading import load_causal_lm
from llamagym_pl.policy import PolicyWithValueHead
from llamagym_pl.rollout import RolloutCollector
from llamagym_pl.stats import rollout_metrics

ENV = "Blackjack-v1"


class SpyEnv(gym.Wrapper):
    """Records the seed of every reset and the action and raw reward of every step."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.seeds: list[int | None] = []
        self.steps: list[tuple[Any, float, bool, bool]] = []

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self.seeds.append(seed)
        return self.env.reset(seed=seed, options=options)

    def step(self, action: Any):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps.append((action, float(reward), bool(terminated), bool(truncated)))
        return obs, reward, terminated, truncated, info


def spied(collector: RolloutCollector) -> list[SpyEnv]:
    collector.envs = [SpyEnv(env) for env in collector.envs]
    return collector.envs


class ScriptedAgent(BlackjackAgent):
    """Ignores the (random) reply: the k-th call of extract_action follows ``script[k % len]``.

    Script entries: an action to return, or ``"raise"`` to fail parsing.
    """

    def __init__(self, script: list[Any]) -> None:
        super().__init__()
        self.script = script
        self.calls = 0

    def extract_action(self, response: str) -> Any:
        step = self.script[self.calls % len(self.script)]
        self.calls += 1
        if step == "raise":
            raise ValueError(f"no action in {response!r}")
        return step


def check_in_step(ep: Episode) -> None:
    assert len(ep.rewards) == len(ep.invalid) == len(ep.responses) == ep.num_turns >= 1
    assert len(ep.penalties) == ep.num_turns
    assert len(ep.observations) == ep.num_turns + (0 if ep.terminated else 1)
    assert not (ep.terminated and ep.truncated)
    assert all(isinstance(o, str) for o in ep.observations)


def collector(agent: Any = None, num_envs: int = 4, **kwargs: Any) -> RolloutCollector:
    return RolloutCollector(
        ENV,
        None,
        agent or BlackjackAgent(),
        num_envs=num_envs,
        style=GenerateStyle(max_new_tokens=4),
        **kwargs,
    )


def test_episodes_differ_across_envs_and_epochs(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    col = collector(num_envs=6)
    envs = spied(col)
    firsts = {}
    for epoch in (0, 1):
        stats = col.collect(tiny_policy, tiny_tokenizer, seed=0, epoch=epoch, steps_per_env=3)
        firsts[epoch] = [ep.observations[0] for ep in stats.episodes]
        assert len(set(firsts[epoch])) > 1, "every env dealt the same first hand"
    assert sorted(firsts[0]) != sorted(firsts[1]), "epoch 1 replayed epoch 0's hands"
    # Every reset, of every env, episode and epoch, has a seed of its own.
    seeds = [s for env in envs for s in env.seeds]
    assert None not in seeds
    assert len(set(seeds)) == len(seeds)


def test_same_seed_and_epoch_replays_identical_episodes(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    def play(col: RolloutCollector, seed: int, epoch: int) -> list[dict]:
        stats = col.collect(tiny_policy, tiny_tokenizer, seed=seed, epoch=epoch, steps_per_env=3)
        return [asdict(ep) for ep in stats.episodes]

    col = collector()
    first = play(col, seed=3, epoch=2)
    play(col, seed=3, epoch=5)  # state left behind by another epoch must not matter
    assert play(col, seed=3, epoch=2) == first
    assert play(collector(), seed=3, epoch=2) == first  # a fresh collector, as after a resume
    assert play(col, seed=4, epoch=2) != first


@pytest.mark.parametrize("penalty", [0.0, -1.0])
def test_invalid_replies_play_the_fixed_fallback(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase, penalty: float
) -> None:
    # Unparsable, out of the action space, valid hit: then again. Invalid turns play STICK.
    agent = ScriptedAgent(["raise", 7, HIT])
    col = collector(agent, num_envs=1, invalid_action="fixed", fallback_action=STICK, invalid_penalty=penalty)
    (env,) = spied(col)
    stats = col.collect(tiny_policy, tiny_tokenizer, seed=0, epoch=0, steps_per_env=9)
    # Turn 9 hits: if the hand survives, turn 10 sticks (invalid) and ends it.
    n = agent.calls
    assert stats.env_steps == len(env.steps) == n in (9, 10)

    expected_invalid = [agent.script[k % 3] != HIT for k in range(n)]
    assert [a for a, *_ in env.steps] == [STICK if bad else HIT for bad in expected_invalid]

    # One env: the episodes are its steps in order.
    turns = [(ep, t) for ep in stats.episodes for t in range(ep.num_turns)]
    assert len(turns) == n
    assert [ep.invalid[t] for ep, t in turns] == expected_invalid
    for (ep, t), (_, raw, _, _) in zip(turns, env.steps, strict=True):
        assert ep.rewards[t] == raw
        assert ep.penalties[t] == (penalty if ep.invalid[t] else 0.0)
    step = 0
    for ep in stats.episodes:
        check_in_step(ep)
        raw = [r for _, r, *_ in env.steps[step : step + ep.num_turns]]
        assert ep.env_return == sum(raw), "the penalty must not enter the env return"
        assert ep.terminated == env.steps[step + ep.num_turns - 1][2]
        step += ep.num_turns
    metrics = rollout_metrics(stats)
    assert metrics["rollout/invalid_action_rate"] == pytest.approx(sum(expected_invalid) / n)


def test_invalid_replies_with_random_fallback_stay_in_the_space(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    col = collector(ScriptedAgent([7, "raise"]), num_envs=3, invalid_action="random", invalid_penalty=-0.5)
    envs = spied(col)
    stats = col.collect(tiny_policy, tiny_tokenizer, seed=0, epoch=0, steps_per_env=4)
    actions = [a for env in envs for a, *_ in env.steps]
    assert len(actions) == stats.env_steps >= 12  # 4 turns an env, then the last hand finishes
    assert all(col.action_space.contains(a) for a in actions)
    assert {HIT, STICK} <= set(actions), "the random fallback should draw both actions"
    for ep in stats.episodes:
        check_in_step(ep)
        assert all(ep.invalid)
        assert sum(ep.rewards) == pytest.approx(ep.env_return)
        assert ep.penalties == [-0.5] * ep.num_turns


@pytest.mark.parametrize("fallback", [7, None, -1])
def test_fixed_fallback_outside_the_space_is_refused(fallback: Any) -> None:
    with pytest.raises(ValueError, match="fallback_action"):
        collector(invalid_action="fixed", fallback_action=fallback)


def test_non_str_observation_names_the_agent(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    class TupleAgent(BlackjackAgent):
        def format_observation(self, observation: Any) -> Any:
            return observation

    with pytest.raises(TypeError, match=r"TupleAgent\.format_observation"):
        collector(TupleAgent()).collect(tiny_policy, tiny_tokenizer, seed=0, epoch=0, steps_per_env=1)


def test_step_budget_lets_the_running_episode_finish(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    # Envs 0, 2, 4, 6 hit first (may go on), 1, 3, 5, 7 stick (always ends the hand).
    col = collector(ScriptedAgent([HIT, STICK]), num_envs=8)
    envs = spied(col)
    stats = col.collect(tiny_policy, tiny_tokenizer, seed=0, epoch=0, steps_per_env=1)
    # One turn each started one episode each, played to its end; no second one started.
    assert len(stats.episodes) == 8 and all(len(env.seeds) == 1 for env in envs)
    assert stats.env_steps == sum(ep.num_turns for ep in stats.episodes) == sum(len(e.steps) for e in envs)
    for ep in stats.episodes:
        check_in_step(ep)
        assert ep.terminated and not ep.truncated
    assert any(ep.num_turns > 1 for ep in stats.episodes), "some hit should survive and play on"


def test_time_limit_truncation_keeps_the_next_observation(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    col = collector(ScriptedAgent([HIT]), num_envs=4, max_episode_steps=1)
    stats = col.collect(tiny_policy, tiny_tokenizer, seed=0, epoch=0, episodes_per_env=2)
    assert len(stats.episodes) == 8
    truncated = [ep for ep in stats.episodes if ep.truncated]
    assert truncated, "some hit should survive and hit the time limit"
    for ep in stats.episodes:
        check_in_step(ep)
        assert ep.done and ep.num_turns == 1
    assert all(not ep.terminated and len(ep.observations) == 2 for ep in truncated)


def test_episodes_per_env_returns_exactly_that_many_finished_episodes(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    col = collector(num_envs=3)
    stats = col.collect(tiny_policy, tiny_tokenizer, seed=1, epoch=0, episodes_per_env=2)
    assert len(stats.episodes) == 6
    assert all(ep.done for ep in stats.episodes)
    for ep in stats.episodes:
        check_in_step(ep)
    assert stats.env_steps == sum(ep.num_turns for ep in stats.episodes)
    metrics = rollout_metrics(stats)
    assert metrics["rollout/episodes"] == 6
    assert metrics["rollout/return_mean"] == pytest.approx(sum(ep.env_return for ep in stats.episodes) / 6)


def test_collect_needs_exactly_one_budget(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    col = collector()
    with pytest.raises(ValueError, match="exactly one"):
        col.collect(tiny_policy, tiny_tokenizer, seed=0, epoch=0)
    with pytest.raises(ValueError, match="exactly one"):
        col.collect(tiny_policy, tiny_tokenizer, seed=0, epoch=0, steps_per_env=1, episodes_per_env=1)


def test_collect_restores_the_policy_mode(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    tiny_policy.train()
    collector(num_envs=2).collect(tiny_policy, tiny_tokenizer, seed=0, epoch=0, steps_per_env=1)
    assert tiny_policy.training


@pytest.mark.parametrize("greedy", [False, True], ids=["sampled", "greedy"])
def test_checkpoint_generation_config_does_not_change_replies(
    greedy: bool,
    processor_model_dir: Path,
    tiny_policy: PolicyWithValueHead,
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    """Issue #12: a checkpoint's repetition penalty, n-gram ban and minimum length must not reach
    sampling (PPO scores the plain softmax): the same weights play the same replies without them."""
    shipped = PolicyWithValueHead(load_causal_lm(str(processor_model_dir)))
    assert shipped.lm.generation_config.repetition_penalty == 1.5

    def replies(policy: PolicyWithValueHead) -> list[list[str]]:
        stats = collector().collect(policy, tiny_tokenizer, seed=0, epoch=0, steps_per_env=3, greedy=greedy)
        return [ep.responses for ep in stats.episodes]

    assert replies(shipped) == replies(tiny_policy)
    assert shipped.lm.generation_config.repetition_penalty == 1.5  # the model's own config is back


def test_metrics_show_each_actions_share_and_the_reply_length(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """What a user needs to see a policy collapsing onto one action (issue #13): the share of
    turns that played each parsed action, besides the invalid rate, and the mean reply length."""
    # Parsed stick, hit, hit, then an unparsable reply (a random fallback, not counted as hit/stick).
    col = collector(ScriptedAgent([STICK, HIT, HIT, "raise"]), num_envs=3)
    envs = spied(col)
    stats = col.collect(tiny_policy, tiny_tokenizer, seed=0, epoch=0, steps_per_env=4)
    metrics = rollout_metrics(stats)
    turns = [(ep, t) for ep in stats.episodes for t in range(ep.num_turns)]
    valid = [ep.actions[t] for ep, t in turns if not ep.invalid[t]]
    assert sorted(a for env in envs for a, *_ in env.steps) == sorted(ep.actions[t] for ep, t in turns)
    assert metrics["rollout/action_frac/stick"] == pytest.approx(valid.count(STICK) / len(turns))
    assert metrics["rollout/action_frac/hit"] == pytest.approx(valid.count(HIT) / len(turns))
    assert 0 < valid.count(STICK) < valid.count(HIT)
    shares = metrics["rollout/action_frac/stick"] + metrics["rollout/action_frac/hit"]
    assert shares + metrics["rollout/invalid_action_rate"] == pytest.approx(1.0)
    reply_tokens = sum(len(ep.response_ids[t]) for ep, t in turns) / len(turns)
    assert metrics["rollout/reply_tokens"] == pytest.approx(reply_tokens)
    assert 1 <= reply_tokens <= 4  # max_new_tokens
