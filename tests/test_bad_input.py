"""Bad input, one test each: a single clear error naming the value and the fix, or a counted,
logged recovery (see :mod:`llamagym_pl.guards` and the README's "Failure modes").

CLI-level errors are checked on the parser's stderr (exit status 2) or on the exception the
in-process CLI raises; ``fit.main``/``evaluate.main`` turn the latter into one line on stderr.
"""

from __future__ import annotations

import ast
import inspect
import logging
import math
import re
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import gymnasium as gym
import lightning as L
import pytest
import torch
from run_args import tiny_run_args
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

import llamagym_pl
import llamagym_pl.module
from llamagym_pl import evaluate, fit
from llamagym_pl.actions import GenerateStyle
from llamagym_pl.agents import BlackjackAgent
from llamagym_pl.guards import DEBUG_ENV, ConfigError, RunAborted
from llamagym_pl.module import PPOModule
from llamagym_pl.policy import PolicyWithValueHead
from llamagym_pl.rollout import RolloutCollector
from llamagym_pl.stats import rollout_metrics
from llamagym_pl.tb import read_scalars
from llamagym_pl.tiny_model import build_tiny_model

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "blackjack-generate.yaml"
FLAKY_ENV = "LlamaGymTest/FlakyBlackjack-v0"
HANGING_ENV = "LlamaGymTest/HangingBlackjack-v0"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _short_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEBUG_ENV, raising=False)


def args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    """A tiny run: 4 envs x 4 turns, 2 minibatches, 1 epoch, logs and checkpoints under ``out``."""
    return tiny_run_args(CONFIG, model_dir, out, *extra)


def parse_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The parser's error line for ``argv`` (it exits with status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        fit.build_cli(args=argv, run_fit=False)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) <= 8, f"a parse error should be short, got:\n{err}"
    return err


def main_error(entry: Any, argv: list[str]) -> str:
    """What ``entry`` (``fit.main``/``evaluate.main``) prints before exiting with status 1."""
    with pytest.raises(SystemExit) as exit_info:
        entry(argv)
    message = exit_info.value.code
    assert isinstance(message, str), f"expected a one-line error, got exit status {message!r}"
    return message


