"""Timing, memory and versions on the device for the GPU check's bench row (``bench/gpu_row.py``).

Decode steps are timed on the device's own timeline: a forward hook records a CUDA event after
every forward of a generation call (``llamagym_pl.decode`` or ``generate``), so nothing waits for
the GPU between steps (a per-step synchronize would stop the host from queueing the next step and
slow what it measures). On the CPU (``--dry-run``) the same marks are ``perf_counter`` readings.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from typing import Any

import peft
import torch
import transformers
from torch import Tensor

from bench.gpu_limits import ModelWork, decode_bytes
from bench.limit import sync
from bench.measure import peak_rss_mb, reset_peak_rss
from llamagym_pl.lm_calls import base_model


def bf16_autocast(device: torch.device) -> torch.autocast:
    """What ``trainer.precision: bf16-mixed`` wraps the rollout, the preparation and the loss in."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class PeakMemory:
    """``with PeakMemory(device) as m:`` then ``m.mb``: the block's peak memory in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, not the allocator's cache). CPU: the
    process's peak RSS, reset at entry (Linux; elsewhere the process-wide peak).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mb = 0.0

    @property
    def source(self) -> str:
        return "torch.cuda.max_memory_allocated" if self.device.type == "cuda" else "peak RSS (CPU)"

    def __enter__(self) -> PeakMemory:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.mb = peak_rss_mb()


class StepMarks:
    """Marks the end of every forward of one generation call: a forward hook on the transformers
    model (the prefill, then each decode step), whichever loop runs them (``llamagym_pl.decode``
    or ``generate``); nothing it computes is touched.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()  # on the current stream, where generate queues its kernels
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def __call__(self, _module: Any, _args: Any, _output: Any) -> None:
        self.mark()

    def seconds(self, i: int, j: int) -> float:
        """Time from mark ``i`` to mark ``j``; on CUDA, call after synchronizing."""
        if self.device.type == "cuda":
            return self.marks[i].elapsed_time(self.marks[j]) / 1000
        return self.marks[j] - self.marks[i]


@dataclass
class GenerateCall:
    """One ``generate`` call: its (B, P) prompt batch, forwards run, and times."""

    batch: int
    prompt_len: int  # left padding included: the KV cache holds it
    forwards: int  # the prefill and the decode steps (1 + decode_steps)
    seconds: float  # wall time of the whole call
    prefill_s: float  # the rows' rest when the shared prefix came in a cache (sampling.py)
    decode_s: float  # from the end of the prefill to the end of the last decode step

    @property
    def decode_steps(self) -> int:
        return self.forwards - 1


class TimedGenerate:
    """Stands in for ``policy.generate``: hooks :class:`StepMarks` on each call and records it."""

    def __init__(self, policy: torch.nn.Module, device: torch.device) -> None:
        self.inner = policy.generate
        self.model = base_model(policy.lm)  # under peft too: the model whose forward runs each step
        self.device = device
        self.calls: list[GenerateCall] = []

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Tensor:
        marks = StepMarks(self.device)
        sync(self.device)
        start = time.perf_counter()
        marks.mark()  # the start of the prefill
        hook = self.model.register_forward_hook(marks)
        try:
            out = self.inner(input_ids, attention_mask, **kwargs)
        finally:
            hook.remove()
        sync(self.device)
        seconds = time.perf_counter() - start
        forwards = len(marks.marks) - 1
        decode_s = marks.seconds(1, forwards) if forwards > 1 else 0.0
        self.calls.append(
            GenerateCall(
                input_ids.shape[0], input_ids.shape[1], forwards, seconds, marks.seconds(0, 1), decode_s
            )
        )
        return out


def decode_summary(calls: list[GenerateCall], work: ModelWork, bandwidth_gbs: float) -> dict[str, Any]:
    """Decode tokens/s over every call's decode steps against the HBM-bandwidth bound: the time
    reading :func:`~gpu_limits.decode_bytes` (weights + KV cache, per step) at ``bandwidth_gbs``
    takes. ``decode_vs_hbm_bound`` is the share of the bound reached (1.0: at the bound)."""
    tokens = sum(c.batch * c.decode_steps for c in calls)
    decode_s = sum(c.decode_s for c in calls)
    bound_bytes = sum(decode_bytes(work, c.batch, c.prompt_len, c.decode_steps) for c in calls)
    weight_bytes = sum(c.decode_steps for c in calls) * work.decode_weight_bytes
    bound_s = bound_bytes / (bandwidth_gbs * 1e9)
    return {
        "generate_calls": len(calls),
        "batch_sizes": [c.batch for c in calls],
        "prompt_lens": [c.prompt_len for c in calls],
        "generate_s": sum(c.seconds for c in calls),
        "prefill_s": sum(c.prefill_s for c in calls),
        "decode_s": decode_s,
        "decode_tokens": tokens,
        "decode_tokens_per_s": tokens / decode_s if decode_s else 0.0,
        "hbm_bound_tokens_per_s": tokens / bound_s if bound_s else 0.0,
        "decode_vs_hbm_bound": bound_s / decode_s if decode_s else 0.0,
        "weight_bytes_per_step": work.decode_weight_bytes,
        "kv_bytes_per_token": work.kv_bytes_per_token,
        "kv_share_of_bound": 1.0 - weight_bytes / bound_bytes if bound_bytes else 0.0,
    }


def environment() -> dict[str, Any]:
    """Versions and the device: what the numbers were measured with."""
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,  # None: a CPU build of torch
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "cuda_available": cuda,
        "device_name": torch.cuda.get_device_name() if cuda else None,
        "device_count": torch.cuda.device_count() if cuda else 0,
    }
