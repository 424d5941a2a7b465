"""Build a randomly initialised Llama and a byte-level BPE tokenizer, offline; for ``setup.sh``.

Nothing is downloaded: the tokenizer is trained with ``tokenizers`` on text already on the
machine (vim's help files, else the Python standard library's sources, so its merges depend on
what is installed), plus a few lines of the Blackjack prompts. It is wrapped like
LlamaTokenizerFast (``<s>``/``</s>``/``<pad>``/``<unk>``, BOS prepended to every text) with the
Llama-2-chat template, whose ``[/INST]`` marker LlamaGym splits replies on.

    python bench/llamagym/models.py --out DIR                      # 0.66M params, vocab 4096
    python bench/llamagym/models.py --out DIR --vocab 32000 --hidden 512 --layers 8 --heads 8 \\
        --inter 1376                                               # 58M params, vocab 32000
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections.abc import Iterator

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json "chat_template".
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3: unk 0, bos 1, eos 2, as Llama's
# In-domain lines, repeated, so that the prompt's words get merges of their own.
DOMAIN = [
    "You are an expert blackjack player. Every turn, you'll see your current sum, the dealer's "
    "showing card value, and whether you have a usable ace.",
    'Decide whether to stay with your current sum by writing "Action: 0" or accept another card '
    'by writing "Action: 1". Accept a card unless very close to 21.',
    "[INST] <<SYS>> <</SYS>> [/INST] You: 14. Dealer: 10. You have no ace. Action: 1 Action: 0 stick hit",
] * 50


def corpus_files() -> list[str]:
    files = sorted(glob.glob("/usr/share/vim/vim*/doc/*.txt"))
    return files or sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))


def corpus(files: list[str]) -> Iterator[str]:
    """The domain lines, then each file in chunks of 64 lines."""
    yield from DOMAIN
    for path in files:
        with open(path, encoding="utf-8", errors="ignore") as f:
            lines = f.readlines()
        for i in range(0, len(lines), 64):
            yield "".join(lines[i : i + 64])


def build_tokenizer(vocab_size: int, files: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(files), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(  # BOS first, as LlamaTokenizerFast
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",  # LlamaTokenizerFast's default
        model_max_length=2048,
    )
    hf_tok.chat_template = LLAMA2_CHAT_TEMPLATE
    return hf_tok


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--inter", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    files = corpus_files()
    tok = build_tokenizer(args.vocab, files)
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        intermediate_size=args.inter,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    info = {"argv": sys.argv, "params": params, "vocab": len(tok), "corpus_files": len(files)}
    with open(os.path.join(args.out, "build_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(f"{params / 1e6:.2f}M params, vocab {len(tok)} ({len(files)} corpus files) -> {args.out}")


if __name__ == "__main__":
    main()
