"""Token in, token out (issue #12, item 5): PPO trains on the token ids the policy sampled.

Before, a reply was decoded, stripped and re-encoded through the chat template, so training saw
the canonical tokenization of its text plus the template's end-of-turn token, which a reply cut
at ``max_new_tokens`` never sampled. Here a spy records what ``generate`` sampled and the
buffer's action tokens are compared with it, in the Lightning path's rollout and in the
imperative loop, on the tiny word-level model and on a byte-level BPE model whose sampled ids
often do not survive decode -> re-encode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llamagym_pl import Agent, ppo
from llamagym_pl import imperative as imperative_module
from llamagym_pl.actions import GenerateStyle
from llamagym_pl.actions.generate import cut_at_eos
from llamagym_pl.buffer import RolloutBuffer, build_buffer
from llamagym_pl.loading import build_policy, load_tokenizer
from llamagym_pl.rollout import RolloutCollector
from llamagym_pl.update import prepare_rollout

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHATML = (
    r"{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    r" + '<|im_end|>' + '\n'}}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORRIDOR = "LlamaGymTest/TokenCorridor-v0"


class Corridor(gym.Env):
    """Four turns; the observation is the turn number. Any action moves on."""

    action_space = gym.spaces.Discrete(2)
    observation_space = gym.spaces.Discrete(10)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t = 0
        return 0, {}

    def step(self, action: int):
        self.t += 1
        return self.t, float(action), self.t >= 4, False, {}


if CORRIDOR not in gym.registry:
    gym.register(CORRIDOR, entry_point=Corridor)


class WordAgent(Agent):
    def get_system_prompt(self) -> str:
        return "you are an expert blackjack player . answer hit or stick ."

    def format_observation(self, observation: Any) -> str:
        return f"your sum is {12 + int(observation)} ."

    def extract_action(self, response: str) -> int:
        return {"stick": 0, "hit": 1}[response.split()[0]]


@pytest.fixture(scope="module")
def bpe_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 1-layer Llama with a byte-level BPE tokenizer (ChatML template): its samples are
    mostly non-canonical token sequences, whose decoded text re-encodes to other ids."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["your sum is 12 . hit or stick , the dealer shows 7 . you are an expert player ."] * 50
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML
    out = tmp_path_factory.mktemp("bpe")
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def spy_generate(policy: Any, eos: int) -> list[list[int]]:
    """Record every reply sampled by ``policy.generate`` (cut at its first eos), in order."""
    sampled: list[list[int]] = []
    original = policy.generate

    def generate(input_ids, attention_mask, **kwargs):
        out = original(input_ids, attention_mask, **kwargs)
        sampled.extend(cut_at_eos(row, eos) for row in out[:, input_ids.shape[1] :].tolist())
        return out

    policy.generate = generate  # an instance attribute shadows the method
    return sampled


def trained_tokens(buf: RolloutBuffer, e: int, t: int) -> list[int]:
    """The action tokens of turn ``t`` of episode ``e`` in the row its value is read from."""
    row = int(buf.value_rows[e, t])
    return buf.input_ids[row][buf.turn_index[row] == t].tolist()


def assert_trains_what_was_sampled(buf: RolloutBuffer, episodes, sampled_by_turn) -> None:
    for e, ep in enumerate(episodes):
        for t in range(ep.num_turns):
            assert trained_tokens(buf, e, t) == sampled_by_turn[(e, t)]
            row, pos = int(buf.value_rows[e, t]), int(buf.value_positions[e, t])
            # ...scored on exactly the prompt they were sampled from.
            assert buf.input_ids[row, : pos + 1].tolist() == ep.prompt_ids[t]


@pytest.mark.parametrize("model", ["tiny", "bpe"])
def test_rollout_trains_the_sampled_tokens(model: str, tiny_model_dir: Path, bpe_model_dir: Path) -> None:
    path = str(tiny_model_dir if model == "tiny" else bpe_model_dir)
    tokenizer, policy = load_tokenizer(path), build_policy(path)
    sampled = spy_generate(policy, tokenizer.eos_token_id)
    # Two new tokens: many replies are cut before their end of turn.
    collector = RolloutCollector(
        CORRIDOR, None, WordAgent(), num_envs=3, style=GenerateStyle(max_new_tokens=2)
    )
    stats = collector.collect(policy, tokenizer, seed=0, epoch=0, steps_per_env=4)
    # The collector plays active envs in order, one batched generate per turn.
    order = iter(sampled)
    sampled_by_turn = {}
    for t in range(4):
        for e, ep in enumerate(stats.episodes):
            if t < ep.num_turns:
                sampled_by_turn[(e, t)] = next(order)
    buf = build_buffer(tokenizer, stats.episodes)
    assert_trains_what_was_sampled(buf, stats.episodes, sampled_by_turn)
    eos = tokenizer.eos_token_id
    cut = [ids for ids in sampled_by_turn.values() if eos not in ids]
    assert cut, "no reply was cut at max_new_tokens"
    # An end-of-turn token is trained only where it was sampled.
    for (e, t), ids in sampled_by_turn.items():
        assert (eos in trained_tokens(buf, e, t)) == (eos in ids)
    if model == "bpe":  # the point of the byte-level model: re-encoding would have changed them
        for (e, t), ids in sampled_by_turn.items():
            text = stats.episodes[e].responses[t]
            if tokenizer(text, add_special_tokens=False)["input_ids"] != [i for i in ids if i != eos]:
                break
        else:
            pytest.fail("every sampled reply re-encoded to its own ids")
    # The log-probs PPO scores are those of the sampled tokens on their own prompts.
    prepare_rollout(policy, buf, collector.style, gamma=1.0, gae_lambda=0.95, batch_size=4)
    with torch.no_grad():
        for e, ep in enumerate(stats.episodes):
            for t in range(ep.num_turns):
                ids = torch.tensor([ep.prompt_ids[t] + ep.response_ids[t]])
                logits, _ = policy.eval()(ids, torch.ones_like(ids))
                direct = ppo.token_logprobs(
                    logits[0, len(ep.prompt_ids[t]) - 1 : -1], ids[0, len(ep.prompt_ids[t]) :]
                )
                row = int(buf.value_rows[e, t])
                torch.testing.assert_close(
                    buf.old_logprobs[row][buf.turn_index[row] == t], direct, rtol=1e-5, atol=1e-5
                )


@pytest.mark.parametrize("model", ["tiny", "bpe"])
def test_imperative_loop_trains_the_sampled_tokens(
    model: str, tiny_model_dir: Path, bpe_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tiny_model_dir if model == "tiny" else bpe_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = build_policy(path).lm
    built: list[tuple[RolloutBuffer, list]] = []
    original_build = imperative_module.build_buffer

    def build(tok, episodes, **kwargs):
        buf = original_build(tok, episodes, **kwargs)
        built.append((buf, list(episodes)))
        return buf

    monkeypatch.setattr(imperative_module, "build_buffer", build)
    agent = WordAgent(
        lm,
        tokenizer,
        "cpu",
        generate_config_dict={"max_new_tokens": 2},
        ppo_config_dict={"batch_size": 2, "num_minibatches": 1, "update_epochs": 1, "seed": 0},
        action_space=gym.spaces.Discrete(2),
    )
    sampled = spy_generate(agent.imperative.policy, tokenizer.eos_token_id)
    env = gym.make(CORRIDOR)
    for episode in range(2):  # batch_size 2: one update, on these two episodes
        obs, _ = env.reset(seed=episode)
        done = False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(agent.act(obs))
            agent.assign_reward(reward)
            done = terminated or truncated
        agent.terminate_episode()
    ((buf, episodes),) = built
    order = iter(sampled)  # one generate per act, episode after episode
    sampled_by_turn = {(e, t): next(order) for e, ep in enumerate(episodes) for t in range(ep.num_turns)}
    assert any(tokenizer.eos_token_id not in ids for ids in sampled_by_turn.values())
    assert_trains_what_was_sampled(buf, episodes, sampled_by_turn)
