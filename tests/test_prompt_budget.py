"""Long episodes under a prompt budget (``data.max_prompt_tokens``): the oldest turns are dropped
from what the policy sees, training encodes exactly those prompts, and GAE still runs over whole
episodes. Hand-checked buffer rows, the rollout, score mode, the imperative loop and the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import pytest
import torch
from model_helpers import turn_text
from run_args import tiny_run_args
from transformers import PreTrainedTokenizerBase

from llamagym_pl import ppo
from llamagym_pl.actions import GenerateStyle, ScoreStyle
from llamagym_pl.actions.generate import row_minibatch as minibatch
from llamagym_pl.agents import BlackjackAgent
from llamagym_pl.agents.blackjack import HIT
from llamagym_pl.buffer import build_buffer
from llamagym_pl.chat import build_messages, encode_text, fit_to_budget, render
from llamagym_pl.episode import Episode
from llamagym_pl.fit import build_cli, main
from llamagym_pl.guards import DEBUG_ENV, ConfigError
from llamagym_pl.policy import PolicyWithValueHead
from llamagym_pl.rollout import RolloutCollector
from llamagym_pl.tb import read_scalars
from llamagym_pl.update import minibatch_loss, prepare_rollout

SYSTEM = "you are an expert blackjack player ."
OBS = [f"your sum is {12 + i} ." for i in range(5)]
RESP = ["hit", "stick", "hit", "stand"]
CORRIDOR = "LlamaGymTest/Corridor-v0"
CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "blackjack.yaml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hand_episodes() -> list[Episode]:
    """A 4-turn episode that ends in a state to bootstrap from (as a truncated one does) whose
    prompts dropped turns, and a terminated one whose prompts did not."""
    return [
        # Turns 0-1 saw the whole history; turns 2-3 dropped turn 0; the next state (observation
        # 4, the bootstrap) dropped turns 0-2.
        Episode(SYSTEM, OBS, RESP, [0.5, -1.0, 0.25, 2.0], [False] * 4, 1.75, prompt_start=[0, 0, 1, 1, 3]),
        Episode(SYSTEM, OBS[:2], RESP[:2], [0.0, 1.0], [False] * 2, 1.0, terminated=True),
    ]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, ep: Episode, t: int) -> list[int]:
    """Tokens of turn ``t``'s generation prompt, as the policy saw it."""
    s = ep.prompt_start[t] if ep.prompt_start else 0
    messages = build_messages(tokenizer, ep.system_prompt, ep.observations[s : t + 1], ep.responses[s:t])
    return encode_text(tokenizer, render(tokenizer, messages, add_generation_prompt=True))


@pytest.mark.parametrize("fixture", ["tiny_tokenizer", "chatml_tokenizer", "nosystem_tokenizer"])
def test_rows_of_a_budgeted_episode_by_hand(fixture: str, request: pytest.FixtureRequest) -> None:
    tokenizer = request.getfixturevalue(fixture)
    episodes = hand_episodes()
    buf = build_buffer(tokenizer, episodes)
    # Rows: episode 0 turns 0-1 (whole history), episode 0 turns 2-3 (from observation 1, with
    # reply 1 as history), episode 1 (one row), then episode 0's bootstrap prompt alone (from
    # observation 3): it holds no turn, so it comes after every row minibatches draw from.
    assert len(buf) == 4 and buf.num_train_rows == 3
    assert buf.row_episode.tolist() == [0, 0, 1, 0]
    assert buf.row_first_turn.tolist() == [0, 2, 0, 4]
    assert buf.row_num_turns.tolist() == [2, 2, 2, 0]
    assert torch.equal(buf.train_lengths, buf.lengths[:3])
    # Turn arrays stay per episode.
    assert buf.turn_mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert buf.value_rows[buf.turn_mask].tolist() == [0, 0, 1, 1, 2, 2]
    torch.testing.assert_close(buf.rewards, torch.tensor([[0.5, -1.0, 0.25, 2.0], [0.0, 1.0, 0.0, 0.0]]))

    for e, ep in enumerate(episodes):
        for t in range(ep.num_turns):
            row, pos = int(buf.value_rows[e, t]), int(buf.value_positions[e, t])
            # The row begins with the very prompt the policy saw; the value is read on its end.
            assert buf.input_ids[row, : pos + 1].tolist() == prompt_ids(tokenizer, ep, t)
            assert turn_text(tokenizer, buf, row, t) == ep.responses[t]
            first = int((buf.turn_index[row] == t).nonzero()[0])
            assert first == pos + 1
    # Action tokens are exactly the trained turns' replies: reply 1, history in row 1, is not one.
    assert torch.equal(buf.action_mask, buf.turn_index >= 0)
    assert set(buf.turn_index[1].tolist()) == {-1, 2, 3}
    assert set(buf.turn_index[3].tolist()) == {-1}
    row1 = tokenizer.decode(buf.input_ids[1, : int(buf.lengths[1])].tolist())
    assert OBS[0] not in row1 and OBS[1] in row1 and RESP[1] in row1

    # Episode 0 bootstraps from the end of its own row (observation 4's prompt, from
    # observation 3); the terminated one from nothing.
    assert buf.bootstrap_row.tolist() == [3, 0] and buf.bootstrap_position[1] == 0
    assert int(buf.bootstrap_position[0]) == int(buf.lengths[3]) - 1
    assert buf.input_ids[3, : int(buf.lengths[3])].tolist() == prompt_ids(tokenizer, episodes[0], 4)


