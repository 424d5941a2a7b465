"""The limit a rollout or an update is compared with: the bare model's time for the necessary work.

Each of our model calls is *replayed* on the bare Hugging Face model right after it, so that both
see the same load on a shared machine: same batch shapes, KV cache on, and no env, tokenizer,
sampling or PPO bookkeeping. A replay still computes padding, a prefix that every row of a batch
shares (the system prompt) once per row, and, in the update, the LM head at every position. The
*limit* counts only the work that must be done:

- the body (every layer below the LM head) over the tokens that must be encoded: each row's real
  tokens, with a prefix that all rows of a batch share counted once per batch; in generation,
  the prompts and the reply tokens fed back (all but a reply's last); no padding;
- the LM head at the positions whose logits are used: one per reply token (generated, or
  trained on), none at the prompt positions of the update.

Each part of a replay (body, LM head, a decoding step) is timed on its own and scaled by its share
of necessary tokens: within a part, time is taken as proportional to tokens. That holds for the
matmuls, which dominate at these lengths; a call's fixed overhead is scaled down too, so the limit
errs low (our ratio to it high), never in our favour. Padding, the part of a batch's work that
is not necessary, is measured here too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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

    def add(self, other: Clock, share: float = 1.0) -> None:
        self.seconds += share * other.seconds
        self.cpu += share * other.cpu


@dataclass
class Limit:
    """The bare model's time for a set of passes: as replayed (``replay``) and the necessary share
    of it (``necessary``), with the token counts behind the two."""

    replay: Clock
    necessary: Clock
    tokens: int = 0  # body tokens that must be encoded
    replay_tokens: int = 0  # body tokens the replay ran (padding, repeated prefixes included)
    heads: int = 0  # LM-head positions whose logits are used (the reply tokens)
    replay_heads: int = 0  # LM-head positions the replay computed

    @classmethod
    def on(cls, device: torch.device) -> Limit:
        return cls(Clock(device), Clock(device))

    @contextmanager
    def part(self, share: float) -> Iterator[None]:
        """Time a part of a replay of which ``share`` is necessary work."""
        clock = Clock(self.replay.device)
        with clock:
            yield
        self.replay.add(clock)
        self.necessary.add(clock, share)

    def count(self, tokens: int, replay_tokens: int, heads: int, replay_heads: int) -> None:
        self.tokens += tokens
        self.replay_tokens += replay_tokens
        self.heads += heads
        self.replay_heads += replay_heads


def shared_prefix(rows: Sequence[Sequence[int]]) -> int:
    """How many first tokens all rows (two or more, unpadded) share, keeping each row at least one
    token of its own (where its own logits and value are read); 0 for a single row."""
    if len(rows) < 2:
        return 0
    limit = min(len(row) for row in rows) - 1
    n = 0
    for column in zip(*rows, strict=False):
        if n >= limit or any(token != column[0] for token in column):
            break
        n += 1
    return n


def body_and_head(lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The causal LM's body (embeddings, layers, final norm) and its LM head."""
    body, head = lm.base_model, lm.get_output_embeddings()
    if body is lm or head is None:
        raise ValueError(f"cannot split {type(lm).__name__} into a body and an LM head")
    return body, head


def encoded_tokens(lengths: Sequence[int], prefix: int) -> int:
    """Body tokens to encode ``len(lengths)`` rows that share their first ``prefix`` tokens."""
    return sum(lengths) - max(len(lengths) - 1, 0) * prefix


