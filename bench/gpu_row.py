"""The GPU check's bench row: a random Qwen2.5-0.5B-shaped policy, LoRA in bf16, on our code path.

Builds the model locally from a config (random weights, no download; the tiny word-level
tokenizer padded with dummy words to Qwen2.5's 151,936-token vocabulary), loads it with
:func:`~llamagym_pl.loading.build_policy` (LoRA on every linear layer, ``dtype: bfloat16``), plays
Blackjack with :class:`~llamagym_pl.rollout.RolloutCollector` and
:class:`~llamagym_pl.actions.GenerateStyle`, then :func:`~llamagym_pl.update.prepare_rollout` and
PPO minibatch steps through :func:`~llamagym_pl.update.minibatch_loss`, all under bf16 autocast as
``trainer.precision: bf16-mixed`` runs them. Each phase is timed against the device's bounds
(``bench/gpu_limits.py``): decode tokens/s against the HBM-bandwidth bound, and the model FLOPs
utilization (MFU) of the preparation pass and of the update.

    python bench/gpu_row.py --out row.json [--dry-run] [--bandwidth-gbs X] [--peak-tflops Y]

``bench/gpu_check.py`` runs it in a process of its own and judges the numbers. ``--dry-run``: the
CPU, tiny shapes, stand-in peaks. Exits 1 without a CUDA device (and no ``--dry-run``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen2Config

from bench.gpu_limits import ModelWork, Peaks, device_peaks, forward_flops, model_work, train_flops
from bench.gpu_timing import PeakMemory, TimedGenerate, bf16_autocast, decode_summary, environment
from bench.limit import Clock
from llamagym_pl.actions import GenerateStyle
from llamagym_pl.agents import BlackjackAgent
from llamagym_pl.buffer import RolloutBuffer, build_buffer
from llamagym_pl.episode import Episode
from llamagym_pl.loading import build_policy, load_tokenizer
from llamagym_pl.minibatches import MinibatchSampler
from llamagym_pl.policy import PolicyWithValueHead
from llamagym_pl.rollout import RolloutCollector
from llamagym_pl.tiny_model import BOS, EOS, PAD, build_tiny_tokenizer, tiny_vocab
from llamagym_pl.update import make_optimizer, minibatch_loss, prepare_rollout

# experiments/blackjack-lora.yaml's game and PPO settings (PPOModule's defaults for the rest).
ENV_ID, ENV_KWARGS, INVALID_PENALTY = "Blackjack-v1", {"natural": False, "sab": False}, -1.0
GAMMA, GAE_LAMBDA, CLIP_COEF, VF_COEF, MAX_GRAD_NORM, LR = 1.0, 0.95, 0.2, 0.5, 1.0, 1e-4


@dataclasses.dataclass(frozen=True)
class RowConfig:
    """The model's shapes and the work the row times."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    num_envs: int  # the generate batch
    steps_per_env: int
    max_new_tokens: int  # a random model rarely samples its end token: nearly every reply is this long
    update_epochs: int = 2
    num_minibatches: int = 4
    prepare_batch_size: int = 64  # rows per forward of the preparation pass
    lora_r: int = 16
    lora_alpha: float = 32.0


# Qwen2.5-0.5B's config.json shapes (494M parameters, the output layer tied to the embedding).
# 128 envs, 4 turns each and more (whole hands): a batch of 128 to decode at first. A random model
# rarely samples its end token, so replies are cut at 32 tokens and each turn is a row of its own
# (see buffer.py): 512 rows or more, trained in 2 x 8 minibatches (8, not 4: half the peak memory).
QWEN25_05B = RowConfig(
    896, 24, 14, 2, 4864, 151_936, num_envs=128, steps_per_env=4, max_new_tokens=32, num_minibatches=8
)
# A few seconds on a CPU, every code path of the real row (grouped-query attention included).
DRY_RUN = RowConfig(
    64, 2, 4, 2, 128, len(tiny_vocab()) + 64, num_envs=8, steps_per_env=2, max_new_tokens=8,
    num_minibatches=2, prepare_batch_size=8,
)  # fmt: skip


def build_model(out_dir: Path, cfg: RowConfig, seed: int = 0) -> Path:
    """A randomly initialised Qwen2 of ``cfg``'s shapes in bf16 and a word-level tokenizer with a
    chat template (the tiny model's words, then dummy words ``w0``, ``w1``... up to the vocabulary
    size), saved for ``from_pretrained``."""
    extra = cfg.vocab_size - len(tiny_vocab())
    if extra < 0:
        raise ValueError(f"vocab_size={cfg.vocab_size} is below the tiny vocabulary's {len(tiny_vocab())}")
    tokenizer = build_tiny_tokenizer([f"w{i}" for i in range(extra)])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (BOS, EOS, PAD)}
    config = Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=32_768,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    lm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@dataclasses.dataclass
