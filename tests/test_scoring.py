"""Action scoring (``data.policy: score``): candidate distributions against direct forwards,
one prompt encoding per step, greedy argmax, PPO at ratio 1, and a fit through the CLI."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gymnasium as gym
import pytest
import torch
from model_helpers import FAMILIES, SYSTEM, build_family_model
from transformers import PreTrainedTokenizerBase

from llamagym_pl.actions import ScoreStyle
from llamagym_pl.actions.candidates import (
    candidate_batch,
    candidate_minibatch,
    prompt_logits,
    turn_distribution,
)
from llamagym_pl.actions.scoring import candidate_forward, candidate_logprob_sums, shared_prefix_length
from llamagym_pl.agent import Agent
from llamagym_pl.agents import BlackjackAgent
from llamagym_pl.buffer import build_buffer
from llamagym_pl.chat import build_messages, render
from llamagym_pl.fit import build_cli
from llamagym_pl.loading import build_policy, load_tokenizer
from llamagym_pl.policy import PolicyWithValueHead
from llamagym_pl.rollout import RolloutCollector
from llamagym_pl.spans import encode_candidates, encode_episode
from llamagym_pl.tb import read_scalars
from llamagym_pl.tiny_model import CACHE_ENV
from llamagym_pl.update import minibatch_loss, prepare_rollout

ENV, KWARGS = "Blackjack-v1", {"natural": False, "sab": False}
OBS = ["your sum is 14 . the dealer shows 10 .", "your sum is 19 ."]
# Different token and word counts, so the three normalizations differ.
CANDIDATES = [["stick", "hit", "hit the deck again"], ["stand", "hit"]]
NORMALIZATIONS = ("token", "word", "sum")


def conversations(tokenizer: PreTrainedTokenizerBase) -> list[list[dict[str, str]]]:
    """Two prompts of different lengths (the batch is left padded): after one and two turns."""
    return [build_messages(tokenizer, SYSTEM, OBS[:1], []), build_messages(tokenizer, SYSTEM, OBS, ["hit"])]


def direct_distribution(
    policy: PolicyWithValueHead, tokenizer, conversation, candidates: list[str], normalization: str, raw=False
) -> torch.Tensor:
    """By hand: one unpadded forward per candidate, log-softmax (or raw logits), normalized, softmax."""
    prompt = tokenizer(render(tokenizer, conversation, True), add_special_tokens=False)["input_ids"]
    scores = []
    for text in candidates:
        reply = render(tokenizer, [*conversation, {"role": "assistant", "content": text}], False).rstrip()
        ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
        cand = ids[len(prompt) :]
        with torch.no_grad():
            logits = policy.lm(input_ids=torch.tensor([ids])).logits[0].double()  # (L, V)
        table = logits if raw else torch.log_softmax(logits, -1)
        total = sum(table[len(prompt) + j - 1, tok] for j, tok in enumerate(cand))
        scores.append(total / {"sum": 1, "token": len(cand), "word": len(text.split())}[normalization])
    return torch.softmax(torch.stack(scores), 0).float()


def scored_distributions(policy, tokenizer, normalization: str) -> list[torch.Tensor]:
    """The library's distributions, from the KV-cached rollout path (one padded (2, 3) batch)."""
    encoded = encode_candidates(tokenizer, conversations(tokenizer), CANDIDATES)
    sums = candidate_logprob_sums(policy, encoded, tokenizer.pad_token_id)  # (5,)
    logits = prompt_logits(sums, encoded, CANDIDATES, normalization)  # (2, 3)
    probs = torch.softmax(logits, -1)
    assert probs[1, 2] == 0  # the second turn has two candidates: its third slot is masked
    return [p[: len(c)] for p, c in zip(probs, CANDIDATES, strict=True)]


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_candidate_distribution_equals_direct_forwards(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase, normalization: str
) -> None:
    policy = tiny_policy.eval()
    got = scored_distributions(policy, tiny_tokenizer, normalization)
    for conv, cands, probs in zip(conversations(tiny_tokenizer), CANDIDATES, got, strict=True):
        expected = direct_distribution(policy, tiny_tokenizer, conv, cands, normalization)
        torch.testing.assert_close(probs, expected, rtol=0, atol=1e-5)
        # lamorel's bug, summing raw logits, gives another distribution.
        raw = direct_distribution(policy, tiny_tokenizer, conv, cands, normalization, raw=True)
        assert (probs - raw).abs().max() > 1e-3


