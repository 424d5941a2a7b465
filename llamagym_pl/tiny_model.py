"""A tiny, randomly initialised Llama with a word-level tokenizer: the offline default model.

Put ``name_or_path: tiny`` in a YAML config (or ``tiny-h128-l4`` for another size) and
:func:`resolve_model_path` builds the model once into a local cache, so training, tests and CI
never need the Hugging Face hub. The vocabulary is whole English words, so a policy trained from
scratch on Blackjack only has to learn to emit one token ("hit"/"stick") followed by ``</s>``.

Build one by hand with ``python -m llamagym_pl.tiny_model --out DIR``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DEFAULT_TINY = "tiny"
"""The name users put in YAML (``name_or_path: tiny``) to get the offline model."""

CACHE_ENV = "LLAMAGYM_PL_CACHE"
"""Environment variable overriding the cache directory (default ``~/.cache/llamagym_pl``)."""

BUILD_INFO_FILE = "llamagym_tiny.json"

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)
PUNCTUATION = tuple(".,!?:;'\"()-/")

# Every message is "<|role|> content </s> "; the whole conversation starts with "<s> ". With a
# generation prompt the text ends in "<|assistant|>", so the reply is what follows it and the
# model ends its turn with "</s>", which is also the eos token that stops `generate`.
CHAT_TEMPLATE = (
    "{{ '<s> ' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' </s> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# Common English words for card-game, grid-world and text-adventure prompts. The order is part of
# the model: token ids follow it, so append new words at the end only.
WORDS = """
a an the you your yours i me my we our us it its this that these those there here he she they them
their who what which where when why how is are was were be been being am have has had do does did
can could will would should must may might shall get got go goes went move moves moved take takes
took give make put use open close look see say said reply respond answer choose pick select play
win wins won lose loses lost draw reach avoid fall fell find found want need try keep stay walk
push pull drop eat wait stop continue think ace aces dealer showing shows current sum total hand
hands card cards player blackjack hit stick stand bust busted natural usable value points point
face king queen jack ten deck left right up down row column goal hole holes ice frozen lake grid
position start step steps cell tile square map wall north south east west forward back backward
turn agent target safe slippery door key room chest inventory item items box ball gold coin sword
lamp table kitchen house garden path red blue green yellow object carrying carry game games round
episode action actions reward rewards score state observation valid invalid option options expert
only one word words single next new following format example please always never zero two three
four five six seven eight nine eleven twelve first second third last of to and or in at on by for
from with without into onto over under above below near between if then else but so as than
because after before while no not yes none nothing all any some each every more most less same
other another now again still also just very too well good bad best better high low higher lower
correct wrong true false ok okay done end assistant user system model helpful task instruction
instructions question response output input message
""".split()


def tiny_vocab(extra_words: Sequence[str] = ()) -> list[str]:
    """The vocabulary in id order: special tokens, punctuation, "0".."100", words, extra words.

    Duplicates are dropped, keeping the first occurrence, so the order (and every id) depends
    only on the arguments.
    """
    words = [*SPECIAL_TOKENS, *PUNCTUATION, *(str(n) for n in range(101)), *WORDS, *extra_words]
    return list(dict.fromkeys(words))


def build_tiny_tokenizer(extra_words: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :func:`tiny_vocab`, with the tiny chat template set."""
    vocab = tiny_vocab(extra_words)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    # Lowercasing lets "Your sum is 14." reuse the lowercase word list.
    backend.normalizer = normalizers.Lowercase()
    # Whitespace splits "14." into "14", "."; Punctuation also splits runs like "?!" or "',"
    # that Whitespace would keep together (and map to <unk>).
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation("isolated")]
    )
    # No decoder: the tokenizers library joins tokens with single spaces, which reproduces the
    # space-separated chat template exactly and gives decode(encode("hit")) == "hit".
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=list(ROLE_TOKENS),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    extra_words: Sequence[str] = (),
) -> Path:
    """Build a randomly initialised tiny Llama and its tokenizer, saved to ``out_dir``.

    The same arguments give bit-identical weights and token ids. The directory is written
    atomically (built next to ``out_dir``, then renamed), so a crash or a concurrent reader
    never sees half a model. An existing ``out_dir`` is replaced.

    Args:
        out_dir: where to save; loadable with ``AutoModelForCausalLM``/``AutoTokenizer``.
        hidden_size: model width; must be divisible by ``num_heads``.
        num_layers: number of transformer blocks.
        num_heads: attention heads (no grouped-query attention).
        seed: seed for the weight initialisation.
        extra_words: words appended to the built-in vocabulary.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    if hidden_size % num_heads != 0:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    out_dir = Path(out_dir).expanduser()
    tokenizer = build_tiny_tokenizer(extra_words)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (BOS, EOS, PAD)}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
    )
    # fork_rng: seed the initialisation without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = ids[BOS]
    model.generation_config.eos_token_id = ids[EOS]
    model.generation_config.pad_token_id = ids[PAD]

    build_info = {
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "seed": seed,
        "extra_words": list(extra_words),
        "vocab_size": len(tokenizer),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        (tmp_dir / BUILD_INFO_FILE).write_text(json.dumps(build_info, indent=2) + "\n")
        _replace_dir(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; ``os.replace`` cannot overwrite a non-empty directory, so an
    existing ``dst`` is first renamed aside and deleted after the swap."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", dir=dst.parent))
    os.replace(dst, old / dst.name)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


EXTRA_VOCABULARIES = {"textworld": "llamagym_pl.envs.textworld_words"}
"""Word lists (modules with a ``WORDS`` list) that name a tiny variant: ``tiny-textworld`` (or
``tiny-h128-l4-textworld``) is the tiny model with those words appended to its vocabulary."""

_TINY_NAME = re.compile(rf"^{DEFAULT_TINY}(?:-h(\d+)-l(\d+))?(?:-({'|'.join(EXTRA_VOCABULARIES)}))?$")


def cache_dir() -> Path:
    """Where named tiny models are built: ``$LLAMAGYM_PL_CACHE`` or ``~/.cache/llamagym_pl``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llamagym_pl").expanduser()


def resolve_model_path(name_or_path: str) -> str:
    """Map ``"tiny"``/``"tiny-h{hidden}-l{layers}"`` (``-textworld`` appended: with the words of
    :data:`EXTRA_VOCABULARIES`) to a cached local build; pass others through.

    A tiny model is built into ``cache_dir() / name`` the first time it is asked for and reused
    afterwards. Any other string is returned unchanged for ``from_pretrained`` to handle (a hub
    id or a local path).
    """
    match = _TINY_NAME.match(name_or_path)
    if match is None:
        return name_or_path
    path = cache_dir() / name_or_path
    if not (path / BUILD_INFO_FILE).exists():
        hidden, layers, vocabulary = match.groups()
        sizes = {} if hidden is None else {"hidden_size": int(hidden), "num_layers": int(layers)}
        if vocabulary:
            sizes["extra_words"] = importlib.import_module(EXTRA_VOCABULARIES[vocabulary]).WORDS
        build_tiny_model(path, **sizes)
    return str(path)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m llamagym_pl.tiny_model --out DIR [--hidden-size N ...]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra-words", nargs="*", default=[], help="words added to the vocabulary")
    args = parser.parse_args(argv)
    path = build_tiny_model(
        args.out,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        seed=args.seed,
        extra_words=args.extra_words,
    )
    print(path)


if __name__ == "__main__":
    main()