class Bench:
    """What every timed phase of the row needs."""

    policy: PolicyWithValueHead
    tokenizer: Any
    style: GenerateStyle
    cfg: RowConfig
    work: ModelWork
    peaks: Peaks
    device: torch.device

    def mfu(self, flops: float, seconds: float) -> float:
        return flops / (seconds * self.peaks.bf16_tflops * 1e12)


def play(b: Bench) -> tuple[dict[str, Any], list[Episode]]:
    """One timed rollout (seed 0, epoch 1) after an untimed one-step warm-up (CUDA context, cuBLAS
    handles, the caching allocator): its rates, and decode tokens/s against the HBM bound
    (:func:`~bench.gpu_timing.decode_summary`). Returns the row's part and the episodes."""
    cfg = b.cfg
    collector = RolloutCollector(
        ENV_ID, ENV_KWARGS, BlackjackAgent(), cfg.num_envs, b.style, invalid_penalty=INVALID_PENALTY
    )
    try:
        with bf16_autocast(b.device):
            collector.collect(b.policy, b.tokenizer, seed=0, epoch=0, steps_per_env=1)
        timed = TimedGenerate(b.policy, b.device)
        b.policy.generate = timed  # an instance attribute shadows the method (as bench/measure.py)
        try:
            with PeakMemory(b.device) as memory, bf16_autocast(b.device), Clock(b.device) as clock:
                stats = collector.collect(
                    b.policy, b.tokenizer, seed=0, epoch=1, steps_per_env=cfg.steps_per_env
                )
        finally:
            del b.policy.generate
    finally:
        collector.close()
    part = {
        "num_envs": cfg.num_envs,
        "steps_per_env": cfg.steps_per_env,
        "max_new_tokens": cfg.max_new_tokens,
        "env_steps": stats.env_steps,
        "episodes": len(stats.episodes),
        "rollout_s": clock.seconds,
        "env_steps_per_s": stats.env_steps / clock.seconds,
        # The replies' tokens (up to each one's end token) over the whole rollout, env and tokenizer included.
        "reply_tokens_per_s": stats.generated_tokens / clock.seconds,
        **decode_summary(timed.calls, b.work, b.peaks.bandwidth_gbs),
        "peak_memory_mb": memory.mb,
    }
    return part, stats.episodes


def prepare(b: Bench, buf: RolloutBuffer) -> dict[str, Any]:
    """The preparation pass (old log-probs, values, GAE), timed: one forward over every row.

    Run twice on the same buffer (it only fills it in), the first untimed: a training run pays
    the first call's kernel loading once, not every epoch."""
    with bf16_autocast(b.device):
        prepare_rollout(b.policy, buf, b.style, GAMMA, GAE_LAMBDA, b.cfg.prepare_batch_size)
    with PeakMemory(b.device) as memory, bf16_autocast(b.device), Clock(b.device) as clock:
        prepare_rollout(b.policy, buf, b.style, GAMMA, GAE_LAMBDA, b.cfg.prepare_batch_size)
    lengths = buf.lengths.tolist()
    flops = forward_flops(b.work, lengths)
    return {
        "rows": len(lengths),
        "tokens": sum(lengths),
        "seconds": clock.seconds,
        "tokens_per_s": sum(lengths) / clock.seconds,
        "flops": flops,
        "mfu": b.mfu(flops, clock.seconds),
        "peak_memory_mb": memory.mb,
    }