def common_prefix(encoded) -> int:
    """The tokens two prompts share at their start, by hand, leaving the shorter one a token."""
    a, b = (e.prompt_ids for e in encoded)
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return n


def test_shared_prefix_length_by_hand() -> None:
    pad = 0
    ids = torch.tensor([[5, 6, 7, 8, 9], [pad, pad, 5, 6, 3], [pad, 5, 6, 7, 4]])
    mask = (torch.arange(5) >= torch.tensor([[0], [2], [1]])).long()
    assert shared_prefix_length(ids, mask) == 2  # 5 6
    assert shared_prefix_length(ids[[0, 2]], mask[[0, 2]]) == 3  # 5 6 7
    # A prompt that is all prefix keeps its last token: [5 6] vs [5 6 7 ...] shares only 1.
    short = torch.tensor([[pad, pad, pad, 5, 6], [5, 6, 7, 8, 9]])
    assert shared_prefix_length(short, (short != pad).long()) == 1
    assert shared_prefix_length(ids[:1], mask[:1]) == 0  # nothing to share with
    assert shared_prefix_length(torch.tensor([[1, 2], [3, 2]]), torch.ones(2, 2, dtype=torch.long)) == 0


def test_shared_prompt_and_whole_row_forwards_agree(tiny_model_dir: Path, tiny_tokenizer) -> None:
    """Training encodes each prompt once and runs the candidates on its KV cache; with gradient
    checkpointing (no cache in training) whole prompt + candidate rows give the same log-probs,
    values and gradients."""
    encoded = encode_candidates(tiny_tokenizer, conversations(tiny_tokenizer), CANDIDATES)
    batch = candidate_batch(encoded, tiny_tokenizer.pad_token_id)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        policy = build_policy(str(tiny_model_dir), gradient_checkpointing=checkpointing).train()
        calls: list[torch.Size] = []

        def record(module, args, kwargs, out, calls=calls) -> None:
            calls.append(kwargs["input_ids"].shape)

        hook = policy.lm.register_forward_hook(record, with_kwargs=True)
        sums, values = candidate_forward(policy, batch)  # (5,), (2,)
        hook.remove()
        (sums.sum() + values.sum()).backward()
        grad = policy.lm.get_input_embeddings().weight.grad.clone()
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        results.append((sums.detach(), values.detach(), grad, calls))
    (sums, values, grad, calls), (row_sums, row_values, row_grad, row_calls) = results
    longest = max(len(c) for e in encoded for c in e.candidate_ids)
    prompt_len = max(len(e.prompt_ids) for e in encoded)
    shared = common_prefix(encoded)
    # The shared prefix, each prompt's rest, then the candidates' remaining tokens on the cache.
    assert calls == [(1, shared), (2, prompt_len - shared), (5, longest - 1)]
    assert row_calls == [(5, prompt_len + longest)]  # every candidate with its whole prompt
    torch.testing.assert_close(row_sums, sums, rtol=0, atol=1e-5)
    torch.testing.assert_close(row_values, values, rtol=0, atol=1e-5)
    torch.testing.assert_close(row_grad, grad, rtol=1e-3, atol=1e-5)
    # The value is read at the prompt's last token, as from the episode sequence.
    with torch.no_grad():
        for n, e in enumerate(encoded):
            ids = torch.tensor([e.prompt_ids])
            _, v = policy.eval()(ids, torch.ones_like(ids))
            assert math.isclose(float(v[0, -1]), float(values[n]), abs_tol=1e-5)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer: PreTrainedTokenizerBase = request.getfixturevalue(FAMILIES[request.param])
    return build_family_model(request.param, tokenizer, tmp_path_factory.mktemp(request.param))


def assert_cached_equals_direct(policy: PolicyWithValueHead, tokenizer) -> None:
    """The KV-cached distributions equal one unpadded forward per candidate ("token" normalization)."""
    got = scored_distributions(policy, tokenizer, "token")
    for conv, cands, probs in zip(conversations(tokenizer), CANDIDATES, got, strict=True):
        torch.testing.assert_close(
            probs, direct_distribution(policy, tokenizer, conv, cands, "token"), rtol=0, atol=1e-5
        )


