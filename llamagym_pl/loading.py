"""Load a causal LM and its tokenizer: hub id, local directory or the offline ``tiny`` default.

Also where LoRA adapters (peft) and 4-bit / 8-bit quantization (bitsandbytes) are applied, so
:class:`~llamagym_pl.module.PPOModule` builds its policy with one call to :func:`build_policy`.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Literal, TypedDict, Unpack

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import get_session, snapshot_download, try_to_load_from_cache
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llamagym_pl.policy import HALF_DTYPES, PolicyWithValueHead, disable_dropout, half_precision_trainable
from llamagym_pl.tiny_model import resolve_model_path

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Quantization = Literal["none", "4bit", "8bit"]
HUB_PROBE_TIMEOUT_S = 5.0


class LoadOptions(TypedDict, total=False):
    """How the weights are loaded: :func:`load_causal_lm`'s keyword arguments, which
    :func:`build_policy` passes through."""

    dtype: str
    trust_remote_code: bool
    quantization: Quantization
    quant_compute_dtype: str | None
    gradient_checkpointing: bool


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer and make sure it can pad (left padding is set per call by the rollout).

    A tokenizer without a pad token borrows its eos (or unk) token; embeddings are never
    resized, because a new untrained row would change the model silently.
    """
    path, local_only = _locate(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code, local_files_only=local_only
        )
    except OSError as err:
        raise _not_found(name_or_path, str(err)) from err
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


