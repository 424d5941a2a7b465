"""`llamagym_pl.prefix_cache`: rollout generation encodes the prefix its prompts share once and
continues from its KV cache, with the very replies of the plain call (issue #15)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from model_helpers import FAMILIES, SYSTEM, build_family_model, perturb_trainable
from torch import nn
from transformers import (
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerBase,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from llamagym_pl.actions import GenerateStyle
from llamagym_pl.chat import build_messages, encode_prompts, left_pad
from llamagym_pl.loading import build_policy, load_tokenizer
from llamagym_pl.policy import PolicyWithValueHead
from llamagym_pl.prefix_cache import PrefixMemo, prefix_first, shared_prefix_length, supports_prefix_cache
from llamagym_pl.sampling import generate_from_settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NEW_TOKENS = 6
OBS = ["your sum is 14 .", "your sum is 19 and the dealer shows 10 .", "your sum is 21 ."]
RESP = ["hit", "stick"]

Family = tuple[PolicyWithValueHead, PreTrainedTokenizerBase]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    tokenizer: PreTrainedTokenizerBase = request.getfixturevalue(FAMILIES[request.param])
    model_dir = build_family_model(request.param, tokenizer, tmp_path_factory.mktemp(request.param))
    return build_policy(str(model_dir)).eval(), load_tokenizer(str(model_dir))


def prompts(tokenizer: PreTrainedTokenizerBase) -> list[list[dict[str, str]]]:
    """Four conversations of different lengths, all starting with the system prompt."""
    conversations = [build_messages(tokenizer, SYSTEM, OBS[: i + 1], RESP[:i]) for i in range(3)]
    return [*conversations, build_messages(tokenizer, SYSTEM, OBS[1:2], [])]


@contextmanager
def embedded_shapes(lm: nn.Module) -> Iterator[list[tuple[int, ...]]]:
    """The shape of the token ids of every forward of ``lm``, in order: the embedding layer sees them
    all, also under a peft wrapper (whose inner forwards bypass the model's own hooks)."""
    shapes: list[tuple[int, ...]] = []
    handle = lm.get_input_embeddings().register_forward_pre_hook(lambda _, args: shapes.append(args[0].shape))
    try:
        yield shapes
    finally:
        handle.remove()


def replies(policy: PolicyWithValueHead, tokenizer, share_prefix: bool, greedy: bool, seed: int):
    style = GenerateStyle(NEW_TOKENS, share_prefix=share_prefix)
    torch.manual_seed(seed)
    with embedded_shapes(policy.lm) as shapes:
        out = style.reply(policy, tokenizer, prompts(tokenizer), [None] * 4, greedy=greedy)
    return [(r.text, r.prompt_ids, r.reply_ids) for r in out], shapes


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_replies_are_those_of_the_plain_call(family: Family, greedy: bool) -> None:
    policy, tokenizer = family
    ids, mask = encode_prompts(tokenizer, prompts(tokenizer))  # (4, P) left padded, lengths differ
    shared = shared_prefix_length(ids, mask)
    assert shared > len(tokenizer(SYSTEM, add_special_tokens=False).input_ids) // 2
    assert len(set(mask.sum(1).tolist())) > 1
    for seed in range(3 if not greedy else 1):
        plain, plain_shapes = replies(policy, tokenizer, False, greedy, seed)
        cached, shapes = replies(policy, tokenizer, True, greedy, seed)
        assert cached == plain  # texts, prompt ids and reply ids (token in, token out)
        assert plain_shapes[0] == ids.shape
        # The prefix runs once, (1, c); then each row's rest, (4, P - c), and one token at a time.
        assert shapes[:2] == [(1, shared), (4, ids.shape[1] - shared)]
        assert all(s == (4, 1) for s in shapes[2:]) and len(shapes) == len(plain_shapes) + 1


def test_replies_are_those_of_the_plain_call_under_lora(tmp_path: Path, llama2_tokenizer) -> None:
    model_dir = build_family_model("llama", llama2_tokenizer, tmp_path)
    policy = build_policy(str(model_dir), lora_r=2, lora_alpha=4).eval()
    perturb_trainable(policy.lm, std=0.5)  # LoRA's B starts at 0: make the adapter count
    tokenizer = load_tokenizer(str(model_dir))
    plain, _ = replies(policy, tokenizer, False, greedy=False, seed=0)
    cached, shapes = replies(policy, tokenizer, True, greedy=False, seed=0)
    assert cached == plain and shapes[0][0] == 1


def generate_shapes(policy: PolicyWithValueHead, rows: list[list[int]], **settings) -> list[tuple[int, ...]]:
    ids, mask = left_pad(rows, 0)
    defaults = {"do_sample": False, "max_new_tokens": 2, "pad_token_id": 0, "eos_token_id": 1}
    with embedded_shapes(policy.lm) as shapes:
        out = generate_from_settings(policy, ids, mask, **defaults | settings)
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    assert torch.equal(sequences[:, : ids.shape[1]], ids)  # the prompts as given, whatever the path
    return shapes


def test_plain_call_without_a_prefix_to_share(family: Family) -> None:
    policy, _ = family
    assert generate_shapes(policy, [[5, 6, 7, 8]])[0] == (1, 4)  # a single prompt
    assert generate_shapes(policy, [[5, 6, 7], [6, 6, 7, 8]])[0] == (2, 4)  # no common first token
    # The whole of the shortest prompt is shared: each keeps a token of its own, c = 2.
    assert generate_shapes(policy, [[5, 6, 7], [5, 6, 7, 8]])[:2] == [(1, 2), (2, 2)]
    assert generate_shapes(policy, [[5, 6, 7], [5, 6, 7, 8]], share_prefix=False)[0] == (2, 4)


@pytest.mark.parametrize(
    "settings",
    [{"repetition_penalty": 1.5}, {"no_repeat_ngram_size": 2}, {"return_dict_in_generate": True}],
    ids=["repetition", "ngram", "dict"],
)
def test_plain_call_with_settings_that_read_the_prompt_ids(family: Family, settings: dict) -> None:
    """Logits processors read the prompt ids, whose padding the cache layout moves."""
    assert generate_shapes(family[0], [[5, 6, 7], [5, 6, 7, 8]], **settings)[0] == (2, 4)


def test_prefix_first_by_hand() -> None:
    ids = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 8, 9, 4], [0, 5, 6, 9, 3]])  # left padded with 0
    mask = (ids != 0).long()
    assert shared_prefix_length(ids, mask) == 2
    laid_out, laid_mask = prefix_first(ids, mask, 2)
    assert laid_out.tolist() == [[5, 6, 0, 0, 7], [5, 6, 8, 9, 4], [5, 6, 0, 9, 3]]
    assert laid_mask.tolist() == [[1, 1, 0, 0, 1], [1, 1, 1, 1, 1], [1, 1, 0, 1, 1]]