def test_a_prompt_start_must_keep_its_observation(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    for bad in ([0, 0, 3, 1, 3], [0, 0, 1, 1]):  # turn 2 drops itself; one start missing
        ep = Episode(SYSTEM, OBS, RESP, [0.0] * 4, [False] * 4, 0.0, prompt_start=bad)
        with pytest.raises(ValueError, match="one start per observation, each keeping its own"):
            build_buffer(tiny_tokenizer, [ep])


def test_minibatch_gathers_each_rows_own_turns(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    buf = build_buffer(tiny_tokenizer, hand_episodes())
    buf.old_logprobs = torch.zeros(buf.input_ids.shape)
    buf.advantages = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0]])
    buf.old_values = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.0, 0.0]])
    buf.returns = buf.old_values + buf.advantages
    buf.pg_advantages = buf.advantages
    mb = minibatch(buf, [1, 2])
    vp = buf.value_positions
    assert mb["turn_mask"].tolist() == [[True, True], [True, True]]
    assert mb["value_positions"].tolist() == [[vp[0, 2], vp[0, 3]], [vp[1, 0], vp[1, 1]]]
    torch.testing.assert_close(mb["old_values"], torch.tensor([[0.3, 0.4], [0.5, 0.6]]))
    torch.testing.assert_close(mb["returns"], torch.tensor([[3.3, 4.4], [5.5, 6.6]]))
    # Row 1's reply tokens carry episode 0's advantages of turns 2 and 3; nothing else does.
    for b, row in enumerate([1, 2]):
        for i in range(mb["input_ids"].shape[1]):
            turn = int(buf.turn_index[row, i])
            expected = float(buf.advantages[buf.row_episode[row], turn]) if turn >= 0 else 0.0
            assert float(mb["token_advantages"][b, i]) == expected
    mb = minibatch(buf, [0])  # a row whose turns start at 0
    assert mb["value_positions"].tolist() == [[vp[0, 0], vp[0, 1]]]


