"""The LlamaGym-compatible imperative loop: ``act`` / ``assign_reward`` / ``terminate_episode``."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import llamagym_pl.imperative as imperative
from llamagym_pl import Agent, ppo
from llamagym_pl.imperative_setup import ImperativeConfig, generation_kwargs
from llamagym_pl.policy import PolicyWithValueHead

# Two tokens are enough for "hit </s>"; LlamaGym's 32 would make the loop test slow on CPU.
FAST_GENERATE = {"max_new_tokens": 2}
EPISODES = 320  # 40 PPO updates of 8 episodes
TRAIN_KEYS = (
    "train/policy_loss",
    "train/value_loss",
    "train/entropy",
    "train/approx_kl",
    "train/clipfrac",
    "train/loss",
    "train/learning_rate",
    "rollout/return_mean",
    "rollout/invalid_action_rate",
    "rollout/invalid_actions",
    "rollout/value_mean",
    "rollout/advantage_mean",
)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: the tiny model gains nothing from more, and on a busy 2-core machine
    torch's spinning threads oversubscribe the CPU (10x slower measured under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


pytestmark = pytest.mark.usefixtures("one_thread")


def load(model_dir: Path) -> tuple[Any, Any]:
    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


# The seed README's agent, verbatim.
class BlackjackAgent(Agent):
    def get_system_prompt(self) -> str:
        return "You are an expert blackjack player."

    def format_observation(self, observation) -> str:
        return f"Your current total is {observation[0]}"

    def extract_action(self, response: str):
        return 0 if "stick" in response else 1


class MuteAgent(BlackjackAgent):
    """Never names an action."""

    def extract_action(self, response: str):
        raise ValueError(f"no action in {response!r}")


class OutOfSpaceAgent(BlackjackAgent):
    def extract_action(self, response: str):
        return 7


def play(agent: Agent, env: gym.Env, seed: int) -> dict[str, float]:
    observation, info = env.reset(seed=seed)
    done = False
    while not done:
        action = agent.act(observation)
        assert env.action_space.contains(action)
        observation, reward, terminated, truncated, info = env.step(action)
        agent.assign_reward(reward)
        done = terminated or truncated
    return agent.terminate_episode()


@pytest.mark.slow
def test_seed_readme_loop_trains(tiny_model_dir: Path) -> None:
    model, tokenizer = load(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    device = "cpu"
    agent = BlackjackAgent(model, tokenizer, device, FAST_GENERATE)

    # The seed README's loop; only `trange` became `range` and the stats are collected.
    all_stats = []
    env = gym.make("Blackjack-v1")
    for episode in range(EPISODES):  # noqa: B007 - the seed loop, verbatim
        observation, info = env.reset()
        done = False

        while not done:
            action = agent.act(observation)  # act based on observation
            observation, reward, terminated, truncated, info = env.step(action)
            agent.assign_reward(reward)  # provide reward to agent
            done = terminated or truncated

        train_stats = agent.terminate_episode()  # trains if batch is full
        all_stats.append(train_stats)

    assert all(isinstance(s, dict) for s in all_stats)
    updates = [s for s in all_stats if s]
    assert len(updates) == EPISODES // 8
    assert all(bool(s) == ((i + 1) % 8 == 0) for i, s in enumerate(all_stats))
    for stats in updates:
        for key in TRAIN_KEYS:
            assert math.isfinite(stats[key]), (key, stats[key])
        assert stats["rollout/episodes"] == 8
        assert stats["rollout/invalid_actions"] == 0
        assert stats["train/minibatch_steps"] == 4 * 4  # update_epochs * num_minibatches
        assert -1.0 <= stats["rollout/return_mean"] <= 1.5
    assert any(stats["train/approx_kl"] != 0 for stats in updates)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "no weight changed after the PPO updates"


def test_invalid_reply_plays_counted_fallback(tiny_model_dir: Path) -> None:
    model, tokenizer = load(tiny_model_dir)
    env = gym.make("Blackjack-v1")
    ppo_config = {
        "batch_size": 2,
        "num_minibatches": 1,
        "action_space": env.action_space,
        "invalid_action": "fixed",
        "fallback_action": 0,
        "invalid_penalty": -0.5,
    }
    agent = MuteAgent(model, tokenizer, "cpu", FAST_GENERATE, ppo_config)
    observation, _ = env.reset(seed=0)
    assert agent.act(observation) == 0
    agent.assign_reward(1.0)
    agent.assign_reward(0.5)  # the same turn: rewards add
    ep = agent.imperative.episode
    assert (len(ep.observations), len(ep.responses), len(ep.rewards), len(ep.invalid)) == (1, 1, 1, 1)
    assert ep.rewards == [1.5] and ep.penalties == [-0.5]
    assert ep.env_return == 1.5 and ep.invalid == [True]
    assert agent.terminate_episode() == {}
    stats = play(agent, env, seed=1)  # the fallback "stick" ends every episode after one turn
    assert stats["rollout/env_steps"] == 2 and stats["rollout/invalid_actions"] == 2
    assert stats["rollout/invalid_action_rate"] == 1.0
    assert agent.imperative.episodes == []  # the update consumed the batch


def test_out_of_space_action_gets_random_fallback(tiny_model_dir: Path) -> None:
    model, tokenizer = load(tiny_model_dir)
    env = gym.make("Blackjack-v1")
    agent = OutOfSpaceAgent(model, tokenizer, "cpu", FAST_GENERATE, action_space=env.action_space)
    observation, _ = env.reset(seed=0)
    actions = {agent.act(observation) for _ in range(20)}
    assert actions <= {0, 1}
    ep = agent.imperative.episode
    assert ep.invalid == [True] * 20 and len(ep.observations) == len(ep.responses) == 20


def test_invalid_reply_without_action_space_is_a_clear_error(tiny_model_dir: Path) -> None:
    model, tokenizer = load(tiny_model_dir)
    agent = MuteAgent(model, tokenizer, "cpu", FAST_GENERATE)
    with pytest.raises(RuntimeError, match="action_space"):
        agent.act((12, 3, 0))
    assert agent.imperative.episode.responses == []  # the failed turn left no half entry


def test_assign_reward_before_act_raises(tiny_model_dir: Path) -> None:
    model, tokenizer = load(tiny_model_dir)
    agent = BlackjackAgent(model, tokenizer, "cpu", FAST_GENERATE)
    with pytest.raises(RuntimeError, match="before act"):
        agent.assign_reward(1.0)
    agent.act((12, 3, 0))
    agent.assign_reward(1.0)
    agent.terminate_episode()
    with pytest.raises(RuntimeError, match="before act"):
        agent.assign_reward(1.0)  # a new episode has no turn yet


def test_eval_mode_is_greedy_and_records_nothing(tiny_model_dir: Path) -> None:
    model, tokenizer = load(tiny_model_dir)
    # Long replies: sampling would almost surely differ between the two tries.
    agent = BlackjackAgent(
        model, tokenizer, "cpu", {"max_new_tokens": 8}, {"batch_size": 1, "num_minibatches": 1}
    )
    assert agent.eval() is agent and not agent.training
    replies = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        agent.act((12, 3, 0))
        replies.append(agent.current_episode_messages[-1]["content"])
        agent.assign_reward(1.0)
        assert agent.terminate_episode() == {}
    assert replies[0] == replies[1]
    assert agent.imperative.episodes == [] and agent.imperative.num_updates == 0

    agent.train()
    agent.act((12, 3, 0))
    with pytest.raises(RuntimeError, match="between episodes"):
        agent.eval()
    assert agent.terminate_episode()  # batch_size 1: trained on the training episode


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_device_as_str_or_torch_device(tiny_model_dir: Path, device: str | torch.device) -> None:
    model, tokenizer = load(tiny_model_dir)
    agent = BlackjackAgent(model, tokenizer, device, FAST_GENERATE)
    assert agent.act((12, 3, 0)) in (0, 1)
    assert agent.imperative.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in agent.imperative.policy.parameters())


def test_existing_policy_with_value_head_is_used_as_is(tiny_model_dir: Path) -> None:
    model, tokenizer = load(tiny_model_dir)
    policy = PolicyWithValueHead(model)
    agent = BlackjackAgent(policy, tokenizer, "cpu", FAST_GENERATE)
    agent.act((12, 3, 0))
    assert agent.imperative.policy is policy


def test_truncated_episode_bootstraps_from_next_observation(tiny_model_dir: Path) -> None:
    model, tokenizer = load(tiny_model_dir)
    agent = BlackjackAgent(model, tokenizer, "cpu", FAST_GENERATE, {"batch_size": 2, "num_minibatches": 1})
    agent.act((12, 3, 0))
    agent.assign_reward(0.0)
    with pytest.raises(ValueError, match="next_observation"):
        agent.terminate_episode(truncated=True)
    assert agent.terminate_episode(truncated=True, next_observation=(15, 3, 0)) == {}
    ep = agent.imperative.episodes[0]
    assert ep.truncated and not ep.terminated
    assert ep.observations == ["Your current total is 12", "Your current total is 15"]
    agent.act((20, 3, 0))
    agent.assign_reward(1.0)
    stats = agent.terminate_episode()
    assert stats["rollout/episodes"] == 2


def test_update_uses_the_shared_ppo_functions(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, int] = {}

    def spy(name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return wrapped

    for name in ("build_buffer", "prepare_rollout", "minibatch_loss"):
        monkeypatch.setattr(imperative, name, spy(name, getattr(imperative, name)))

    class Dataset(imperative.RolloutDataset):  # the Lightning path's minibatches
        __getitem__ = spy("minibatch", imperative.RolloutDataset.__getitem__)

    monkeypatch.setattr(imperative, "RolloutDataset", Dataset)
    model, tokenizer = load(tiny_model_dir)
    config = {"batch_size": 2, "num_minibatches": 2, "update_epochs": 3}
    agent = BlackjackAgent(model, tokenizer, "cpu", FAST_GENERATE, config)
    env = gym.make("Blackjack-v1")
    assert play(agent, env, seed=0) == {}
    stats = play(agent, env, seed=1)
    assert calls == {"build_buffer": 1, "prepare_rollout": 1, "minibatch_loss": 6, "minibatch": 6}
    assert stats["train/minibatch_steps"] == 6


def test_config_accepts_llamagym_keys_and_rejects_unknown() -> None:
    config = ImperativeConfig.from_dict({"batch_size": 8, "mini_batch_size": 4, "ppo/ppo_epochs": 2})
    assert (config.batch_size, config.num_minibatches, config.update_epochs) == (8, 2, 2)
    with pytest.raises(ValueError, match="unknown ppo_config_dict keys"):
        ImperativeConfig.from_dict({"batch_sise": 8})
    with pytest.raises(ValueError, match="num_minibatches"):
        ImperativeConfig.from_dict({"batch_size": 2})
    kwargs = generation_kwargs({"generate/max_new_tokens": 5, "generate/do_sample": True})
    assert kwargs["max_new_tokens"] == 5 and kwargs["temperature"] == 1.0 and kwargs["top_k"] == 0
    with pytest.raises(ValueError, match=r"unknown generate_config_dict keys \['temprature'\]"):
        generation_kwargs({"temprature": 0.7})  # a typo: not a GenerationConfig setting


def test_act_without_model_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="needs a model and tokenizer"):
        BlackjackAgent().act((12, 3, 0))


def test_trl_value_head_model_is_unwrapped(tiny_model_dir: Path) -> None:
    """LlamaGym scripts pass TRL's AutoModelForCausalLMWithValueHead; its LM is trained with ours."""
    model, tokenizer = load(tiny_model_dir)

    class TrlLike(torch.nn.Module):  # the two attributes TRL's wrapper has
        def __init__(self) -> None:
            super().__init__()
            self.pretrained_model = model
            self.v_head = torch.nn.Linear(4, 1)

    agent = BlackjackAgent(TrlLike(), tokenizer, "cpu", FAST_GENERATE)
    agent.act((12, 3, 0))
    assert agent.imperative.policy.lm is model