@torch.no_grad()
def bare_generate(
    lm: nn.Module, input_ids: Tensor, attention_mask: Tensor, reply_lengths: Sequence[int], limit: Limit
) -> None:
    """The forward passes ``generate`` made for replies of ``reply_lengths`` tokens, and nothing else.

    Prefill of the left-padded prompts into a KV cache (body, then the LM head at the last
    position), then one single-token step per further token while any reply still grows; argmax
    stands in for sampling (which tokens come does not change the cost). A step is necessary for
    the rows whose reply has a further token.
    """
    body, head = body_and_head(lm)
    b, p = input_ids.shape
    lengths = attention_mask.sum(1).tolist()
    prompts = [row[p - n :] for row, n in zip(input_ids.tolist(), lengths, strict=True)]
    tokens = encoded_tokens(lengths, shared_prefix(prompts))
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P), as generate makes them
    cache = DynamicCache(config=lm.config)
    with limit.part(tokens / (b * p)):
        hidden = body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        ).last_hidden_state  # (B, P, H)
    with limit.part(1.0):  # every row's first reply token
        logits = head(hidden[:, -1:])  # (B, 1, V)
    limit.count(tokens, b * p, b, b)
    mask, position = attention_mask, position_ids[:, -1:]
    for k in range(1, max(reply_lengths)):
        growing = sum(n > k for n in reply_lengths)  # rows that need token k
        with limit.part(growing / b):
            token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            position = position + 1
            logits = lm(
                input_ids=token, attention_mask=mask, position_ids=position, cache=cache, use_cache=True
            ).logits  # (B, 1, V)
        limit.count(growing, b, growing, b)


def bare_update(
    lm: nn.Module, input_ids: Tensor, attention_mask: Tensor, action_mask: Tensor, limit: Limit
) -> None:
    """Forward and backward of the bare LM on a minibatch of right-padded rows: the sum of its
    logits as the loss, gradients for its trainable weights. What any update on these rows must
    compute, but the LM head is needed only at the positions that predict reply tokens
    (``action_mask``), and a prefix all rows share needs encoding once."""
    body, head = body_and_head(lm)
    b, length = input_ids.shape
    lengths = attention_mask.sum(1).tolist()
    rows = [row[:n] for row, n in zip(input_ids.tolist(), lengths, strict=True)]
    tokens, heads = encoded_tokens(lengths, shared_prefix(rows)), int(action_mask.sum())
    body_params = [p for p in body.parameters() if p.requires_grad]
    head_params = [p for p in head.parameters() if p.requires_grad]
    with limit.part(tokens / (b * length)):
        hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
    with limit.part(heads / (b * length)):
        leaf = hidden.detach().requires_grad_()
        logits = head(leaf)  # (B, L, V)
        grad_hidden, *_ = torch.autograd.grad(logits.sum(), [leaf, *head_params])
    with limit.part(tokens / (b * length)):
        torch.autograd.grad(hidden, body_params, grad_outputs=grad_hidden, allow_unused=True)
    limit.count(tokens, b * length, heads, b * length)


def reply_lengths(new: Tensor, eos_token_id: int | list[int] | None) -> list[int]:
    """Each row's reply length in ``generate``'s (B, new) tokens: up to its first end-of-sequence
    token, included (``generate`` pads the rows that finished early)."""
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    lengths = []
    for row in new.tolist():
        ends = [i for i, token in enumerate(row) if token in eos]
        lengths.append(ends[0] + 1 if ends else len(row))
    return lengths


def padding_fraction(shapes: list[tuple[int, int, int]]) -> float:
    """Share of padding in (B, L, non-padding tokens) batches."""
    total = sum(b * length for b, length, _ in shapes)
    return 1.0 - sum(real for *_, real in shapes) / max(total, 1)


def score_padding_fraction(lengths: Tensor, batch_size: int) -> float:
    """Share of padding in prepare_rollout's batches (buffer order, trimmed to each batch's max)."""
    total = sum(len(c) * int(c.max()) for c in lengths.split(batch_size))
    return 1.0 - int(lengths.sum()) / total


def random_padding(lengths: Tensor, num_minibatches: int, update_epochs: int, seed: int = 0) -> float:
    """Share of padding if each random minibatch ran as one forward, not as forwards of similar
    length (:func:`llamagym_pl.minibatches.length_groups`): what the grouping saves."""
    gen = torch.Generator().manual_seed(seed)
    shapes = []
    for _ in range(update_epochs):
        for chunk in torch.tensor_split(torch.randperm(len(lengths), generator=gen), num_minibatches):
            mine = lengths[chunk]
            shapes.append((len(chunk), int(mine.max()), int(mine.sum())))
    return padding_fraction(shapes)
