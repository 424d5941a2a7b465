"""Shared fixtures: the tiny offline model and word-level tokenizers with real chat templates.

Everything is built into pytest's temporary directories, never the user's model cache, and
loaded back through ``AutoTokenizer`` so the chat template's round trip through disk is tested
too.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from llamagym_pl.loading import load_causal_lm
from llamagym_pl.policy import PolicyWithValueHead
from llamagym_pl.tiny_model import build_tiny_model, tiny_vocab

# meta-llama/Llama-2-7b-chat-hf tokenizer_config.json "chat_template", verbatim (a raw string, so
# Jinja itself reads the "\n" escapes, as it does when loaded from the JSON file).
LLAMA2_TEMPLATE = (
    r"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    r"{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    r"{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    r"{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    r"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    r"{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    r"{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    r"{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    r"{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    r"{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# ChatML, as used by Qwen2 / OpenHermes.
CHATML_TEMPLATE = (
    r"{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    r" + '<|im_end|>' + '\n'}}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# google/gemma-7b-it: no system role, "model" for the assistant.
GEMMA_TEMPLATE = (
    r"{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    r"{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}"
    r"{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    r"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    r"{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    r"{% else %}{% set role = message['role'] %}{% endif %}"
    r"{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    r"{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# Words the templates themselves write, on top of the tiny vocabulary.
TEMPLATE_WORDS = ("INST", "SYS", "[", "]", "<", ">", " ", "\n")


def make_word_tokenizer(
    *,
    chat_template: str | None,
    special_tokens: Sequence[str],
    bos: str,
    eos: str,
    pad: str,
    name: str,
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer that keeps every space and newline as its own token.

    Unlike the tiny model's tokenizer it loses no whitespace, so decoding is exact and the
    templates' "\\n" and " " separators show up as tokens, as with real BPE tokenizers.
    """
    vocab = tiny_vocab(TEMPLATE_WORDS)
    vocab += [t for t in special_tokens if t not in vocab]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\s"), "isolated"), pre_tokenizers.Punctuation("isolated")]
    )
    backend.decoder = decoders.Fuse()  # tokens carry their own whitespace: concatenate them
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    named = {bos, eos, pad, "<unk>"}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token="<unk>",
        extra_special_tokens=[t for t in special_tokens if t not in named],
        name_or_path=name,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def _saved_and_loaded(tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> PreTrainedTokenizerBase:
    tokenizer.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def processor_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model (same weights) with a ``generation_config.json`` that adds logits processors,
    as many instruct checkpoints ship: sampling must ignore it, since PPO scores the plain softmax.

    Besides the usual repetition penalty, n-gram ban and minimum length it bans the 101 number
    words (a fifth of the vocabulary): the random tiny model's logits are so flat that the first
    three alone change only a few of its sampled tokens.
    """
    out_dir = tmp_path_factory.mktemp("models") / "tiny-processors"
    shutil.copytree(tiny_model_dir, out_dir)
    numbers = AutoTokenizer.from_pretrained(out_dir).convert_tokens_to_ids([str(n) for n in range(101)])
    config = GenerationConfig.from_pretrained(out_dir)
    config.update(repetition_penalty=1.5, no_repeat_ngram_size=1, min_new_tokens=4, suppress_tokens=numbers)
    config.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def llama2_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    tokenizer = make_word_tokenizer(
        chat_template=LLAMA2_TEMPLATE,
        special_tokens=["<unk>", "<s>", "</s>"],
        bos="<s>",
        eos="</s>",
        pad="<unk>",  # Llama-2 ships without a pad token; batching code commonly reuses unk or eos
        name="test-llama2-chat",
    )
    return _saved_and_loaded(tokenizer, tmp_path_factory.mktemp("llama2"))


@pytest.fixture(scope="session")
def chatml_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    tokenizer = make_word_tokenizer(
        chat_template=CHATML_TEMPLATE,
        special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos="<|endoftext|>",
        eos="<|im_end|>",
        pad="<|endoftext|>",
        name="test-chatml",
    )
    return _saved_and_loaded(tokenizer, tmp_path_factory.mktemp("chatml"))


@pytest.fixture(scope="session")
def nosystem_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    tokenizer = make_word_tokenizer(
        chat_template=GEMMA_TEMPLATE,
        special_tokens=["<unk>", "<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        name="test-gemma-it",
    )
    return _saved_and_loaded(tokenizer, tmp_path_factory.mktemp("gemma"))


@pytest.fixture
def tiny_policy(tiny_model_dir: Path) -> PolicyWithValueHead:
    """A fresh tiny policy (LM + value head) per test: tests may train it or switch its mode. The
    value head is initialised from a fixed seed, not from whatever earlier tests left in the RNG."""
    torch.manual_seed(0)
    return PolicyWithValueHead(load_causal_lm(str(tiny_model_dir)))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a test module: the models are tiny and the machine is shared, so a
    second thread only spins (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