def tiny(config_cls, model_cls, **kw) -> PolicyWithValueHead:
    config = config_cls(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=0, eos_token_id=1, **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    return PolicyWithValueHead(model_cls(config).eval())


WINDOWED = {
    "mistral": (MistralConfig, MistralForCausalLM, {}),  # every layer sliding
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"use_sliding_window": True, "max_window_layers": 1}),  # 1 of 2
}


@pytest.mark.parametrize("arch", sorted(WINDOWED))
def test_windowed_layers_share_the_prefix_only_when_the_window_covers_the_sequence(arch: str) -> None:
    """A sliding window counts cache columns: with the padding moved it would hold other tokens."""
    config_cls, model_cls, kw = WINDOWED[arch]
    rows = [[5, 6, 7, 9, 10, 11], [5, 6, 7, 8], [5, 6, 7, 12, 13]]  # P = 6, c = 3; 2 new tokens
    policy = tiny(config_cls, model_cls, sliding_window=4, **kw)
    assert not supports_prefix_cache(policy.lm, length=6 + 2)
    assert generate_shapes(policy, rows)[0] == (3, 6)
    policy = tiny(config_cls, model_cls, sliding_window=8, **kw)
    assert supports_prefix_cache(policy.lm, length=6 + 2)
    assert generate_shapes(policy, rows)[0] == (1, 3)
    ids, mask = left_pad(rows, 0)
    for greedy in (True, False):
        settings = {"do_sample": not greedy, "max_new_tokens": 2, "pad_token_id": 0, "eos_token_id": 1}
        torch.manual_seed(0)
        plain = generate_from_settings(policy, ids, mask, share_prefix=False, **settings)
        torch.manual_seed(0)
        assert torch.equal(generate_from_settings(policy, ids, mask, **settings), plain)


def test_eager_attention_shares_the_prefix_others_fall_back(family: Family) -> None:
    policy, tokenizer = family
    base = policy.lm
    kernel = base.config._attn_implementation
    try:
        base.config._attn_implementation = "eager"  # read at every forward
        plain, _ = replies(policy, tokenizer, False, greedy=False, seed=1)
        cached, shapes = replies(policy, tokenizer, True, greedy=False, seed=1)
        assert cached == plain and shapes[0][0] == 1
        base.config._attn_implementation = "flash_attention_2"  # untested here: the plain call
        assert not supports_prefix_cache(base, length=8)
    finally:
        base.config._attn_implementation = kernel


def test_one_prompt_at_a_time_continues_the_remembered_prefix(family: Family) -> None:
    """The imperative loop's serial prompts: with a PrefixMemo the prefix a prompt shares with the
    earlier ones is encoded once and kept while the weights stay; the replies are the plain call's.
    A weight changed in place (an optimizer step) drops it."""
    policy, tokenizer = family
    conversations = prompts(tokenizer)
    memo_style, plain_style = GenerateStyle(NEW_TOKENS), GenerateStyle(NEW_TOKENS)
    memo_style.prefix_memo = PrefixMemo()
    ids = [encode_prompts(tokenizer, [c])[0][0].tolist() for c in conversations]
    shared = len(os.path.commonprefix([ids[0], ids[3]]))  # the first and the last share the least

    def reply_one(style: GenerateStyle, i: int, seed: int) -> tuple[tuple, list]:
        torch.manual_seed(seed)
        with embedded_shapes(policy.lm) as shapes:
            (out,) = style.reply(policy, tokenizer, [conversations[i]], [None], greedy=False)
        return (out.text, out.prompt_ids, out.reply_ids), shapes

    runs = []
    for seed, i in enumerate([0, 1, 3, 2, 0]):
        (mine, shapes), (plain, _) = reply_one(memo_style, i, seed), reply_one(plain_style, i, seed)
        assert mine == plain
        runs.append(shapes)
    assert runs[0][0] == (1, len(ids[0]))  # nothing known yet: the plain call
    c01 = len(os.path.commonprefix([ids[0], ids[1]]))
    assert runs[1][:2] == [(1, c01), (1, len(ids[1]) - c01)]  # shared with the one before, kept
    assert runs[2][:2] == [(1, shared), (1, len(ids[3]) - shared)]  # shares less: that part again
    assert runs[3][0] == (1, len(ids[2]) - shared) and runs[4][0] == (1, len(ids[0]) - shared)  # kept
    with torch.no_grad():
        next(policy.lm.parameters()).add_(0.0)  # in place: a new version, as an optimizer step makes
    # Encoded again: the part it shares with the prompt before it (0's), then its own rest.
    assert reply_one(memo_style, 3, 0)[1][:2] == [(1, shared), (1, len(ids[3]) - shared)]