def test_cached_scoring_and_spans_on_real_architectures(family_dir: Path) -> None:
    """Left padding, position ids and the reused KV cache are right for Llama, Qwen3, Gemma, GPT-2
    (absolute positions), and the candidate spans are encode_episode's reply spans."""
    tokenizer = load_tokenizer(str(family_dir))
    policy = build_policy(str(family_dir)).eval()
    assert_cached_equals_direct(policy, tokenizer)
    encoded = encode_candidates(tokenizer, conversations(tokenizer)[:1], [["hit", "stick"]])[0]
    for text, span in zip(["hit", "stick"], encoded.candidate_ids, strict=True):
        enc = encode_episode(tokenizer, SYSTEM, OBS[:1], [text])
        assert [t for t, m in zip(enc.input_ids, enc.action_mask, strict=True) if m] == span
        assert enc.value_positions == [len(encoded.prompt_ids) - 1]


def test_prompt_is_encoded_once_per_step(tiny_policy: PolicyWithValueHead, tiny_tokenizer) -> None:
    shapes: list[tuple[int, ...]] = []
    hook = tiny_policy.lm.register_forward_pre_hook(
        lambda _module, _args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        encoded = encode_candidates(tiny_tokenizer, conversations(tiny_tokenizer), CANDIDATES)
        candidate_logprob_sums(tiny_policy, encoded, tiny_tokenizer.pad_token_id)
        prompt_len = max(len(e.prompt_ids) for e in encoded)
        longest = max(len(c) for e in encoded for c in e.candidate_ids)
        shared = common_prefix(encoded)
        # The shared prefix once, the 2 prompts' rest once, then the 5 candidates' remaining
        # tokens on the cache: 3 calls.
        assert shapes == [(1, shared), (2, prompt_len - shared), (5, longest - 1)]
        shapes.clear()
        collector = scoring_collector(ENV, KWARGS, BlackjackAgent(), 4)
        collector.collect(tiny_policy, tiny_tokenizer, seed=0, epoch=0, steps_per_env=1)
        # Each step: the system prompt, the B observations, then B x 2 candidates' end of turn.
        # The first has all 4 envs; hands still running after it play on in smaller batches.
        sizes = [s[0] for s in shapes]
        steps = [sizes[k : k + 3] for k in range(0, len(sizes), 3)]
        assert steps[0] == [1, 4, 8]
        assert all(step == [1, step[1], 2 * step[1]] for step in steps)
    finally:
        hook.remove()


def scoring_collector(env_id: str, env_kwargs, agent: Agent, num_envs: int, **style: Any) -> RolloutCollector:
    return RolloutCollector(env_id, env_kwargs, agent, num_envs, ScoreStyle(agent, **style))


def collect(policy, tokenizer, greedy: bool, seed: int = 0, normalization: str = "token"):
    collector = scoring_collector(ENV, KWARGS, BlackjackAgent(), 8, normalization=normalization)
    return collector.collect(policy, tokenizer, seed=seed, epoch=0, steps_per_env=4, greedy=greedy).episodes


def encoded_turns(tokenizer, episodes, normalization: str):
    """The rollout buffer of ``episodes`` with their candidate turns, and the score style."""
    style = ScoreStyle(BlackjackAgent(), normalization)
    buf = build_buffer(tokenizer, episodes)
    style.encode(tokenizer, episodes, buf)
    return buf, style


def test_greedy_is_argmax_and_sampling_is_seeded(tiny_policy: PolicyWithValueHead, tiny_tokenizer) -> None:
    episodes = collect(tiny_policy, tiny_tokenizer, greedy=True, normalization="sum")
    buf, _ = encoded_turns(tiny_tokenizer, episodes, "sum")
    batch = candidate_minibatch(buf, list(range(len(buf.actions))))
    with torch.no_grad():
        logits = turn_distribution(batch, candidate_forward(tiny_policy.eval(), batch)[0], "sum")  # (N, 2)
    margin = (logits[:, 0] - logits[:, 1]).abs()
    assert (margin > 1e-4).all(), "near-ties make argmax ambiguous under float noise"
    torch.testing.assert_close(buf.actions.chosen, logits.argmax(-1), rtol=0, atol=0)
    for ep in episodes:  # the chosen name is the reply and plays its index
        assert ep.responses == [c[k] for c, k in zip(ep.candidates, ep.chosen, strict=True)]
        assert not any(ep.invalid)
    sampled = collect(tiny_policy, tiny_tokenizer, greedy=False)
    assert sampled == collect(tiny_policy, tiny_tokenizer, greedy=False)
    assert sampled != collect(tiny_policy, tiny_tokenizer, greedy=False, seed=1)


def test_ppo_at_ratio_one(tiny_policy: PolicyWithValueHead, tiny_tokenizer) -> None:
    policy = tiny_policy.eval()
    episodes = collect(policy, tiny_tokenizer, greedy=False)
    buf, style = encoded_turns(tiny_tokenizer, episodes, "word")
    prepare_rollout(policy, buf, style, gamma=1.0, gae_lambda=0.95, batch_size=5, norm_adv=False)  # chunks
    turns = buf.actions
    # The chosen log-prob of a few turns, by hand.
    for n in (0, 3, len(turns) - 1):
        e, t = int(turns.turn_episode[n]), int(turns.turn_step[n])
        ep = episodes[e]
        conv = build_messages(tiny_tokenizer, ep.system_prompt, ep.observations[: t + 1], ep.responses[:t])
        probs = direct_distribution(policy, tiny_tokenizer, conv, ep.candidates[t], "word")
        assert math.isclose(float(buf.old_logprobs[n]), math.log(probs[ep.chosen[t]]), abs_tol=1e-5)
    batch = candidate_minibatch(buf, list(range(len(turns))))
    loss, metrics = minibatch_loss(style, policy, batch, 0.2, True, 0.5, 0.0)
    torch.testing.assert_close(metrics["train/policy_loss"], -batch["advantages"].mean(), rtol=0, atol=1e-5)
    assert float(metrics["train/approx_kl"]) < 1e-8 and float(metrics["train/clipfrac"]) == 0.0
    # Values from the turn rows equal those read from the episode sequences.
    value_loss = 0.5 * ((batch["old_values"] - batch["returns"]) ** 2).mean()
    torch.testing.assert_close(metrics["train/value_loss"], value_loss, rtol=0, atol=1e-5)
    assert 0 < float(metrics["train/entropy"]) <= math.log(2) + 1e-6
    loss.backward()
    assert policy.lm.get_input_embeddings().weight.grad.abs().sum() > 0


class Commands(gym.Env):
    """Three actions; only some are admissible at each step (listed in ``info``)."""

    action_space = gym.spaces.Discrete(3)
    observation_space = gym.spaces.Discrete(4)
    NAMES = ("go left", "go right", "wait")

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t = 0
        return 0, {"admissible_commands": list(self.NAMES[:2])}

    def step(self, action: int):
        self.t += 1
        info = {"admissible_commands": [self.NAMES[2], self.NAMES[int(action) % 2]]}
        return self.t, float(action == 1), self.t >= 3, False, info


class CommandAgent(Agent):
    def get_system_prompt(self) -> str:
        return "choose a move ."

    def format_observation(self, observation: Any) -> str:
        return f"step {int(observation)} ."

    def extract_action(self, response: str) -> int:
        return Commands.NAMES.index(response)


def test_candidates_from_env_info(tiny_policy: PolicyWithValueHead, tiny_tokenizer) -> None:
    gym.register("ScoringCommands-v0", entry_point=Commands)
    try:
        collector = scoring_collector("ScoringCommands-v0", None, CommandAgent(), 3)
        episodes = collector.collect(
            tiny_policy, tiny_tokenizer, seed=0, epoch=0, episodes_per_env=2
        ).episodes
    finally:
        gym.registry.pop("ScoringCommands-v0")
    assert len(episodes) == 6 and all(ep.num_turns == 3 for ep in episodes)
    for ep in episodes:
        assert ep.candidates[0] == ["go left", "go right"]
        for t in range(1, 3):  # what the previous action made admissible
            previous = Commands.NAMES.index(ep.responses[t - 1])
            assert ep.candidates[t] == ["wait", Commands.NAMES[previous % 2]]
        assert ep.env_return == sum(r == "go right" for r in ep.responses)


def test_turn_values_come_from_the_scored_prompts_and_truncation_bootstraps(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer
) -> None:
    """Score mode prepares each turn's value with the candidate forward that scores its actions
    (the value head at the prompt's last token, as the loss reads it); an episode cut by a time
    limit bootstraps from the value of its next state's prompt."""
    gym.register("ScoringCommands-v0", entry_point=Commands)
    try:
        agent = CommandAgent()
        style = ScoreStyle(agent)
        collector = RolloutCollector("ScoringCommands-v0", None, agent, 2, style, max_episode_steps=2)
        episodes = collector.collect(
            tiny_policy, tiny_tokenizer, seed=0, epoch=0, episodes_per_env=1
        ).episodes
    finally:
        gym.registry.pop("ScoringCommands-v0")
    assert all(ep.truncated and ep.num_turns == 2 for ep in episodes)
    buf = build_buffer(tiny_tokenizer, episodes)
    style.encode(tiny_tokenizer, episodes, buf)
    prepare_rollout(tiny_policy, buf, style, gamma=1.0, gae_lambda=1.0, batch_size=3, norm_adv=False)

    def value(ids: list[int]) -> float:
        with torch.no_grad():
            return float(
                tiny_policy.eval()(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[1][0, -1]
            )

    for e, ep in enumerate(episodes):
        values = [value(ids) for ids in ep.prompt_ids[: ep.num_turns]]
        torch.testing.assert_close(buf.old_values[e, :2], torch.tensor(values), rtol=0, atol=1e-5)
        bootstrap = value(ep.prompt_ids[ep.num_turns])  # the next state's prompt
        togo = [sum(ep.rewards[t:]) + bootstrap - values[t] for t in range(2)]  # gamma = lambda = 1
        torch.testing.assert_close(buf.advantages[e, :2], torch.tensor(togo), rtol=0, atol=1e-5)


def test_candidate_errors_are_specific() -> None:
    with pytest.raises(ValueError, match="no candidate actions"):
        CommandAgent().candidate_actions(0, {})
    with pytest.raises(ValueError, match="no candidate actions"):  # when built, not mid-rollout
        scoring_collector(ENV, KWARGS, CommandAgent(), 1)

    class Wrong(BlackjackAgent):
        action_names = ["stick", "hit", "double"]

    with pytest.raises(ValueError, match="names 3 actions"):
        scoring_collector(ENV, KWARGS, Wrong(), 1)
    with pytest.raises(ValueError, match="score_normalization"):
        scoring_collector(ENV, KWARGS, BlackjackAgent(), 1, normalization="mean")


def test_fit_in_score_mode(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli = build_cli(
            args=[
                "--config",
                str(Path(__file__).resolve().parents[1] / "experiments" / "blackjack.yaml"),
                "--model.name_or_path",
                str(tiny_model_dir),
                "--data.policy",
                "score",
                "--data.num_envs",
                "4",
                "--data.steps_per_env",
                "4",
                "--model.num_minibatches",
                "2",
                "--model.update_epochs",
                "1",
                "--trainer.max_epochs",
                "2",
                "--trainer.check_val_every_n_epoch",
                "2",
                "--trainer.logger.init_args.save_dir",
                str(tmp_path / "runs"),
                "--checkpoint.dirpath",
                str(tmp_path / "ckpt"),
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.enable_model_summary",
                "false",
                "--data.eval_episodes",
                "8",
                "--data.eval_num_envs",
                "4",
            ]  # fmt: skip
        )
    finally:
        torch.set_num_threads(threads)
    scalars = read_scalars(Path(cli.trainer.logger.log_dir))
    for tag in (
        "rollout/return_mean",
        "rollout/invalid_action_rate",
        "rollout/candidate_entropy",
        "train/policy_loss",
        "train/value_loss",
        "train/entropy",
        "train/approx_kl",
        "train/clipfrac",
        "train/explained_variance",
    ):
        values = [v for _, v in scalars[tag]]
        assert len(values) == 2 and all(math.isfinite(v) for v in values), tag
    assert [v for _, v in scalars["rollout/invalid_action_rate"]] == [0.0, 0.0]
    assert len(scalars["eval/return_mean"]) == 1
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()


def test_cached_scoring_is_exact_under_a_sliding_window(
    chatml_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    """Regression: a shared prefix laid out [prefix | padding | rest] put padding into the columns
    of Gemma 2's sliding window (8 here, shorter than the prompts), and the scores were 0.16 nats
    off. Prompts longer than a window run whole, left padded, and match one forward per candidate."""
    model_dir = build_family_model("gemma2", chatml_tokenizer, tmp_path / "gemma2")
    tokenizer = load_tokenizer(str(model_dir))
    policy = build_policy(str(model_dir)).eval()
    assert_cached_equals_direct(policy, tokenizer)