def test_values_and_logprobs_come_from_the_prompts_seen_and_gae_spans_rows(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    episodes = hand_episodes()
    buf = build_buffer(tiny_tokenizer, episodes)
    gamma, lam = 0.9, 0.8
    prepare_rollout(tiny_policy, buf, GenerateStyle(), gamma=gamma, gae_lambda=lam, batch_size=3)
    policy = tiny_policy.eval()

    def value(ids: list[int]) -> float:
        with torch.no_grad():
            return float(policy(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[1][0, -1])

    with torch.no_grad():
        for row in range(len(buf)):  # log-probs: one unpadded forward per row
            n = int(buf.lengths[row])
            ids = buf.input_ids[row : row + 1, :n]
            logits, _ = policy(ids, torch.ones_like(ids))
            direct = ppo.token_logprobs(logits[:, :-1], ids[:, 1:])[0]
            expected = torch.where(buf.action_mask[row, 1:n], direct, 0.0)  # reply tokens only
            torch.testing.assert_close(buf.old_logprobs[row, 1:n], expected, rtol=1e-5, atol=1e-5)

    for e, ep in enumerate(episodes):
        values = [value(prompt_ids(tiny_tokenizer, ep, t)) for t in range(ep.num_turns)]
        next_value = 0.0 if ep.terminated else value(prompt_ids(tiny_tokenizer, ep, ep.num_turns))
        torch.testing.assert_close(
            buf.old_values[e, : ep.num_turns], torch.tensor(values), rtol=1e-5, atol=1e-5
        )
        # GAE over the whole episode, by hand: the rows do not cut it.
        advantages, running = [0.0] * ep.num_turns, 0.0
        for t in reversed(range(ep.num_turns)):
            after = values[t + 1] if t + 1 < ep.num_turns else next_value
            running = ep.rewards[t] + gamma * after - values[t] + gamma * lam * running
            advantages[t] = running
        n = ep.num_turns
        torch.testing.assert_close(buf.advantages[e, :n], torch.tensor(advantages), rtol=1e-5, atol=1e-5)
        expected_returns = torch.tensor(advantages) + torch.tensor(values)
        torch.testing.assert_close(buf.returns[e, :n], expected_returns, rtol=1e-5, atol=1e-5)


class Corridor(gym.Env):
    """Five turns (or ``length``) of Blackjack-looking observations: long enough to need a budget."""

    action_space = gym.spaces.Discrete(2)
    observation_space = gym.spaces.Tuple(
        (gym.spaces.Discrete(32), gym.spaces.Discrete(11), gym.spaces.Discrete(2))
    )

    def __init__(self, length: int = 5, **_: Any) -> None:  # ignores Blackjack's env_kwargs
        self.length = length

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t = 0
        return (12, int(self.np_random.integers(2, 11)), 0), {}

    def step(self, action: int):
        self.t += 1
        return (12 + self.t, 5, 0), float(action == HIT) - 0.25, self.t >= self.length, False, {}


gym.register(CORRIDOR, entry_point=Corridor)
BUDGET = 80  # system prompt + 3 observations: turns 3 and 4 of a corridor drop old turns


def budget_collect(policy_style: str, policy, tokenizer, time_limit: int | None) -> list[Episode]:
    """Plays 2 corridors x 5 turns under ``BUDGET``: one terminated 5-turn episode each, or with a
    time limit of 4 two truncated 4-turn ones each, which keep their next observation. Checks that
    every prompt the policy answered is the one ``Episode.prompt_start`` records."""
    # One new token: a reply's length (one word, or none) cannot shift where the budget cuts.
    agent = BlackjackAgent()
    style = GenerateStyle(max_new_tokens=1) if policy_style == "generate" else ScoreStyle(agent)
    collector = RolloutCollector(
        CORRIDOR, None, agent, 2, style, max_episode_steps=time_limit, max_prompt_tokens=BUDGET
    )
    built: dict[int, tuple[Episode, int]] = {}  # conversation -> (its episode, its turn)
    seen: list[tuple[Episode, int, list[dict[str, str]]]] = []
    messages, reply = collector.actor.budget.messages, style.reply

    def spy_messages(tokenizer, ep):
        conversation = messages(tokenizer, ep)
        built[id(conversation)] = (ep, len(ep.observations) - 1)
        return conversation

    def spy_reply(policy, tokenizer, conversations, states, greedy):
        seen.extend((*built[id(conv)], conv) for conv in conversations)
        return reply(policy, tokenizer, conversations, states, greedy)

    collector.actor.budget.messages, style.reply = spy_messages, spy_reply
    episodes = collector.collect(policy, tokenizer, seed=0, epoch=0, steps_per_env=5).episodes
    assert [ep.num_turns for ep in episodes] == ([5] * 2 if time_limit is None else [4] * 4)
    assert all(ep.truncated == (time_limit is not None) for ep in episodes)
    assert len(seen) == sum(ep.num_turns for ep in episodes)
    for ep, t, conversation in seen:
        s = ep.prompt_start[t]
        expected = build_messages(tokenizer, ep.system_prompt, ep.observations[s : t + 1], ep.responses[s:t])
        assert conversation == expected
        assert ep.observations[t] in conversation[-1]["content"], "the current observation is never dropped"
        assert len(encode_text(tokenizer, render(tokenizer, conversation, True))) <= BUDGET
        # The most history that fits (the rollout starts its search at the previous turn's start).
        kept, _ = fit_to_budget(
            tokenizer, ep.system_prompt, ep.observations[: t + 1], ep.responses[:t], BUDGET
        )
        assert s == t + 1 - len(kept)
    # Corridor prompts grow by one turn each: 3 observations fit, then the oldest go.
    for ep in episodes:
        assert ep.prompt_start == [0, 0, 0, 1, 2][: len(ep.observations)]
    return episodes


@pytest.mark.parametrize("time_limit", [None, 4])
def test_rollout_plays_and_trains_on_budgeted_prompts(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase, time_limit: int | None
) -> None:
    episodes = budget_collect("generate", tiny_policy, tiny_tokenizer, time_limit)
    buf = build_buffer(tiny_tokenizer, episodes)
    # Terminated corridors: turns 0-2, 3, 4. Truncated ones: turns 0-2, 3, then the bootstrap alone.
    expected = [3, 1, 1] * 2 if time_limit is None else [3, 1] * 4 + [0] * 4
    assert buf.row_num_turns.tolist() == expected
    for e, ep in enumerate(episodes):
        for t in range(ep.num_turns):
            row, pos = int(buf.value_rows[e, t]), int(buf.value_positions[e, t])
            assert buf.input_ids[row, : pos + 1].tolist() == prompt_ids(tiny_tokenizer, ep, t)
        if not ep.terminated:
            row, pos = int(buf.bootstrap_row[e]), int(buf.bootstrap_position[e])
            assert buf.input_ids[row, : pos + 1].tolist() == prompt_ids(tiny_tokenizer, ep, ep.num_turns)
    assert int(buf.lengths.max()) <= BUDGET + 8  # a prompt within budget plus at most one reply


@pytest.mark.parametrize("time_limit", [None, 4])
def test_score_mode_scores_candidates_on_budgeted_prompts(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase, time_limit: int | None
) -> None:
    episodes = budget_collect("score", tiny_policy, tiny_tokenizer, time_limit)
    episode_buf = build_buffer(tiny_tokenizer, episodes)
    ScoreStyle(BlackjackAgent()).encode(tiny_tokenizer, episodes, episode_buf)  # checks its prefixes
    turns = episode_buf.actions
    for n in range(len(turns)):
        e, t = int(turns.turn_episode[n]), int(turns.turn_step[n])
        length = int(turns.prompt_mask[n].sum())
        assert turns.prompt_ids[n, -length:].tolist() == prompt_ids(tiny_tokenizer, episodes[e], t)
        assert length - 1 == int(episode_buf.value_positions[e, t])


def test_too_small_a_budget_names_the_setting(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    collector = RolloutCollector(CORRIDOR, None, BlackjackAgent(), 1, GenerateStyle(4), max_prompt_tokens=20)
    with pytest.raises(
        ConfigError, match=r"data.max_prompt_tokens=20 cannot hold the system prompt \(\d+ tokens\)"
    ):
        collector.collect(tiny_policy, tiny_tokenizer, seed=0, epoch=0, steps_per_env=1)
    with pytest.raises(ValueError, match="data.max_prompt_tokens=0 must be >= 1"):
        RolloutCollector(CORRIDOR, None, BlackjackAgent(), 1, GenerateStyle(4), max_prompt_tokens=0)


def test_imperative_loop_keeps_to_the_budget(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    env = Corridor()
    config = {
        "batch_size": 2,
        "num_minibatches": 2,
        "update_epochs": 1,
        "seed": 0,
        "max_prompt_tokens": BUDGET,
    }
    config["action_space"] = env.action_space
    agent = BlackjackAgent(model, tokenizer, "cpu", {"max_new_tokens": 2}, config)
    lengths: list[int] = []
    generate = agent.imperative.policy.generate

    def spy(input_ids, attention_mask, **kwargs):
        lengths.append(int(attention_mask.sum()))
        return generate(input_ids, attention_mask, **kwargs)

    agent.imperative.policy.generate = spy
    stats: dict[str, float] = {}
    for episode in range(2):
        observation, _ = env.reset(seed=episode)
        for _ in range(4):  # a time limit cuts the corridor after 4 turns
            observation, reward, _, _, _ = env.step(agent.act(observation))
            agent.assign_reward(reward)
        recorded = agent.imperative.episode
        stats = agent.terminate_episode(truncated=True, next_observation=observation)
    assert recorded.prompt_start == [0, 0, 0, 1, 2]  # the bootstrap state's prompt included
    assert len(lengths) == 8 and max(lengths) <= BUDGET
    assert stats and all(torch.isfinite(torch.tensor(v)) for v in stats.values())


def fit_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    """A tiny 2-epoch Blackjack run whose prompts hold one observation: every later turn of an
    episode drops the earlier ones."""
    budget = ("--data.max_prompt_tokens", "40", "--trainer.check_val_every_n_epoch", "2")
    return tiny_run_args(CONFIG, model_dir, out, *budget, *extra, epochs=2)


def scalars(cli: Any) -> dict[str, list[tuple[int, float]]]:
    """Logged scalars but wall-clock timings (``*_s``, ``*_per_s``)."""
    return {k: v for k, v in read_scalars(cli.trainer.logger.log_dir).items() if not k.endswith("_s")}


@pytest.mark.parametrize("policy", ["generate", "score"])
def test_fit_with_a_budget_is_deterministic(policy: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    runs = [
        build_cli(args=fit_args(tiny_model_dir, tmp_path / str(i), "--data.policy", policy)) for i in (0, 1)
    ]
    first, again = (scalars(cli) for cli in runs)
    assert first == again
    for tag in ("train/policy_loss", "train/value_loss", "eval/return_mean"):
        assert len(first[tag]) == (1 if tag.startswith("eval") else 2)
        assert all(torch.isfinite(torch.tensor(v)) for _, v in first[tag]), tag
    data = runs[0].datamodule
    episodes = data.rollout.stats.episodes
    assert any(start > 0 for ep in episodes for start in ep.prompt_start), "no prompt was budgeted"
    assert data.rollout.buffer.num_train_rows > len(episodes)


def test_too_small_a_budget_stops_fit_with_one_line(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tiny_model_dir, tmp_path, "--data.max_prompt_tokens", "20"))
    message = exit_info.value.code
    assert isinstance(message, str) and "Traceback" not in message
    assert message.startswith(
        "llamagym_pl.fit: error: data.max_prompt_tokens=20 cannot hold the system prompt"
    )
    assert "raise data.max_prompt_tokens to at least 29" in message


def test_every_minibatch_of_mixed_row_layouts_trains(
    tiny_policy: PolicyWithValueHead, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Regression (issue #12, item 3): a row's turn padding must not read another row's positions.

    Episode 0 is split into rows (turns 0-1 | 2-3) with a long turn-2 observation, so its turn-2
    value position lies far past row 0's end; episode 1 has 3 turns in one short row. A minibatch
    of row 0 and episode 1 is trimmed to their length, and padding turn 2 of row 0 used to point
    at episode 0's turn 2 in row 1: `index out of bounds` in the value gather (a device-side
    assert on CUDA).
    """
    long_obs = [OBS[0], OBS[1], " ".join(["your sum is 20 ."] * 12), OBS[3], OBS[4]]
    episodes = [
        Episode(SYSTEM, long_obs, RESP, [0.0] * 4, [False] * 4, 0.0, prompt_start=[0, 0, 1, 1, 3]),
        Episode(SYSTEM, OBS[:3], RESP[:3], [0.0, 0.0, 1.0], [False] * 3, 1.0, terminated=True),
        Episode(SYSTEM, OBS[:1], RESP[:1], [-1.0], [False], -1.0, terminated=True),
    ]
    buf = build_buffer(tiny_tokenizer, episodes)
    prepare_rollout(tiny_policy, buf, GenerateStyle(), gamma=1.0, gae_lambda=0.95, batch_size=8)
    rows = range(buf.num_train_rows)
    assert buf.num_train_rows == 4
    for index in [[a, b] for a in rows for b in rows if a != b] + [list(rows)]:
        batch = minibatch(buf, index)
        loss, _ = minibatch_loss(GenerateStyle(), tiny_policy, batch, 0.2, True, 0.5, 0.0)
        assert torch.isfinite(loss), index
        # Padding turns read position 0 of their own row (any valid index; masked out of the loss).
        assert (batch["value_positions"][~batch["turn_mask"]] == 0).all()
        assert int(batch["value_positions"].max()) < batch["input_ids"].shape[1]