def assistant_replies(model_dir: Path, generate: dict[str, Any], training: bool = True) -> list[str]:
    """The replies of a fresh agent (ppo seed 0) to six Blackjack observations in one episode."""
    model, tokenizer = load(model_dir)
    agent = BlackjackAgent(model, tokenizer, "cpu", {"max_new_tokens": 4, **generate}, {"seed": 0})
    agent.train(training)
    for total in range(12, 18):
        agent.act((total, 3, 0))
    return [m["content"] for m in agent.current_episode_messages if m["role"] == "assistant"]


@pytest.mark.parametrize("training", [True, False], ids=["sampled", "greedy"])
def test_checkpoint_generation_config_does_not_change_replies(
    training: bool, tiny_model_dir: Path, processor_model_dir: Path
) -> None:
    """Issue #12: the checkpoint's generation_config.json (repetition penalty, banned tokens ...)
    must not reach act(): PPO scores the plain softmax, so the same weights reply the same."""
    shipped = assistant_replies(processor_model_dir, {}, training)
    assert shipped == assistant_replies(tiny_model_dir, {}, training)


def test_extra_generate_keys_are_applied_with_an_off_policy_warning(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    numbers = AutoTokenizer.from_pretrained(tiny_model_dir).convert_tokens_to_ids(
        [str(n) for n in range(101)]
    )
    with caplog.at_level(logging.WARNING, logger=imperative.__name__):
        plain = assistant_replies(tiny_model_dir, {})
        shaped = assistant_replies(tiny_model_dir, {"suppress_tokens": numbers, "repetition_penalty": 1.2})
    [record] = [r for r in caplog.records if r.name == imperative.__name__]  # none for the plain agent
    assert "off-policy" in record.message
    assert "repetition_penalty" in record.message and "suppress_tokens" in record.message
    words = [word for reply in plain for word in reply.split()]
    assert any(word.isdigit() for word in words), "the check needs a plain reply with a number"
    assert shaped != plain
    assert not any(word.isdigit() for reply in shaped for word in reply.split())  # numbers suppressed


@pytest.mark.parametrize(("key", "value"), [("top_p", 0.6), ("top_k", 10)])
def test_truncated_sampling_is_refused_for_training(key: str, value: float, tiny_model_dir: Path) -> None:
    """PPO never scores a top-k/top-p truncated distribution; greedy play ignores both keys."""
    model, tokenizer = load(tiny_model_dir)
    agent = BlackjackAgent(model, tokenizer, "cpu", {**FAST_GENERATE, key: value})
    message = rf"generate_config_dict\['{key}'\]={value} samples from a truncated distribution"
    with pytest.raises(ValueError, match=message):
        agent.act((12, 3, 0))
    agent.eval()
    assert agent.act((12, 3, 0)) in (0, 1)
    agent.terminate_episode()
    with pytest.raises(ValueError, match=message):
        agent.train()
    assert not agent.training


def play_updates(agent: Agent, updates: int, batch_size: int) -> list[dict[str, float]]:
    """Blackjack episodes (env seeds 0, 1, ...) until ``updates`` PPO updates ran; their stats."""
    env, stats, seed = gym.make("Blackjack-v1"), [], 0
    while len(stats) < updates:
        result = play(agent, env, seed)
        seed += 1
        assert bool(result) == (seed % batch_size == 0)
        if result:
            stats.append(result)
    return stats


def test_score_mode_replies_are_candidates_and_train_at_ratio_one(tiny_model_dir: Path) -> None:
    """``policy: score`` in the imperative loop: every reply is one of the agent's candidate actions
    (Blackjack's action names), recorded with its tokens, and the update's only step (one minibatch,
    one update epoch) sees ratio 1 under the candidate softmax."""
    model, tokenizer = load(tiny_model_dir)
    config = {"policy": "score", "batch_size": 2, "num_minibatches": 1, "update_epochs": 1, "seed": 0}
    agent = BlackjackAgent(model, tokenizer, "cpu", {"temperature": 0.7}, config)
    agent.action_names = ["stick", "hit"]  # the seed README's agent has none: the candidates
    finished: list = []
    original = agent.imperative.terminate_episode

    def keep(*args: Any, **kwargs: Any) -> dict[str, float]:
        finished.append(agent.imperative.episode)
        return original(*args, **kwargs)

    agent.imperative.terminate_episode = keep
    (stats,) = play_updates(agent, 1, batch_size=2)
    for ep in finished:
        assert ep.candidates == [["stick", "hit"]] * ep.num_turns
        assert ep.responses == [c[k] for c, k in zip(ep.candidates, ep.chosen, strict=True)]
        assert ep.actions == ep.chosen and not any(ep.invalid)  # a name plays its index
        assert ep.response_ids == [ids[k] for ids, k in zip(ep.candidate_ids, ep.chosen, strict=True)]
    # 0 up to rounding: the loss runs the turns in forwards of other shapes than the preparation.
    assert abs(stats["train/approx_kl"]) < 1e-9 and stats["train/clipfrac"] == 0.0
    assert 0 < stats["rollout/candidate_entropy"] <= math.log(2) + 1e-6
    assert 0 < stats["train/entropy"] <= math.log(2) + 1e-6


@pytest.mark.parametrize("policy", ["generate", "score"])
def test_kl_coef_subtracts_the_kl_penalty_from_turn_rewards(
    policy: str, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``kl_coef`` in the imperative loop: each turn's reward enters GAE less ``kl_coef`` times the
    style's per-turn KL to the initial policy (0 at the first update, not after)."""
    coef, prepared = 0.5, []
    real = imperative.prepare_rollout

    def spy(policy_, buf, style, gamma, gae_lambda, batch_size, reference, kl_coef, **kwargs: Any):
        kl = style.prepare(policy_, buf, batch_size, reference).kl  # (E, T), as the real call's
        metrics = real(policy_, buf, style, gamma, gae_lambda, batch_size, reference, kl_coef, **kwargs)
        prepared.append((buf, kl, kl_coef, metrics))
        return metrics

    monkeypatch.setattr(imperative, "prepare_rollout", spy)
    model, tokenizer = load(tiny_model_dir)
    config = {"policy": policy, "batch_size": 2, "num_minibatches": 1, "seed": 0, "learning_rate": 1e-2}
    config |= {"kl_coef": coef, "gamma": 1.0, "gae_lambda": 1.0, "norm_adv": False}
    agent = BlackjackAgent(model, tokenizer, "cpu", {"max_new_tokens": 2}, config)
    agent.action_names = ["stick", "hit"]
    stats = play_updates(agent, 2, batch_size=2)
    for (buf, kl, kl_coef, metrics), update in zip(prepared, stats, strict=True):
        assert kl_coef == coef and update["train/kl_coef"] == coef
        next_value = torch.zeros(len(buf.terminated))  # Blackjack terminates every episode
        expected, _ = ppo.compute_gae(
            buf.rewards - coef * kl, buf.old_values, buf.turn_mask, next_value, buf.terminated, 1.0, 1.0
        )
        torch.testing.assert_close(buf.advantages, expected, rtol=1e-5, atol=1e-6)
        assert metrics["train/kl_ref"] == update["train/kl_ref"]
    (_, first, _, _), (_, second, _, _) = prepared
    assert first.abs().max() < 1e-6, "the policy is its reference until the first update"
    # The sampled estimate log p - log p_ref of a few turns: not 0 after an update, of either sign.
    assert second.abs().sum() > 1e-4 and stats[1]["train/kl_ref"] != 0


def test_linear_lr_schedule_decays_over_total_updates(tiny_model_dir: Path) -> None:
    model, tokenizer = load(tiny_model_dir)
    config = {"batch_size": 1, "num_minibatches": 1, "update_epochs": 1, "learning_rate": 1e-3}
    agent = BlackjackAgent(
        model, tokenizer, "cpu", FAST_GENERATE, config | {"lr_schedule": "linear", "total_updates": 4}
    )
    rates = [s["train/learning_rate"] for s in play_updates(agent, 4, batch_size=1)]
    assert rates == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4], rel=1e-6)
    assert agent.imperative.optimizer.param_groups[0]["lr"] == 0.0  # after the 4th update
    constant = BlackjackAgent(*load(tiny_model_dir), "cpu", FAST_GENERATE, config)
    assert [s["train/learning_rate"] for s in play_updates(constant, 2, batch_size=1)] == [1e-3, 1e-3]
    with pytest.raises(ValueError, match=r"'linear' needs ppo_config_dict\['total_updates'\]"):
        ImperativeConfig.from_dict({"lr_schedule": "linear"})