def loss_of(b: Bench, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The PPO minibatch loss, under autocast as Lightning's training step runs it."""
    batch = {k: v.to(b.device) for k, v in batch.items()}
    with bf16_autocast(b.device):
        return minibatch_loss(b.style, b.policy, batch, CLIP_COEF, True, VF_COEF, 0.0)


def update(b: Bench, buf: RolloutBuffer) -> dict[str, Any]:
    """``update_epochs x num_minibatches`` PPO steps (loss, backward, clip, AdamW), timed as one
    block, after an untimed forward and backward and the creation of AdamW's state."""
    params = [p for p in b.policy.parameters() if p.requires_grad]
    optimizer, _ = make_optimizer(params, LR, 1e-5, 0.0, "constant", None)  # PPOModule's AdamW
    num_minibatches = min(b.cfg.num_minibatches, len(buf.train_lengths))
    indices = list(MinibatchSampler(buf.train_lengths, num_minibatches, b.cfg.update_epochs, seed=0))
    b.policy.train()
    loss_of(b, b.style.minibatch(buf, indices[0]))[0].backward()
    # A step on zero gradients with no weight decay creates AdamW's state and moves no weight.
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lengths, padded, metrics = [], 0, []
    with PeakMemory(b.device) as memory, Clock(b.device) as clock:
        for index in indices:
            batch = b.style.minibatch(buf, index)
            lengths += batch["attention_mask"].sum(1).tolist()  # on the CPU still: no device sync
            padded += batch["attention_mask"].numel()
            loss, step_metrics = loss_of(b, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            metrics.append(step_metrics)
    optimizer.zero_grad(set_to_none=True)
    flops = train_flops(b.work, lengths)
    return {
        "steps": len(indices),
        "tokens": sum(lengths),
        "padding": 1.0 - sum(lengths) / padded,
        "seconds": clock.seconds,
        "tokens_per_s": sum(lengths) / clock.seconds,
        "flops": flops,
        "flops_formula": "4*N*T + 2*N_trainable*T + 12*layers*d_attn*sum(L^2) (LoRA; full: 6*N*T)",
        "mfu": b.mfu(flops, clock.seconds),
        "losses_finite": all(bool(torch.isfinite(torch.as_tensor(m["train/loss"]))) for m in metrics),
        # PPO's ratio is exactly 1 before the first update on the CPU (tests/test_exact_ppo.py); on
        # a GPU the preparation and the loss batch rows differently, and kernels may round differently.
        "first_step_approx_kl": float(metrics[0]["train/approx_kl"]),
        "first_step_clipfrac": float(metrics[0]["train/clipfrac"]),
        "peak_memory_mb": memory.mb,
    }


def run_row(cfg: RowConfig, device: torch.device, peaks: Peaks, model_dir: Path) -> dict[str, Any]:
    """Load the policy as :class:`~llamagym_pl.module.PPOModule` does, then time the rollout, the
    preparation pass and the update."""
    tokenizer = load_tokenizer(str(model_dir))
    policy = build_policy(str(model_dir), lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, dtype="bfloat16")
    policy = policy.to(device)
    work = model_work(policy, act_bytes=2)  # bf16 weights and KV cache (autocast reads LoRA's fp32 as bf16)
    b = Bench(policy, tokenizer, GenerateStyle(cfg.max_new_tokens), cfg, work, peaks, device)
    rollout, episodes = play(b)
    buf = build_buffer(tokenizer, episodes, temperature=b.style.temperature)
    b.style.encode(tokenizer, episodes, buf)
    prepared = prepare(b, buf)
    updated = update(b, buf)
    params = list(policy.parameters())
    return {
        "model": {
            "architecture": "Qwen2ForCausalLM, random weights (Qwen2.5-0.5B shapes unless --dry-run)",
            **{k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("num_envs", "steps_per_env")},
            "dtype": "bf16 base, fp32 LoRA and value head, bf16 autocast (as trainer.precision: bf16-mixed)",
            "parameters": sum(p.numel() for p in params),
            "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
            "work": dataclasses.asdict(work),
        },
        "device": str(device),
        "peaks": peaks.as_dict(),
        "rollout": rollout,
        "prepare": prepared,
        "update": updated,
        "ratios": {
            "decode_vs_hbm_bound": rollout["decode_vs_hbm_bound"],
            "prepare_mfu": prepared["mfu"],
            "update_mfu": updated["mfu"],
        },
        "memory": {
            "peak_mb": max(part["peak_memory_mb"] for part in (rollout, prepared, updated)),
            "source": PeakMemory(device).source,
        },
    }


def write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="the row's JSON file")
    p.add_argument("--dry-run", action="store_true", help="the CPU, tiny shapes, stand-in peaks")
    p.add_argument(
        "--bandwidth-gbs", type=float, default=None, help="HBM bandwidth, GB/s (default: by device)"
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 TFLOP/s (default: by device)")
    p.add_argument("--num-envs", type=int, default=None, help="the generate batch (default 128)")
    p.add_argument("--steps-per-env", type=int, default=None, help="turns per env (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="reply length (default 32)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()  # a log file, not a terminal
    result: dict[str, Any] = {"complete": False, "dry_run": args.dry_run, "env": environment()}
    write(args.out, result)  # what the machine is, even if the row then fails
    if not args.dry_run and not result["env"]["cuda_available"]:
        result["problems"] = [
            f"no CUDA device visible (torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
            "on a CPU use --dry-run"
        ]
        write(args.out, result)
        print(result["problems"][0], file=sys.stderr)
        return 1
    device = torch.device("cpu" if args.dry_run else "cuda")
    sizes = ("num_envs", "steps_per_env", "max_new_tokens")
    overrides = {k: getattr(args, k) for k in sizes if getattr(args, k) is not None}
    cfg = dataclasses.replace(DRY_RUN if args.dry_run else QWEN25_05B, **overrides)
    peaks = device_peaks(device, args.dry_run, args.bandwidth_gbs, args.peak_tflops)
    with tempfile.TemporaryDirectory(prefix="gpu_row_") as tmp:
        result.update(run_row(cfg, device, peaks, build_model(Path(tmp) / "model", cfg)))
    result["complete"] = True
    write(args.out, result)
    print(json.dumps(result["ratios"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
