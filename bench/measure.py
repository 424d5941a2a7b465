"""One benchmark setting: a rollout and a PPO update, each timed against the bare model's limit.

The *limit* is the time the bare Hugging Face model needs for the very same forward (and, for
the update, backward) passes: same batch shapes, same prompt lengths, same number of new tokens,
KV cache on, but no env, no tokenizer, no sampling and no PPO bookkeeping. Each bare pass is
replayed right after the real call it copies, so both see the same load on a shared machine; its
time is then taken out of the rollout's.
"""

from __future__ import annotations

import copy
import resource
import time
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from llamagym_pl.actions import GenerateStyle
from llamagym_pl.actions.generate import row_minibatch
from llamagym_pl.agents import BlackjackAgent
from llamagym_pl.buffer import MinibatchSampler, RolloutBuffer, build_buffer
from llamagym_pl.policy import PolicyWithValueHead
from llamagym_pl.rollout import RolloutCollector
from llamagym_pl.stats import RolloutStats
from llamagym_pl.update import minibatch_loss, prepare_rollout

# experiments/blackjack-generate.yaml's env and PPO settings (PPOModule's defaults for the rest).
ENV_ID, ENV_KWARGS = "Blackjack-v1", {"natural": False, "sab": False}
MAX_NEW_TOKENS, INVALID_PENALTY = 4, -1.0
GAMMA, GAE_LAMBDA, CLIP_COEF, VF_COEF, MAX_GRAD_NORM, LR = 1.0, 0.95, 0.2, 0.5, 1.0, 1e-3
SCORE_BATCH_SIZE = 64