def load_causal_lm(
    name_or_path: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    quantization: Quantization = "none",
    quant_compute_dtype: str | None = None,
    gradient_checkpointing: bool = False,
) -> PreTrainedModel:
    """Load a causal LM with ``from_pretrained``.

    Args:
        dtype: weights dtype, one of :data:`DTYPES` or ``auto`` (the checkpoint's own); with
            quantization, the dtype of the layers left unquantized (embeddings, norms).
        quantization: ``4bit`` (NF4 with double quantization, the QLoRA recipe of Dettmers et
            al. 2023) or ``8bit`` (LLM.int8()) via bitsandbytes; its weights are frozen, so
            train a LoRA adapter on top (:func:`add_lora`).
        quant_compute_dtype: dtype 4-bit matmuls run in (None: ``dtype``, float32 for ``auto``).
        gradient_checkpointing: recompute activations in backward (less memory, ~30% slower).
    """
    _check_dtype("dtype", dtype, allow_auto=True)
    if quantization not in ("none", "4bit", "8bit"):
        raise ValueError(f"quantization={quantization!r} is not one of none, 4bit, 8bit")
    path, local_only = _locate(name_or_path)
    kwargs: dict = {}
    if quantization != "none":
        compute = quant_compute_dtype or (dtype if dtype != "auto" else "float32")
        _check_dtype("quant_compute_dtype", compute, allow_auto=False)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization == "4bit",
            load_in_8bit=quantization == "8bit",
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=DTYPES[compute],
        )
        # Quantize straight onto the device this process trains on (Lightning's later .to() is
        # then a no-op); LOCAL_RANK picks the GPU of a DDP rank.
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        kwargs["device_map"] = {"": device}
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            path,
            dtype="auto" if dtype == "auto" else DTYPES[dtype],
            trust_remote_code=trust_remote_code,
            local_files_only=local_only,
            **kwargs,
        )
    except OSError as err:
        raise _not_found(name_or_path, str(err)) from err
    if quantization == "4bit" and kwargs["device_map"][""] == "cpu":
        _keep_4bit_layout(lm)
    if gradient_checkpointing:
        # Non-reentrant checkpointing lets gradients reach LoRA weights even though the
        # (frozen) embedding output does not require grad. (Renamed in transformers 5.)
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable({"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return lm


def _keep_4bit_layout(lm: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit`` weight the first
    time it runs in eval mode without grad (our rollouts) and keeps it that way; later training
    forwards then go through a kernel without autograd support, and gradients that flow back
    through the frozen layer are silently wrong (checked in tests/test_quant.py).
    """
    for module in lm.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def add_lora(
    lm: PreTrainedModel,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: str | list[str] = "all-linear",
) -> torch.nn.Module:
    """Wrap ``lm`` in a peft LoRA adapter; only the adapter weights stay trainable.

    ``all-linear`` targets every linear layer except the output head, whatever the
    architecture calls them (q_proj/c_attn/...). A quantized model first goes through peft's
    ``prepare_model_for_kbit_training`` (norms upcast to float32, base frozen).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if r <= 0:
        raise ValueError(f"lora_r={r} must be > 0 to add an adapter (0 turns LoRA off)")
    if getattr(lm, "is_loaded_in_4bit", False) or getattr(lm, "is_loaded_in_8bit", False):
        # Checkpointing, if asked for, is already on (load_causal_lm).
        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # Adapter weights in float32 even on a bf16/fp16 base (peft's default, relied on): AdamW's
    # small updates would round away in half precision (see half_precision_trainable).
    return get_peft_model(lm, config, autocast_adapter_dtype=True)


def build_policy(
    name_or_path: str,
    lora_r: int = 0,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    lora_target_modules: str | list[str] = "all-linear",
    critic: bool = True,
    **load: Unpack[LoadOptions],
) -> PolicyWithValueHead:
    """The LM (optionally quantized, optionally with LoRA) and a fresh value head (none without
    ``critic``: critic-free estimators).

    See :func:`add_lora` and :func:`load_causal_lm` (``load``) for the arguments; ``lora_r=0`` trains all
    weights, which a quantized model cannot do, nor a half-precision one (its AdamW updates
    round away). Every dropout is off (:func:`disable_dropout`),
    ``lora_dropout`` included: it only goes into the adapter's saved config.
    """
    quantization, dtype = load.get("quantization", "none"), load.get("dtype", "float32")
    if quantization != "none" and lora_r <= 0:
        raise ValueError(
            f"quantization={quantization!r} freezes the base weights: set lora_r > 0 to train a "
            "LoRA adapter on top (QLoRA), or quantization: none"
        )
    if lora_r <= 0 and DTYPES.get(dtype) in HALF_DTYPES:  # before loading: fail at once
        raise ValueError(_half_full_finetuning(repr(dtype)))
    lm = load_causal_lm(name_or_path, **load)
    half = half_precision_trainable(lm) if lora_r <= 0 else []
    if half:  # dtype: auto, and the checkpoint is in half precision
        resolved = str(lm.get_parameter(half[0]).dtype).removeprefix("torch.")
        raise ValueError(_half_full_finetuning(f"'auto' (the checkpoint's {resolved})"))
    if lora_r > 0:
        lm = add_lora(lm, lora_r, lora_alpha, lora_dropout, lora_target_modules)
    # After LoRA, whose dropout layers go too: PPO's ratios need the update's log-probs (train
    # mode) to equal the rollout's (eval mode).
    log.info("%s: %d dropout probabilities set to 0", name_or_path, disable_dropout(lm))
    return PolicyWithValueHead(lm, critic=critic)


def _half_full_finetuning(dtype: str) -> str:
    """The error for full fine-tuning in half precision, where AdamW's updates round away."""
    return (
        f"dtype={dtype} with lora_r=0 (full fine-tuning) trains half-precision weights, whose small "
        "AdamW updates round away (most weights never change); use dtype: float32 with "
        "trainer.precision: bf16-mixed (fp32 master weights, the activations in bf16) or LoRA (lora_r > 0)"
    )


def _check_dtype(name: str, value: str, allow_auto: bool) -> None:
    allowed = sorted(DTYPES) + (["auto"] if allow_auto else [])
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


def _locate(name_or_path: str) -> tuple[str, bool]:
    """``(path or id, local_files_only)``; fails at once when the files cannot be had.

    huggingface_hub retries a failed connection five times with backoff (~25 s per file), so
    without a network a missing model would hang for minutes. One short probe decides instead:
    offline or unreachable hub -> the cached snapshot's directory (loaded like any local
    directory, so no file lookup can reach for the network), or an error now if there is none.
    """
    path = resolve_model_path(name_or_path)
    if Path(path).expanduser().is_dir():
        return str(Path(path).expanduser()), False
    if path.startswith(("/", ".", "~")) or path.count("/") > 1:
        raise _not_found(name_or_path, "no such local directory")
    cached = isinstance(try_to_load_from_cache(path, "config.json"), str)
    if _offline():
        why = "offline"
    else:
        reachable, why = _hub_reachable()
        if reachable:
            return path, False
        why = f"the hub is unreachable ({why})"
    if not cached:
        raise _not_found(name_or_path, f"{why} and the local Hugging Face cache holds no copy")
    snapshot = snapshot_download(path, local_files_only=True)
    log.info("%s: loading %s from the local cache (%s)", why, name_or_path, snapshot)
    return snapshot, True


def _offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (the hub reads them once, at import)."""
    flags = (os.environ.get(k, "").upper() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return hub_constants.HF_HUB_OFFLINE or any(f in ("1", "ON", "YES", "TRUE") for f in flags)


def _hub_reachable() -> tuple[bool, str]:
    """One HEAD request to the hub endpoint, no retries; any HTTP answer counts as reachable."""
    session = get_session()
    # The hub's HTTP client (httpx, or httpx2 in recent huggingface_hub) names its own errors.
    transport_error = importlib.import_module(type(session).__module__.split(".")[0]).TransportError
    try:
        session.head(hub_constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except transport_error as err:
        return False, f"{type(err).__name__}: {err}"
    return True, ""


def _not_found(name_or_path: str, cause: str) -> OSError:
    offline = _offline()
    where = "a local directory" if Path(name_or_path).expanduser().exists() else "a hub id or local directory"
    hint = (
        " The hub is offline (HF_HUB_OFFLINE=1): download it on a machine with network access "
        "(`hf download ID --local-dir DIR`) and set model.name_or_path to DIR,"
        if offline
        else " Check the spelling, your network and hub login, or pass a local directory;"
    )
    return OSError(
        f"could not load model {name_or_path!r} ({where}).{hint} or use name_or_path: tiny for "
        f"the offline default model. Cause: {cause}"
    )
