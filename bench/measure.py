"""One benchmark setting: a rollout and a PPO update, each timed against the bare model's limit.

The *limit* is the bare model's time for the necessary work of the same passes, and the *replay*
its time for the very same passes (same batch shapes and prompt lengths, padding included, KV
cache on), both with no env, no tokenizer, no sampling and no PPO bookkeeping (see
``bench/limit.py``). Each bare pass is replayed right after the real call it copies, so both see
the same load on a shared machine; its time is then taken out of the rollout's.
"""

from __future__ import annotations

import copy
import resource
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from torch import Tensor

from bench.limit import (
    Clock,
    Limit,
    bare_generate,
    bare_update,
    padding_fraction,
    random_padding,
    reply_lengths,
    score_padding_fraction,
)
from llamagym_pl.actions import GenerateStyle, RolloutDataset
from llamagym_pl.agents import BlackjackAgent
from llamagym_pl.buffer import RolloutBuffer, build_buffer
from llamagym_pl.minibatches import MinibatchSampler
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


class ReplayingGenerate:
    """Stands in for ``policy.generate``: times each call, then replays it on the bare model."""

    def __init__(self, policy: PolicyWithValueHead, device: torch.device) -> None:
        self.inner = policy.generate
        self.lm = policy.lm
        self.ours, self.limit = Clock(device), Limit.on(device)
        self.calls = 0

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Tensor:
        with self.ours:
            out = self.inner(input_ids, attention_mask, **kwargs)
        eos = getattr(kwargs.get("generation_config"), "eos_token_id", None)
        replies = reply_lengths(out[:, input_ids.shape[1] :], eos)
        bare_generate(self.lm, input_ids, attention_mask, replies, self.limit)
        self.calls += 1
        return out


@dataclass
class UpdateLog:
    ours: Clock
    limit: Limit
    shapes: list[tuple[int, int, int]]  # (B, L, non-padding tokens) of every minibatch
    ran: list[tuple[int, int, int]]  # (B, L, non-padding tokens) of every LM forward it ran


def lm_forward_shapes(lm: torch.nn.Module, shapes: list[tuple[int, int, int]]) -> Any:
    """Record ``(B, L, non-padding tokens)`` of every forward of ``lm`` into ``shapes`` (packed
    rows included: a 4D mask's slot is real where it sees itself, and the shared prefix's tokens
    in rows of their own); returns the hook handle."""

    def record(_module: Any, _args: Any, kwargs: dict) -> None:
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        b, length = ids.shape
        if mask is None:
            real = b * length
        elif mask.dim() == 4:  # (B, 1, L, c + L): boolean, or additive (0 where seen)
            own = (mask if mask.dtype == torch.bool else mask == 0)[:, 0, :, -length:]  # (B, L, L)
            real = int(own.diagonal(dim1=-2, dim2=-1).sum())
            # Rows that see none of their own columns hold the shared prefix (llamagym_pl.packing):
            # its c tokens are real once.
            if (~own.any(-1).any(-1)).any():
                real += mask.shape[-1] - length
        else:
            real = int(mask[:, -length:].sum())
        shapes.append((b, length, real))

    return lm.register_forward_pre_hook(record, with_kwargs=True)