@dataclass
class Setting:
    """What one row of the table runs."""

    model: str
    device: str
    num_envs: int
    steps_per_env: int
    update_epochs: int = 1
    num_minibatches: int = 4
    max_update_steps: int | None = None  # optimizer steps timed (None: every minibatch)
    max_train_episodes: int | None = None  # episodes scored and trained on (None: all)
    repeats: int = 2  # identical runs of the rollout and the update; the fastest counts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM), so that each setting reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux: peak_rss_mb is then the process-wide peak


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class Clock:
    """Adds up the wall time of ``with clock:`` blocks, queued device work included, and the
    process's CPU time: with one torch thread that is the work done, whatever share of the cores
    the other tenants of a shared machine took meanwhile."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self.cpu = 0.0

    def __enter__(self) -> Clock:
        sync(self.device)
        self._start, self._cpu_start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        self.seconds += time.perf_counter() - self._start
        self.cpu += time.process_time() - self._cpu_start


@torch.no_grad()
def bare_generate(lm: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, new_tokens: int) -> None:
    """The forward passes ``generate`` makes for ``new_tokens`` tokens, and nothing else.

    Prefill of the left-padded prompts into a KV cache, then one single-token step per further
    token; argmax stands in for sampling (which tokens come does not change the cost).
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P), as generate makes them
    cache = DynamicCache(config=lm.config)
    logits = lm(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits  # (B, 1, V)
    mask, position = attention_mask, position_ids[:, -1:]
    for _ in range(new_tokens - 1):
        token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        position = position + 1
        logits = lm(
            input_ids=token, attention_mask=mask, position_ids=position, cache=cache, use_cache=True
        ).logits


class ReplayingGenerate:
    """Stands in for ``policy.generate``: times each call, then replays it on the bare model."""

    def __init__(self, policy: PolicyWithValueHead, device: torch.device) -> None:
        self.inner = policy.generate
        self.lm = policy.lm
        self.ours, self.bare = Clock(device), Clock(device)
        self.shapes: list[tuple[int, int, int]] = []  # (B, P, new tokens) of every call

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Tensor:
        with self.ours:
            out = self.inner(input_ids, attention_mask, **kwargs)
        new_tokens = out.shape[1] - input_ids.shape[1]
        with self.bare:
            bare_generate(self.lm, input_ids, attention_mask, new_tokens)
        self.shapes.append((*input_ids.shape, new_tokens))
        return out


@dataclass
class UpdateLog:
    ours: Clock
    bare: Clock
    shapes: list[tuple[int, int, int]]  # (B, L, non-padding tokens) of every minibatch


def run_update(
    policy: PolicyWithValueHead, buf: RolloutBuffer, setting: Setting, device: torch.device
) -> UpdateLog:
    """PPO minibatch steps (loss, backward, clip, AdamW), each followed by a bare fwd+bwd.

    The bare pass is the LM alone on the same (B, L) ids and mask, the sum of its logits as the
    loss, and gradients for the same weights: what any update on these batches must compute.
    """
    params = [p for p in policy.parameters() if p.requires_grad]
    lm_params = [p for p in policy.lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, eps=1e-5, weight_decay=0.0)  # as PPOModule
    # Create AdamW's state before the clock starts: a run pays that once, not every step. With
    # zero gradients and no weight decay this step leaves the weights as they are.
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    num_minibatches = min(setting.num_minibatches, len(buf))  # one env may finish few episodes
    sampler = MinibatchSampler(buf.train_lengths, num_minibatches, setting.update_epochs, seed=0)
    ours, bare, shapes = Clock(device), Clock(device), []
    policy.train()
    for index in islice(sampler, setting.max_update_steps):
        with ours:
            batch = {k: v.to(device) for k, v in row_minibatch(buf, index).items()}
            loss, _ = minibatch_loss(GenerateStyle(), policy, batch, CLIP_COEF, True, VF_COEF, 0.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
        with bare:
            logits = policy.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            torch.autograd.grad(logits.sum(), lm_params)
        shapes.append((*batch["input_ids"].shape, int(batch["attention_mask"].sum())))
    optimizer.zero_grad(set_to_none=True)
    return UpdateLog(ours, bare, shapes)


def padding_fraction(shapes: list[tuple[int, int, int]]) -> float:
    """Share of padding in (B, L, non-padding tokens) batches."""
    total = sum(b * length for b, length, _ in shapes)
    return 1.0 - sum(real for *_, real in shapes) / max(total, 1)


def score_padding_fraction(lengths: Tensor, batch_size: int) -> float:
    """Share of padding in prepare_rollout's batches (buffer order, trimmed to each batch's max)."""
    total = sum(len(c) * int(c.max()) for c in lengths.split(batch_size))
    return 1.0 - int(lengths.sum()) / total


@dataclass
class Rollout:
    stats: RolloutStats
    whole: Clock  # the collect call, its bare replays taken out
    generate: Clock
    limit: Clock  # the bare replays of its generate calls
    calls: int


def play(policy: PolicyWithValueHead, tokenizer, collector: RolloutCollector, setting: Setting) -> Rollout:
    """One ``collect`` (seed 0, epoch 1: the same episodes every time) with its bare replays."""
    gen = ReplayingGenerate(policy, torch.device(setting.device))
    policy.generate = gen  # an instance attribute shadows the method
    try:
        with Clock(torch.device(setting.device)) as whole:
            stats = collector.collect(policy, tokenizer, seed=0, epoch=1, steps_per_env=setting.steps_per_env)
    finally:
        del policy.generate
    whole.seconds, whole.cpu = whole.seconds - gen.bare.seconds, whole.cpu - gen.bare.cpu
    return Rollout(stats, whole, gen.ours, gen.bare, len(gen.shapes))


def run_setting(
    policy: PolicyWithValueHead, initial_state: dict[str, Tensor], tokenizer, setting: Setting
) -> dict[str, Any]:
    """Rollout, buffer, scoring and update for one setting; returns the row of the table.

    The rollout and the update each run ``setting.repeats`` times on identical work (same seeds,
    same starting weights); the fastest run and the fastest bare replay count, which damps the
    noise of a shared machine.
    """
    device = torch.device(setting.device)
    policy.load_state_dict(initial_state)  # every setting starts from the same weights
    collector = RolloutCollector(
        ENV_ID,
        ENV_KWARGS,
        BlackjackAgent(),
        setting.num_envs,
        GenerateStyle(MAX_NEW_TOKENS),
        invalid_penalty=INVALID_PENALTY,
    )
    collector.collect(policy, tokenizer, seed=0, epoch=0, steps_per_env=1)  # warm up
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rollouts = [play(policy, tokenizer, collector, setting) for _ in range(setting.repeats)]
    collector.close()
    rollout = min(rollouts, key=lambda r: r.whole.seconds)
    rollout.limit = min((r.limit for r in rollouts), key=lambda c: c.seconds)
    episodes = rollout.stats.episodes[: setting.max_train_episodes]
    with Clock(device) as buffer_clock:
        buf = build_buffer(tokenizer, episodes)
    with Clock(device) as score_clock:
        prepare_rollout(policy, buf, GenerateStyle(), GAMMA, GAE_LAMBDA, SCORE_BATCH_SIZE)
    updates = []
    for _ in range(setting.repeats):
        policy.load_state_dict(initial_state)
        updates.append(run_update(policy, buf, setting, device))
    policy.load_state_dict(initial_state)
    update = UpdateLog(
        min((u.ours for u in updates), key=lambda c: c.seconds),
        min((u.bare for u in updates), key=lambda c: c.seconds),
        updates[0].shapes,
    )
    row = make_row(setting, rollout, update, score_clock.seconds, buffer_clock.seconds, len(episodes))
    row["score_padding"] = score_padding_fraction(buf.lengths, SCORE_BATCH_SIZE)
    row["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def ratio(ours: Clock, bare: Clock, clock: str) -> float:
    return ours.cpu / bare.cpu if clock == "cpu" else ours.seconds / bare.seconds


def make_row(
    setting: Setting,
    rollout: Rollout,
    update: UpdateLog,
    score_s: float,
    buffer_s: float,
    train_episodes: int,
) -> dict[str, Any]:
    """Rates and the time split in wall time; the ratios to the limit in CPU time on the CPU."""
    stats, seconds, generate_s = rollout.stats, rollout.whole.seconds, rollout.generate.seconds
    clock = "cpu" if setting.device == "cpu" else "wall"
    split = {
        "generation": generate_s,
        "scoring": score_s,
        "update": update.ours.seconds,
        "env": stats.env_seconds,
        # Prompt rendering and tokenization, reply decoding, loop bookkeeping, building the buffer.
        "other": seconds - generate_s - stats.env_seconds + buffer_s,
    }
    update_tokens = sum(real for *_, real in update.shapes)
    return {
        **{k: getattr(setting, k) for k in ("model", "device", "num_envs", "steps_per_env", "repeats")},
        "env_steps": stats.env_steps,
        "rollout_s": seconds,
        "env_steps_per_s": stats.env_steps / seconds,
        "episodes_per_s": sum(ep.done for ep in stats.episodes) / seconds,
        "generated_tokens_per_s": stats.generated_tokens / seconds,
        "prompt_tokens_per_s": stats.prompt_tokens / seconds,
        "prompt_tokens_per_step": stats.prompt_tokens / stats.env_steps,
        "generate_calls": rollout.calls,
        "ratio_clock": clock,
        "rollout_limit_s": rollout.limit.seconds,
        "rollout_vs_limit": ratio(rollout.whole, rollout.limit, clock),
        "generate_vs_limit": ratio(rollout.generate, rollout.limit, clock),
        "rollout_vs_limit_wall": ratio(rollout.whole, rollout.limit, "wall"),
        "limit_env_steps_per_s": stats.env_steps / rollout.limit.seconds,
        "train_episodes": train_episodes,
        "update_steps": len(update.shapes),
        "update_s": update.ours.seconds,
        "update_limit_s": update.bare.seconds,
        "update_vs_limit": ratio(update.ours, update.bare, clock),
        "update_vs_limit_wall": ratio(update.ours, update.bare, "wall"),
        "update_tokens_per_s": update_tokens / update.ours.seconds,
        "update_padding": padding_fraction(update.shapes),
        "split_s": split,
        "total_s": sum(split.values()),
    }


def snapshot(policy: PolicyWithValueHead) -> dict[str, Tensor]:
    return copy.deepcopy(policy.state_dict())