# ----------------------------------------------------------------------------- parsing
def test_unknown_yaml_key(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  gama: 0.9\n")
    argv = args(tiny_model_dir, tmp_path)
    argv[2:2] = ["--config", str(bad)]
    err = parse_error(capsys, argv)
    assert "does not accept option 'gama'" in err and "did you mean 'model.gamma'?" in err


def test_unknown_flag(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = parse_error(capsys, args(tiny_model_dir, tmp_path, "--data.num_evns", "8"))
    assert "--data.num_evns 8" in err and "did you mean 'data.num_envs'?" in err


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [("model.learning_rate", "fast", "float"), ("data.num_envs", "2.5", "int")],
)
def test_wrong_type(
    key: str,
    value: str,
    expected: str,
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = parse_error(capsys, args(tiny_model_dir, tmp_path, f"--{key}", value))
    assert f'Parser key "{key}"' in err and f"Expected a <class '{expected}'>. Got value: {value}" in err


def test_agent_class_that_does_not_exist(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = parse_error(capsys, args(tiny_model_dir, tmp_path, "--data.agent", "my_agents.Nope"))
    assert "my_agents.Nope" in err and "No module named 'my_agents'" in err


def test_agent_class_that_is_not_an_agent(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = parse_error(capsys, args(tiny_model_dir, tmp_path, "--data.agent", "collections.OrderedDict"))
    assert "collections.OrderedDict does not correspond to a subclass of Agent" in err


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("model.gamma", "1.5", "model.gamma=1.5 is outside [0.0, 1.0]"),
        ("model.gae_lambda", "-0.1", "model.gae_lambda=-0.1 is outside [0.0, 1.0]"),
        ("model.clip_coef", "0", "model.clip_coef=0.0 must be > 0"),
        ("model.max_nonfinite_steps", "0", "model.max_nonfinite_steps=0 must be >= 1"),
        ("model.dtype", "float64", "dtype='float64' is not one of"),
        ("data.num_envs", "0", "data.num_envs=0 must be >= 1"),
        ("data.max_new_tokens", "0", "data.max_new_tokens=0 must be >= 1"),
        ("data.temperature", "0", "data.temperature=0.0 must be > 0"),
        ("data.top_k", "40", "data.top_k=40 samples from a truncated distribution that PPO never scores"),
        ("data.top_p", "0.9", "data.top_p=0.9 samples from a truncated distribution that PPO never scores"),
        ("data.max_env_errors", "-1", "data.max_env_errors=-1 must be >= 0"),
        ("data.max_prompt_tokens", "0", "data.max_prompt_tokens=0 must be >= 1"),
        ("model.num_minibatches", "17", "model.num_minibatches=17 is more than a rollout can have"),
    ],
)
def test_out_of_range_value(
    flag: str, value: str, message: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError) as err:
        fit.build_cli(args=args(tiny_model_dir, tmp_path, f"--{flag}", value), run_fit=False)
    assert message in str(err.value)


def test_main_prints_a_config_error_as_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    message = main_error(fit.main, args(tiny_model_dir, tmp_path, "--model.gamma", "1.5"))
    assert message.startswith("llamagym_pl.fit: error: model.gamma=1.5 is outside [0.0, 1.0]")
    assert "Traceback" not in message and DEBUG_ENV in message


HALF_FIX = (
    "use dtype: float32 with trainer.precision: bf16-mixed (fp32 master weights, the activations in "
    "bf16) or LoRA (lora_r > 0)"
)


@pytest.fixture(scope="module")
def bf16_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved in bfloat16, so ``dtype: auto`` resolves to half precision."""
    model_dir = tmp_path_factory.mktemp("bf16") / "tiny-bf16"
    shutil.copytree(tiny_model_dir, model_dir)
    AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).save_pretrained(model_dir)
    return model_dir


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "auto"])
def test_full_finetuning_in_half_precision_is_refused(
    dtype: str, tiny_model_dir: Path, bf16_model_dir: Path, tmp_path: Path
) -> None:
    """AdamW's small steps round away on half-precision weights: with lr 1e-5, 10 steps changed
    15% of the tiny model's bf16 weights at all."""
    model_dir = bf16_model_dir if dtype == "auto" else tiny_model_dir
    message = main_error(fit.main, args(model_dir, tmp_path, "--model.dtype", dtype))
    line, hint = message.splitlines()
    shown = "dtype='auto' (the checkpoint's bfloat16)" if dtype == "auto" else f"dtype={dtype!r}"
    assert line.startswith(f"llamagym_pl.fit: error: {shown} with lora_r=0 (full fine-tuning)")
    assert line.endswith(HALF_FIX) and DEBUG_ENV in hint


def test_lora_on_a_half_precision_base_is_allowed(tiny_model_dir: Path, tmp_path: Path) -> None:
    argv = args(tiny_model_dir, tmp_path, "--model.dtype", "bfloat16", "--model.lora_r", "4")
    trainable = [p for p in fit.build_cli(args=argv, run_fit=False).model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)


def test_imperative_loop_refuses_half_precision_trainable_weights(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    agent = BlackjackAgent(model, AutoTokenizer.from_pretrained(tiny_model_dir), "cpu")
    with pytest.raises(ValueError) as err:
        agent.act((12, 3, 0))
    message = str(err.value)
    assert "\n" not in message and "torch.bfloat16" in message
    assert "load the model in float32" in message and "LoRA adapter whose weights are float32" in message


def test_more_minibatches_than_the_rollout_has_episodes(tiny_model_dir: Path, tmp_path: Path) -> None:
    # 16 turns fit 16 episodes only if every episode lasts one turn; this rollout has fewer. Without
    # a prompt budget: with one (the YAML's), every later turn is a row of its own.
    argv = args(tiny_model_dir, tmp_path, "--model.num_minibatches", "16", "--data.max_prompt_tokens", "null")
    with pytest.raises(ValueError, match=r"fewer than num_minibatches=16; lower model.num_minibatches"):
        fit.build_cli(args=argv)


def test_unknown_env_id(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot make env 'Blackjak-v1'.*Check data.env_id"):
        fit.build_cli(args=args(tiny_model_dir, tmp_path, "--data.env_id", "Blackjak-v1"), run_fit=False)


def test_wrong_env_kwargs(tiny_model_dir: Path, tmp_path: Path) -> None:
    argv = args(tiny_model_dir, tmp_path, "--data.env_kwargs", "{natrual: false}")
    with pytest.raises(ValueError, match=r"env 'Blackjack-v1' rejected env_kwargs=\{'natrual': False\}"):
        fit.build_cli(args=argv, run_fit=False)


def test_missing_model_directory(tiny_model_dir: Path, tmp_path: Path) -> None:
    argv = args(tiny_model_dir, tmp_path, "--model.name_or_path", str(tmp_path / "no-model"))
    with pytest.raises(OSError, match=r"could not load model '.*no-model'.*no such local directory"):
        fit.build_cli(args=argv, run_fit=False)


def test_missing_hub_model_offline_fails_fast(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = args(tiny_model_dir, tmp_path, "--model.name_or_path", "nobody/no-such-model")
    with pytest.raises(OSError) as err:
        fit.build_cli(args=argv, run_fit=False)
    assert "'nobody/no-such-model'" in str(err.value) and "HF_HUB_OFFLINE=1" in str(err.value)
    assert "cache" in str(err.value)  # where it looked


def test_tokenizer_without_chat_template(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "chat_template.jinja").unlink()
    with pytest.raises(ConfigError, match=r"has no chat template; use an instruct/chat model"):
        fit.build_cli(args=args(model_dir, tmp_path, "--model.name_or_path", str(model_dir)), run_fit=False)


def test_remote_code_is_off_unless_asked(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert inspect.signature(PPOModule).parameters["trust_remote_code"].default is False
    cli = fit.build_cli(args=args(tiny_model_dir, tmp_path), run_fit=False)
    assert cli.model.hparams.trust_remote_code is False


# ----------------------------------------------------------------------------- rollouts
class ScriptedAgent(BlackjackAgent):
    """``extract_action`` returns ``reply`` (or raises it, if it is an exception)."""

    def __init__(self, reply: Any) -> None:
        super().__init__()
        self.reply = reply

    def extract_action(self, response: str) -> Any:
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply


class FaultyEnv(gym.Wrapper):
    """Blackjack whose ``step`` raises, or returns ``bad_reward``, on every ``every``-th call."""

    def __init__(self, env: gym.Env, every: int = 3, bad_reward: float | None = None, reset_fails: int = 0):
        super().__init__(env)
        self.every, self.bad_reward, self.reset_fails = every, bad_reward, reset_fails
        self.steps = 0
        self.reset_seeds: list[int | None] = []

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self.reset_seeds.append(seed)
        if len(self.reset_seeds) <= self.reset_fails:
            raise ConnectionError("simulated env server down")
        return self.env.reset(seed=seed, options=options)

    def step(self, action: Any):
        self.steps += 1
        if self.steps % self.every:
            return self.env.step(action)
        if self.bad_reward is None:
            raise RuntimeError("simulated env crash")
        obs, _, terminated, truncated, info = self.env.step(action)
        return obs, self.bad_reward, terminated, truncated, info


def make_flaky(every: int = 3, **blackjack_kwargs: Any) -> gym.Env:
    return FaultyEnv(gym.make("Blackjack-v1", **blackjack_kwargs), every=every)


gym.register(FLAKY_ENV, entry_point=make_flaky)


def collector(agent: Any = None, num_envs: int = 4, **kwargs: Any) -> RolloutCollector:
    return RolloutCollector(
        "Blackjack-v1", None, agent or BlackjackAgent(), num_envs, GenerateStyle(max_new_tokens=4), **kwargs
    )


def play(
    c: RolloutCollector, policy: PolicyWithValueHead, tokenizer: PreTrainedTokenizerBase, steps: int = 4
):
    return c.collect(policy, tokenizer, seed=0, epoch=0, steps_per_env=steps)


@pytest.mark.parametrize(
    "reply", [ValueError("no action"), 7, "hit", None], ids=["raises", "7", "str", "None"]
)
def test_invalid_extract_action_is_counted(
    reply: Any, tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    stats = play(collector(ScriptedAgent(reply)), tiny_policy, tiny_tokenizer)
    assert all(all(ep.invalid) for ep in stats.episodes)
    assert rollout_metrics(stats)["rollout/invalid_action_rate"] == 1.0


def test_format_observation_returning_non_text(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    class NumberAgent(BlackjackAgent):
        def format_observation(self, observation: Any) -> Any:
            return observation[0]

    with pytest.raises(TypeError, match=r"NumberAgent.format_observation returned int .* must return"):
        play(collector(NumberAgent()), tiny_policy, tiny_tokenizer)


def test_empty_generation_is_an_invalid_action(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    # With one new token, always eos, every reply is empty. The eos logit is raised in the model
    # itself: its generation_config (forced_eos_token_id) no longer reaches rollouts (issue #12).
    eos = torch.tensor([tiny_tokenizer.eos_token_id])
    head = tiny_policy.lm.get_output_embeddings()
    head.register_forward_hook(lambda module, args, logits: logits.index_fill(-1, eos, 1e4))
    c = RolloutCollector("Blackjack-v1", None, BlackjackAgent(), 4, GenerateStyle(max_new_tokens=1))
    stats = play(c, tiny_policy, tiny_tokenizer)
    assert {r for ep in stats.episodes for r in ep.responses} == {""}
    assert rollout_metrics(stats)["rollout/invalid_action_rate"] == 1.0


def test_env_step_raising_drops_the_episode_and_counts_it(
    tiny_policy: PolicyWithValueHead,
    tiny_tokenizer: PreTrainedTokenizerBase,
    caplog: pytest.LogCaptureFixture,
) -> None:
    c = collector()
    c.envs = [FaultyEnv(env, every=3) for env in c.envs]
    with caplog.at_level(logging.WARNING):
        stats = play(c, tiny_policy, tiny_tokenizer, steps=6)
    assert stats.env_errors == 4 * 2  # steps 3 and 6 of each env
    assert rollout_metrics(stats)["rollout/env_errors"] == 8.0
    assert "simulated env crash" in caplog.text and "episode dropped" in caplog.text
    # Each env played its 6 turns, less those of the dropped episodes.
    assert sum(ep.num_turns for ep in stats.episodes) <= 4 * 6 - 8
    # After a fault the env is reset with its next derived seed: no seed is used twice.
    seeds = [s for env in c.envs for s in env.reset_seeds]
    assert len(seeds) == len(set(seeds))


@pytest.mark.parametrize("limit", [0, 3])
def test_too_many_env_faults_abort_the_rollout(
    limit: int, tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    c = collector(max_env_errors=limit)
    c.envs = [FaultyEnv(env, every=1) for env in c.envs]
    with pytest.raises(RunAborted) as err:
        play(c, tiny_policy, tiny_tokenizer)
    assert f"failed {limit + 1} times in one rollout, more than data.max_env_errors={limit}" in str(err.value)
    assert "RuntimeError: simulated env crash" in str(err.value)
    assert isinstance(err.value.__cause__, RuntimeError)


def test_env_reset_raising_retries_with_the_next_seed(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    c = collector(num_envs=2)
    c.envs = [FaultyEnv(env, every=10**9, reset_fails=1) for env in c.envs]
    stats = play(c, tiny_policy, tiny_tokenizer)
    assert stats.env_errors == 2
    assert all(len(set(env.reset_seeds)) == len(env.reset_seeds) >= 2 for env in c.envs)


class HangingEnv(gym.Wrapper):
    """Blackjack whose ``step`` or ``reset`` sleeps forever on its ``at``-th call."""

    def __init__(self, env: gym.Env, where: str, at: int) -> None:
        super().__init__(env)
        self.where, self.at = where, at
        self.calls = 0
        self.reset_seeds: list[int | None] = []

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self.reset_seeds.append(seed)
        self.hang_on("reset")
        return self.env.reset(seed=seed, options=options)

    def step(self, action: Any):
        self.hang_on("step")
        return self.env.step(action)

    def hang_on(self, where: str) -> None:
        if where == self.where:
            self.calls += 1
            if self.calls == self.at:
                time.sleep(10**6)


@pytest.mark.parametrize("where", ["step", "reset"])
def test_env_that_hangs_is_a_fault_after_env_timeout_s(
    where: str, tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    c = collector(num_envs=2, env_timeout_s=0.5)
    c.envs = [HangingEnv(c.envs[0], where, at=2), c.envs[1]]
    start = time.perf_counter()
    stats = play(c, tiny_policy, tiny_tokenizer)
    assert time.perf_counter() - start < 30  # the hang cost 0.5 s, not 10**6
    assert stats.env_errors == 1
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL  # the handler is put back
    if where == "reset":  # retried with the next seed, as a reset that raises
        assert len(set(c.envs[0].reset_seeds)) == len(c.envs[0].reset_seeds) >= 3


def make_hanging(**blackjack_kwargs: Any) -> gym.Env:
    return HangingEnv(gym.make("Blackjack-v1", **blackjack_kwargs), "step", at=3)


gym.register(HANGING_ENV, entry_point=make_hanging)


def test_env_timeout_in_training(tiny_model_dir: Path, tmp_path: Path) -> None:
    argv = args(tiny_model_dir, tmp_path, "--data.env_id", HANGING_ENV, "--data.env_timeout_s", "0.5")
    cli = fit.build_cli(args=argv)
    errors = read_scalars(cli.trainer.logger.log_dir)["rollout/env_errors"]
    assert [v for _, v in errors] == [4.0]  # the third step of each of 4 envs


def test_env_hanging_past_max_env_errors_aborts_naming_the_timeout(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    c = collector(num_envs=1, env_timeout_s=0.2, max_env_errors=0)
    c.envs = [HangingEnv(c.envs[0], "step", at=1)]
    with pytest.raises(RunAborted) as err:
        play(c, tiny_policy, tiny_tokenizer)
    assert "failed 1 times in one rollout, more than data.max_env_errors=0; last in step(" in str(err.value)
    assert "EnvTimeout: step(" in str(err.value)
    assert "of env 0 took longer than data.env_timeout_s=0.2" in str(err.value)


def test_env_timeout_outside_the_main_thread_is_refused(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    c = collector(num_envs=1, env_timeout_s=1.0)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(play, c, tiny_policy, tiny_tokenizer)
        with pytest.raises(ConfigError, match=r"data.env_timeout_s=1.0 works in the main thread only"):
            future.result()


def test_env_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"data.env_timeout_s=0 must be > 0 \(or null: no limit\)"):
        collector(env_timeout_s=0)


@pytest.mark.parametrize("bad_reward", [math.nan, math.inf])
def test_non_finite_reward_drops_the_episode_and_counts_it(
    bad_reward: float, tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    c = collector()
    c.envs = [FaultyEnv(env, every=2, bad_reward=bad_reward) for env in c.envs]
    stats = play(c, tiny_policy, tiny_tokenizer)
    assert stats.env_errors == 4 * 2
    assert all(math.isfinite(r) for ep in stats.episodes for r in ep.rewards)


def test_prompt_longer_than_the_model_context(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    tiny_policy.lm.config.max_position_embeddings = 16
    with pytest.raises(
        ConfigError, match=r"a prompt of \d+ tokens plus data.max_new_tokens=4 exceeds the model's "
    ):
        play(collector(), tiny_policy, tiny_tokenizer)


def test_env_faults_in_training_are_logged_or_abort_in_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    cli = fit.build_cli(args=args(tiny_model_dir, tmp_path / "ok", "--data.env_id", FLAKY_ENV))
    errors = read_scalars(cli.trainer.logger.log_dir)["rollout/env_errors"]
    assert [v for _, v in errors] == [4.0]  # steps 3 of each of 4 envs (4 steps each)
    argv = args(tiny_model_dir, tmp_path / "abort", "--data.env_id", FLAKY_ENV, "--data.max_env_errors", "2")
    message = main_error(fit.main, argv)
    assert message.startswith(f"llamagym_pl.fit: error: env '{FLAKY_ENV}' failed 3 times in one rollout")


# ----------------------------------------------------------------------------- losses
def nan_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    real = llamagym_pl.module.minibatch_loss

    def poisoned(*a: Any, **kw: Any):
        loss, metrics = real(*a, **kw)
        return loss * math.nan, metrics

    monkeypatch.setattr(llamagym_pl.module, "minibatch_loss", poisoned)


def test_non_finite_loss_skips_the_update(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    nan_loss(monkeypatch)
    argv = args(tiny_model_dir, tmp_path, "--trainer.max_epochs", "2", "--model.max_nonfinite_steps", "5")
    cli = fit.build_cli(args=argv, run_fit=False)
    before = {k: v.clone() for k, v in cli.model.policy.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        fit.fit(cli)
    assert "update skipped" in caplog.text
    for name, value in cli.model.policy.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    skipped = read_scalars(cli.trainer.logger.log_dir)["train/nonfinite_steps"]
    assert [v for _, v in skipped] == [2.0, 2.0]


def test_non_finite_losses_in_a_row_abort(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nan_loss(monkeypatch)
    message = main_error(fit.main, args(tiny_model_dir, tmp_path, "--trainer.max_epochs", "2"))
    assert "the loss was non-finite (nan) in 3 minibatches in a row (model.max_nonfinite_steps=3)" in message


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``last.ckpt`` of a 1-epoch run of a tiny model of another width (32, not 64)."""
    out = tmp_path_factory.mktemp("other")
    model_dir = build_tiny_model(out / "model", hidden_size=32)
    fit.build_cli(args=args(model_dir, out))
    return out / "ckpt" / "last.ckpt"


def test_fit_from_a_checkpoint_that_does_not_exist(tiny_model_dir: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.ckpt")
    message = main_error(fit.main, args(tiny_model_dir, tmp_path, "--ckpt_path", missing))
    assert f"ckpt_path '{missing}' does not exist; pass a .ckpt file" in message


def test_evaluate_a_checkpoint_that_does_not_exist(tiny_model_dir: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.ckpt")
    message = main_error(evaluate.main, args(tiny_model_dir, tmp_path, "--ckpt_path", missing))
    assert f"checkpoint '{missing}' does not exist" in message


def test_resume_from_a_checkpoint_of_another_model(
    other_checkpoint: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as err:
        fit.build_cli(args=args(tiny_model_dir, tmp_path, "--ckpt_path", str(other_checkpoint)))
    message = str(err.value)
    assert f"checkpoint '{other_checkpoint}' does not fit this model" in message
    assert re.search(r"embed_tokens.weight: \(\d+, 32\) in the checkpoint, \(\d+, 64\) here", message)
    assert f"model.name_or_path='{other_checkpoint.parents[1] / 'model'}'" in message


def test_evaluate_a_checkpoint_of_another_model(
    other_checkpoint: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    message = main_error(evaluate.main, args(tiny_model_dir, tmp_path, "--ckpt_path", str(other_checkpoint)))
    assert f"checkpoint '{other_checkpoint}' does not fit this model" in message


def write_bad_checkpoint(kind: str, other: Path, model_dir: Path, out: Path) -> Path:
    """A file that ``--ckpt_path`` cannot resume from, of ``kind``."""
    path = out / f"{kind}.ckpt"
    if kind == "truncated":  # a copy cut short
        data = other.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not-a-checkpoint":  # e.g. the config passed by mistake
        shutil.copy(CONFIG, path)
    elif kind == "plain-state-dict":  # torch.save(model.state_dict())
        torch.save(AutoModelForCausalLM.from_pretrained(model_dir).state_dict(), path)
    elif kind == "weights-only":  # a Lightning checkpoint saved with save_weights_only
        checkpoint = torch.load(other, weights_only=True)
        del checkpoint["optimizer_states"], checkpoint["lr_schedulers"]
        torch.save(checkpoint, path)
    return path


BAD_CHECKPOINTS = {
    "truncated": "cannot be read (PytorchStreamReader failed reading zip archive: failed finding central "
    "directory",
    "empty": "cannot be read",
    "not-a-checkpoint": "cannot be read",
    "plain-state-dict": "is not a Lightning checkpoint (a dict of",
    "weights-only": "holds weights only (no optimizer state",
}


@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS))
def test_resume_from_a_torn_or_foreign_file(
    kind: str, other_checkpoint: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = write_bad_checkpoint(kind, other_checkpoint, tiny_model_dir, tmp_path)
    monkeypatch.setattr(L.Trainer, "fit", lambda *a, **k: pytest.fail("training started"))
    message = main_error(fit.main, args(tiny_model_dir, tmp_path, "--ckpt_path", str(bad)))
    assert message.startswith(f"llamagym_pl.fit: error: checkpoint '{bad}' {BAD_CHECKPOINTS[kind]}"), message
    assert "pass a whole .ckpt written by llamagym_pl.fit" in message
    assert len(message.splitlines()) == 2  # the line, and how to get the traceback


def test_resume_last_when_last_ckpt_is_torn(
    other_checkpoint: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "ckpt").mkdir()
    torn = tmp_path / "ckpt" / "last.ckpt"
    torn.write_bytes(other_checkpoint.read_bytes()[:1000])
    message = main_error(fit.main, args(tiny_model_dir, tmp_path, "--ckpt_path", "last"))
    assert f"checkpoint '{torn}' cannot be read" in message


def test_resume_from_another_model_is_one_line_before_training(
    other_checkpoint: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(L.Trainer, "fit", lambda *a, **k: pytest.fail("training started"))
    message = main_error(fit.main, args(tiny_model_dir, tmp_path, "--ckpt_path", str(other_checkpoint)))
    expected = f"llamagym_pl.fit: error: checkpoint '{other_checkpoint}' does not fit this model"
    assert message.startswith(expected), message


class Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("entry", [fit.main, evaluate.main])
def test_checkpoints_load_with_weights_only(entry: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    marker, evil = tmp_path / "pwned", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Payload(marker)}, evil)
    message = main_error(entry, args(tiny_model_dir, tmp_path, "--ckpt_path", str(evil)))
    assert f"checkpoint '{evil}' holds pickled objects that loading with weights_only=True refuses" in message
    assert not marker.exists()


def test_no_eval_or_exec_in_the_package() -> None:
    for path in Path(llamagym_pl.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("eval", "exec", "compile"), f"{path}:{node.lineno}"