def run_update(
    policy: PolicyWithValueHead, buf: RolloutBuffer, setting: Setting, device: torch.device
) -> UpdateLog:
    """PPO minibatch steps (loss, backward, clip, AdamW), each followed by its bare replay
    (:func:`bench.limit.bare_update`: the LM alone on the same rows, gradients for its weights)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, eps=1e-5, weight_decay=0.0)  # as PPOModule
    # Create AdamW's state before the clock starts: a run pays that once, not every step. With
    # zero gradients and no weight decay this step leaves the weights as they are.
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    num_minibatches = min(setting.num_minibatches, len(buf))  # one env may finish few episodes
    sampler = MinibatchSampler(buf.train_lengths, num_minibatches, setting.update_epochs, seed=0)
    ours, limit, shapes, ran = Clock(device), Limit.on(device), [], []
    style = GenerateStyle()
    dataset = RolloutDataset(buf, style)
    policy.train()
    for index in islice(sampler, setting.max_update_steps):
        with ours:
            # As the DataModule hands it over: a random minibatch as forwards of similar length.
            parts = [{k: v.to(device) for k, v in part.items()} for part in dataset[index]]
            hook = lm_forward_shapes(policy.lm, ran)
            loss, _ = minibatch_loss(style, policy, parts, CLIP_COEF, True, VF_COEF, 0.0)
            hook.remove()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
        for part in parts:
            bare_update(policy.lm, part["input_ids"], part["attention_mask"], part["action_mask"], limit)
            shapes.append((*part["input_ids"].shape, int(part["attention_mask"].sum())))
    optimizer.zero_grad(set_to_none=True)
    return UpdateLog(ours, limit, shapes, ran)


@dataclass
class Rollout:
    stats: RolloutStats
    whole: Clock  # the collect call, its bare replays taken out
    generate: Clock
    limit: Limit  # the bare replays of its generate calls
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
    whole.add(gen.limit.replay, -1.0)
    return Rollout(stats, whole, gen.ours, gen.limit, gen.calls)


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
    rollout.limit = min((r.limit for r in rollouts), key=lambda limit: limit.replay.seconds)
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
        min((u.limit for u in updates), key=lambda limit: limit.replay.seconds),
        updates[0].shapes,
        updates[0].ran,
    )
    row = make_row(setting, rollout, update, score_clock.seconds, buffer_clock.seconds, len(episodes))
    num_minibatches = min(setting.num_minibatches, len(buf))
    row["update_padding_random"] = random_padding(buf.train_lengths, num_minibatches, setting.update_epochs)
    row["score_padding"] = score_padding_fraction(buf.lengths, SCORE_BATCH_SIZE)
    row["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def ratio(ours: Clock, bare: Clock, clock: str) -> float:
    return ours.cpu / bare.cpu if clock == "cpu" else ours.seconds / bare.seconds


def versus(name: str, ours: Clock, limit: Limit, clock: str) -> dict[str, float]:
    """Our time over the limit (the necessary work) and over the replay (the same passes, the
    old definition of the limit), in ``clock`` time and in wall time."""
    return {
        f"{name}_vs_limit": ratio(ours, limit.necessary, clock),
        f"{name}_vs_replay": ratio(ours, limit.replay, clock),
        f"{name}_vs_limit_wall": ratio(ours, limit.necessary, "wall"),
        f"{name}_vs_replay_wall": ratio(ours, limit.replay, "wall"),
    }


def work(name: str, limit: Limit) -> dict[str, float]:
    """The bare model's seconds and token counts behind ``name``'s limit and replay."""
    return {
        f"{name}_limit_s": limit.necessary.seconds,
        f"{name}_replay_s": limit.replay.seconds,
        f"{name}_encoded_tokens": limit.tokens,
        f"{name}_replay_tokens": limit.replay_tokens,
        f"{name}_head_positions": limit.heads,
        f"{name}_replay_head_positions": limit.replay_heads,
    }


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
        **versus("rollout", rollout.whole, rollout.limit, clock),
        **versus("generate", rollout.generate, rollout.limit, clock),
        **work("rollout", rollout.limit),
        "rollout_encoded_per_generated_token": rollout.limit.tokens / max(rollout.limit.heads, 1),
        "limit_env_steps_per_s": stats.env_steps / rollout.limit.necessary.seconds,
        "replay_env_steps_per_s": stats.env_steps / rollout.limit.replay.seconds,
        "train_episodes": train_episodes,
        "update_steps": len(update.shapes),
        "update_s": update.ours.seconds,
        **versus("update", update.ours, update.limit, clock),
        **work("update", update.limit),
        "update_encoded_per_trained_token": update.limit.tokens / max(update.limit.heads, 1),
        "update_tokens_per_s": update_tokens / update.ours.seconds,
        # What the update's forwards ran: the shared prefix once, the rows packed past it.
        "update_padding": padding_fraction(update.ran),
        "split_s": split,
        "total_s": sum(split.values()),
    }


def snapshot(policy: PolicyWithValueHead) -> dict[str, Tensor]:
    return copy.deepcopy(policy.state_dict())