def test_config_takes_the_lightning_modules_settings() -> None:
    """``ppo_config_dict`` takes PPOModule's training hyperparameters and the rollout's settings by
    their names, with their defaults (but the learning rate), and their range checks."""
    import inspect

    from llamagym_pl.module import PPOModule

    config = ImperativeConfig.from_dict({"ent_coef": 0.02, "kl_coef": 0.1, "invalid_penalty": -1.0})
    assert (config.ent_coef, config.kl_coef, config.invalid_penalty) == (0.02, 0.1, -1.0)
    defaults = inspect.signature(PPOModule.__init__).parameters
    for name in ("gamma", "gae_lambda", "clip_coef", "vf_coef", "update_epochs", "target_kl", "lr_schedule"):
        assert getattr(config, name) == defaults[name].default, name
    assert config.learning_rate == 1e-5 and config.policy == "generate"
    with pytest.raises(ValueError, match=r"ppo_config_dict\['gamma'\]=1.5 is outside \[0.0, 1.0\]"):
        ImperativeConfig.from_dict({"gamma": 1.5})
    with pytest.raises(ValueError, match="unknown ppo_config_dict keys"):
        ImperativeConfig.from_dict({"lora_r": 8})  # the user brings the model


def test_the_blackjack_loop_script_trains_and_evaluates(tiny_model_dir: Path, tmp_path: Path) -> None:
    """experiments/blackjack_loop.py (README: "The imperative loop") runs end to end: two PPO
    updates of the seed README's loop, then a greedy evaluation written as JSON."""
    script = Path(__file__).resolve().parents[1] / "experiments" / "blackjack_loop.py"
    spec = importlib.util.spec_from_file_location("blackjack_loop", script)
    loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loop)
    out = tmp_path / "eval.json"
    args = ["--model", str(tiny_model_dir), "--episodes", "64", "--batch-size", "32", "--eval-episodes", "20"]
    loop.main([*args, "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["episodes"] == 20 and result["train_episodes"] == 64
    assert -1.0 <= result["return_mean"] <= 1.0 and result["return_stderr"] > 0
