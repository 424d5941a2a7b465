"""Load a causal LM and its tokenizer by hub id, local path, or the offline ``tiny`` default."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from llamagym_pl.tiny_model import resolve_model_path

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer and make sure it can pad (left padding is set per call by the rollout).

    A tokenizer without a pad token borrows its eos (or unk) token; embeddings are never
    resized, because a new untrained row would change the model silently.
    """
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _not_found(name_or_path, err) from err
    if tokenizer.pad_token is None:
        borrowed = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if borrowed is None:
            raise ValueError(
                f"tokenizer of {name_or_path!r} has no pad, eos or unk token to pad with; "
                "set tokenizer.pad_token before training"
            )
        tokenizer.pad_token = borrowed
        log.info("tokenizer of %s has no pad token: padding with %r", name_or_path, borrowed)
    return tokenizer


def load_causal_lm(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """Load a causal LM with ``from_pretrained``; ``dtype`` is one of :data:`DTYPES` or ``auto``."""
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES) + ['auto']}")
    path = resolve_model_path(name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path,
            dtype="auto" if dtype == "auto" else DTYPES[dtype],
            trust_remote_code=trust_remote_code,
        )
    except OSError as err:
        raise _not_found(name_or_path, err) from err


def _not_found(name_or_path: str, err: Exception) -> OSError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    where = "a local directory" if Path(name_or_path).exists() else "a hub id or local directory"
    hint = (
        " The hub is offline (HF_HUB_OFFLINE=1): download it on a machine with network access "
        "(`huggingface-cli download ID --local-dir DIR`) and set model.name_or_path to DIR,"
        if offline
        else " Check the spelling, your network and hub login, or pass a local directory;"
    )
    return OSError(
        f"could not load model {name_or_path!r} ({where}).{hint} or use name_or_path: tiny for "
        f"the offline default model. Cause: {err}"
    )
