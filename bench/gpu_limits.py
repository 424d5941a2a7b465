"""What a GPU could do at best: its peak figures, and the bytes and FLOPs our passes need.

Pure accounting, no timing (``bench/gpu_row.py`` times): the device's HBM bandwidth and dense
bf16 tensor-core FLOP/s (:func:`device_peaks`), the bytes one decode step must read
(:func:`decode_bytes`) and the model FLOPs of a forward or of a LoRA training step
(:func:`forward_flops`, :func:`train_flops`). The timed rates divided by these bounds are the
ratios the GPU check prints: ``decode_vs_hbm_bound`` and the MFUs.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Spec:
    """A spec-sheet entry: dense bf16 tensor FLOP/s (no 2:4 sparsity), HBM bandwidth, and the
    SM count and memory of the whole GPU (to scale the peaks to a MIG slice)."""

    label: str
    pattern: str  # searched in the upper-cased device name
    bandwidth_gbs: float
    bf16_tflops: float
    sms: int
    memory_gb: float


# Most specific first: "H100 NVL" must win over "H100". \b keeps GH200 from matching H200 (its
# HBM differs by model, so it falls back to the device properties).
SPECS = (
    Spec("H200 NVL", r"\bH200 NVL\b", 4800, 835, 132, 141),
    Spec("H200 SXM", r"\bH200\b", 4800, 989, 132, 141),
    Spec("H100 NVL", r"\bH100 NVL\b", 3900, 835, 132, 94),
    Spec("H100 PCIe", r"\bH100 PCIE\b", 2000, 756, 114, 80),
    Spec("H100 SXM", r"\bH100\b", 3350, 989, 132, 80),
    Spec("A100 80GB PCIe", r"\bA100\b.*80GB.*PCIE|\bA100\b.*PCIE.*80GB", 1935, 312, 108, 80),
    Spec("A100 80GB SXM", r"\bA100\b.*80GB", 2039, 312, 108, 80),
    Spec("A100 40GB", r"\bA100\b", 1555, 312, 108, 40),
    Spec("L40S", r"\bL40S\b", 864, 362, 142, 48),
    Spec("L4", r"\bL4\b", 300, 121, 58, 24),
    Spec("B200", r"\bB200\b", 8000, 2250, 148, 180),
)

# Dense fp16/bf16 tensor-core FMAs per cycle per SM, by compute capability: the fallback for a device
# missing from SPECS. 80, 90, 100 as torch.cuda's GPULimits; 86 and 89 (A10, L4, L40S: datacenter
# parts) from their sheets' dense bf16 TFLOP/s / (SMs x 2 x boost clock).
BF16_FMA_PER_CYCLE_PER_SM = {80: 1024, 86: 512, 89: 512, 90: 2048, 100: 4096}

DRY_RUN_PEAKS = (20.0, 0.2)  # GB/s, TFLOP/s: round stand-ins for a CPU, not measured


@dataclass
class Peaks:
    """The bounds the ratios divide by, and where each came from."""

    device: str
    bandwidth_gbs: float
    bf16_tflops: float
    source: str  # "spec sheet: H200 SXM", "--bandwidth-gbs", "device properties" ...
    properties: dict[str, Any] | None = None  # the CUDA device properties' own estimate, a cross-check

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def spec_for(name: str) -> Spec | None:
    """The spec-sheet entry whose pattern the device name matches first, or None."""
    upper = name.upper()
    return next((s for s in SPECS if re.search(s.pattern, upper)), None)


def from_properties(
    sms: int, clock_khz: int | None, capability: int, mem_clock_khz: int | None, bus_bits: int | None
) -> dict[str, float | None]:
    """Peaks from the CUDA device properties: SMs x FMA/cycle x 2 x boost clock, and double data
    rate x bus width x memory clock. Boost clocks overstate sustained FLOP/s a little (H100 SXM:
    ~1070 against the sheet's 989), so the sheet wins where the device is in :data:`SPECS`."""
    fma = BF16_FMA_PER_CYCLE_PER_SM.get(capability)
    tflops = sms * fma * 2 * clock_khz * 1e3 / 1e12 if fma and clock_khz else None
    bandwidth = 2 * bus_bits / 8 * mem_clock_khz * 1e3 / 1e9 if bus_bits and mem_clock_khz else None
    return {"bandwidth_gbs": bandwidth, "bf16_tflops": tflops}


def resolve_peaks(
    name: str,
    properties: dict[str, Any],
    bandwidth_override: float | None = None,
    tflops_override: float | None = None,
) -> Peaks:
    """The device's peaks: an override flag, else the spec sheet (scaled to a MIG slice by its share
    of the SMs and of the memory), else the device properties.

    ``properties``: ``sms``, ``memory_gb``, ``clock_khz``, ``capability`` (e.g. 90),
    ``mem_clock_khz``, ``bus_bits`` (see :func:`cuda_properties`).

    Raises:
        ValueError: a figure that none of them gives, naming the flag to pass.
    """
    derived = from_properties(
        properties["sms"],
        properties.get("clock_khz"),
        properties["capability"],
        properties.get("mem_clock_khz"),
        properties.get("bus_bits"),
    )
    spec, sources = spec_for(name), []
    bandwidth, tflops = derived["bandwidth_gbs"], derived["bf16_tflops"]
    if spec is not None:
        bandwidth, tflops = spec.bandwidth_gbs, spec.bf16_tflops
        sources.append(f"spec sheet: {spec.label}")
        if "MIG" in name.upper():
            # A slice gets its share of the SMs and, roughly, of the memory controllers.
            tflops *= min(1.0, properties["sms"] / spec.sms)
            bandwidth *= min(1.0, properties["memory_gb"] / spec.memory_gb)
            sources.append("scaled to the MIG slice's SMs and memory (approximate)")
    else:
        sources.append("device properties (not in the spec table)")
    if bandwidth_override is not None:
        bandwidth = bandwidth_override
        sources.append("--bandwidth-gbs")
    if tflops_override is not None:
        tflops = tflops_override
        sources.append("--peak-tflops")
    missing = [flag for flag, v in (("--bandwidth-gbs", bandwidth), ("--peak-tflops", tflops)) if v is None]
    if missing:
        raise ValueError(
            f"no peak figures known for {name!r} (properties {properties}): pass {' and '.join(missing)}"
        )
    return Peaks(name, float(bandwidth), float(tflops), "; ".join(sources), {**properties, **derived})


def cuda_properties(device: Any) -> dict[str, Any]:
    """The CUDA device properties :func:`resolve_peaks` reads. CUDA only: call it on a GPU."""
    import torch

    p = torch.cuda.get_device_properties(device)
    return {
        "sms": p.multi_processor_count,
        "memory_gb": p.total_memory / 1e9,
        "capability": p.major * 10 + p.minor,
        # Fields of recent torch versions only (2.6+): without them the spec sheet or a flag must do.
        "clock_khz": getattr(p, "clock_rate", None),
        "mem_clock_khz": getattr(p, "memory_clock_rate", None),
        "bus_bits": getattr(p, "memory_bus_width", None),
    }


def device_peaks(
    device: Any, dry_run: bool, bandwidth_override: float | None, tflops_override: float | None
) -> Peaks:
    """:func:`resolve_peaks` for a CUDA device; on a dry run, the CPU stand-ins :data:`DRY_RUN_PEAKS`."""
    if dry_run:
        bandwidth, tflops = DRY_RUN_PEAKS
        return Peaks(
            "cpu (dry run)",
            bandwidth_override or bandwidth,
            tflops_override or tflops,
            "DRY-RUN STAND-INS for a CPU, not hardware figures: the ratios mean nothing",
        )
    import torch

    return resolve_peaks(
        torch.cuda.get_device_name(device), cuda_properties(device), bandwidth_override, tflops_override
    )


# ----------------------------------------------------------------------------- the model's work
@dataclass(frozen=True)
class ModelWork:
    """What one token costs the model: weights to read, KV cache to hold, matmul weights to run."""

    num_layers: int
    attn_width: int  # num_heads x head_dim: the width of QK^T and AV
    decode_weight_bytes: int  # read by every decode step (the embedding lookup's few rows aside)
    kv_bytes_per_token: int  # K and V of every layer, for one position of one sequence
    matmul_frozen: int  # weights of frozen linear layers (the output layer included)
    matmul_trainable: int  # weights of trainable linear layers (LoRA's A and B, the value head)


def model_work(policy: nn.Module, act_bytes: int) -> ModelWork:
    """Count ``policy``'s (a :class:`~llamagym_pl.policy.PolicyWithValueHead`, LM plain or peft) work.

    ``act_bytes``: bytes per element of the weights as the matmuls read them and of the KV cache
    (2 under bf16 autocast: the float32 LoRA weights are read as cached bf16 copies).
    """
    lm = policy.lm
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    config = base.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    embedding, output = base.get_input_embeddings().weight, base.get_output_embeddings().weight
    weight_elems = sum(p.numel() for p in lm.parameters())  # parameters() counts a tied weight once
    if embedding is not output:
        weight_elems -= embedding.numel()  # untied: the lookup reads B rows, not the table
    frozen = trainable = 0
    for module in policy.modules():
        if isinstance(module, nn.Linear):  # peft's LoRA layers hold nn.Linear base/A/B modules
            if module.weight.requires_grad:
                trainable += module.weight.numel()
            else:
                frozen += module.weight.numel()
    return ModelWork(
        num_layers=config.num_hidden_layers,
        attn_width=heads * head_dim,
        decode_weight_bytes=weight_elems * act_bytes,
        kv_bytes_per_token=2 * config.num_hidden_layers * kv_heads * head_dim * act_bytes,
        matmul_frozen=frozen,
        matmul_trainable=trainable,
    )


def decode_bytes(work: ModelWork, batch: int, prompt_len: int, steps: int) -> int:
    """HBM bytes the ``steps`` decode forwards after a ``(batch, prompt_len)`` prefill must read.

    Step k (1..steps) reads every weight once and the K/V of the ``prompt_len + k`` positions it
    attends to, for each of the ``batch`` rows (left padding included: the cache holds it).
    Activations, logits and the cache's own copying are left out: the bound is what no decoder
    can avoid.
    """
    positions = steps * prompt_len + steps * (steps + 1) // 2  # sum over k of (prompt_len + k)
    return steps * work.decode_weight_bytes + batch * positions * work.kv_bytes_per_token


def attention_flops(work: ModelWork, lengths: list[int]) -> float:
    """QK^T and AV of one forward over rows of ``lengths`` tokens, counted without the causal mask
    (PaLM's convention, Chowdhery et al. 2022, appendix B): 4 x layers x width x L^2 per row."""
    return 4.0 * work.num_layers * work.attn_width * sum(n * n for n in lengths)


def forward_flops(work: ModelWork, lengths: list[int]) -> float:
    """A forward over rows of ``lengths`` non-padding tokens: 2 FLOPs per weight per token, plus
    attention."""
    tokens = sum(lengths)
    return 2.0 * (work.matmul_frozen + work.matmul_trainable) * tokens + attention_flops(work, lengths)


def train_flops(work: ModelWork, lengths: list[int]) -> float:
    """A LoRA training step (forward and backward) over rows of ``lengths`` non-padding tokens.

    Forward 2·N·T; backward 2·N·T for the activation gradients (they must reach the first
    layer's adapter) and 2·N_trainable·T for the weight gradients, none for the frozen weights:
    4·N·T + 2·N_trainable·T, N every linear weight (output layer included, embedding lookup not).
    Attention has no weights: its backward is twice its forward, 3 x :func:`attention_flops`.
    Full fine-tuning (all weights trainable) gives the familiar 6·N·T.
    """
    tokens = sum(lengths)
    n_all = work.matmul_frozen + work.matmul_trainable
    return (4.0 * n_all + 2.0 * work.matmul_trainable) * tokens + 3.0 * attention_flops(work, lengths)
