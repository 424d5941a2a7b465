"""Rows packed into one sequence on their shared prefix (:mod:`llamagym_pl.packing`): the hidden
states, values and gradients of the rows run as a padded batch, in one pack or several; and a
model that does not honour the packing mask is found out on first use and runs padded batches."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from model_helpers import scored_batch
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from llamagym_pl import packing
from llamagym_pl.actions import GenerateStyle, rows
from llamagym_pl.actions.generate import row_minibatch
from llamagym_pl.buffer import build_buffer
from llamagym_pl.episode import Episode
from llamagym_pl.policy import PolicyWithValueHead
from llamagym_pl.update import prepare_rollout

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@contextmanager
def lm_calls(policy: PolicyWithValueHead) -> Iterator[list[tuple[int, ...]]]:
    """The ``input_ids`` shape of every LM forward in the block."""
    calls: list[tuple[int, ...]] = []
    hook = policy.lm.register_forward_pre_hook(
        lambda _m, _a, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        yield calls
    finally:
        hook.remove()


def hidden_and_grads(
    policy: PolicyWithValueHead, batch: dict
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The rows' hidden states at their real tokens, and the gradients of a weighted sum of them."""
    policy.zero_grad(set_to_none=True)
    (hidden,) = rows.rows_hidden(policy, [(batch["input_ids"], batch["attention_mask"])])
    real = hidden[batch["attention_mask"].bool()]  # (tokens, H)
    weights = torch.linspace(-1.0, 2.0, real.numel()).view_as(real)
    (real * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return real.detach(), grads


def assert_same(got: tuple, expected: tuple) -> None:
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-5)
    assert got[1].keys() == expected[1].keys() and len(got[1]) > 3
    for name, grad in got[1].items():
        scale = float(expected[1][name].abs().max().clamp(min=1.0))
        torch.testing.assert_close(grad, expected[1][name], rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_packed_rows_give_the_padded_batchs_states_and_gradients_in_one_pack_or_several(
    tiny_policy: PolicyWithValueHead,
    tiny_tokenizer: PreTrainedTokenizerBase,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One- to three-turn episodes, replies of several lengths: rows of five lengths.
    episodes = [
        Episode(
            # Long enough to fill more than one row at the packs' width.
            system_prompt="You play Blackjack. Reply hit or stick. " * 5,
            observations=[f"your sum is {10 + i + t} ." for t in range(n)],
            responses=["hit " * (i % 3 + 1)] * (n - 1) + ["stick"],
            rewards=[0.0] * (n - 1) + [1.0],
            invalid=[False] * n,
            terminated=True,
        )
        for i, n in enumerate([1, 3, 2, 1, 3, 2])
    ]
    buf = build_buffer(tiny_tokenizer, episodes)
    prepare_rollout(tiny_policy, buf, GenerateStyle(), gamma=1.0, gae_lambda=0.95, batch_size=6)
    batch = row_minibatch(buf, list(range(6)))
    policy = tiny_policy.train()
    lengths = batch["attention_mask"].sum(1).tolist()
    with monkeypatch.context() as m:
        m.setattr(rows, "packable", lambda *_: False)
        padded = hidden_and_grads(policy, batch)
    c = rows.common_prefix_length(batch["input_ids"][:, : min(lengths) - 1])
    own = [n - c for n in lengths]  # each row's tokens past the shared prefix
    assert c > 10 and len(set(own)) > 2, "rows of several lengths that share a system prompt"

    # One forward: in packs as wide as all rows together, the prefix fills the free slots ...
    monkeypatch.setattr(packing, "PACK_TOKENS", sum(own) + c)
    with lm_calls(policy) as calls:
        one_pack = hidden_and_grads(policy, batch)
    assert calls == [(1, sum(own) + c)]
    assert_same(one_pack, padded)

    # ... or in packs of at most the longest row's tokens, run side by side as one padded batch:
    # the longer prefix fills a row of its own, then the packs' free slots.
    monkeypatch.setattr(packing, "PACK_TOKENS", max(own))
    packs, width, prefix_rows = packing.layout(sorted(own, reverse=True), c, max(own))
    assert prefix_rows > 0 and len(packs) > 2, "a prefix longer than the packs' free slots"
    with lm_calls(policy) as calls:
        several = hidden_and_grads(policy, batch)
    assert calls == [(prefix_rows + len(packs), width)]
    assert_same(several, padded)


def test_the_layout_takes_the_width_that_pads_least() -> None:
    # By hand: rows of 50, 40 and 30 tokens and a 20-token prefix, 140 tokens, packs of at most
    # 64: 3 rows at least, 47 wide, but a row has 50: first fit 50 | 40 | 30, 150 slots, whose 30
    # free ones take the prefix. 4 or 5 rows: 50 wide again, no fewer slots.
    assert packing.layout([50, 40, 30], 20, 64) == ([[0], [1], [2]], 50, 0)
    # A 101-token prefix, 221 tokens. 4 rows, 56 wide: 50 | 40 | 30, 48 free slots, the prefix's
    # other 53 tokens in a row of their own: 4 rows of 56 (224 slots). 5 rows: 50 wide, 30 free,
    # 2 prefix rows (250). 6 rows: 50 wide again. 224 slots, 3 of them padding.
    assert packing.layout([50, 40, 30], 101, 64) == ([[0], [1], [2]], 56, 1)
    # 96 tokens, at most 32 wide: 3 rows of 32, the prefix in the 16-token row's free slots.
    assert packing.layout([32, 32, 16], 16, 32) == ([[0], [1], [2]], 32, 0)


def test_rows_are_packed_into_as_many_packs_as_first_fit_needs_then_balanced() -> None:
    # By hand, capacity 10: first fit needs 3 packs (8 + 2, 6 + 3, 5); balanced, longest first
    # into the emptiest pack: 8 -> a; 6 -> b; 5 -> c; 3 -> c (8); 2 -> b (8): widths 8, 8, 8.
    assert packing.pack_rows([5, 3, 8, 2, 6], 10) == [[2], [3, 4], [0, 1]]
    assert packing.pack_rows([4, 4, 4], 12) == [[0, 1, 2]]
    assert packing.pack_rows([7], 5) == [[0]]  # a row longer than a pack is a pack of its own


class IgnoresCustomMasks(LlamaForCausalLM):
    """A Llama that drops a 4D attention mask (as a model with its own masking might): packed,
    its tokens would attend to the other rows' tokens."""

    @functools.wraps(LlamaForCausalLM.forward)  # keeps the signature the call names are read from
    def forward(self, *args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = None
        return super().forward(*args, attention_mask=attention_mask, **kwargs)


def test_a_model_that_ignores_the_packing_mask_runs_padded_batches_once_warned(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    policy = PolicyWithValueHead(IgnoresCustomMasks.from_pretrained(tiny_model_dir))
    with caplog.at_level(logging.WARNING, logger="llamagym_pl.packing"):
        batch = scored_batch(policy, tiny_tokenizer)  # its first rows forward: the check
    assert [r.getMessage() for r in caplog.records if "packing rows" in r.getMessage()] != []
    torch.manual_seed(0)
    plain = PolicyWithValueHead(LlamaForCausalLM.from_pretrained(tiny_model_dir))
    b, length = batch["input_ids"].shape
    with lm_calls(policy) as calls:
        got = hidden_and_grads(policy.train(), batch)
    assert len(calls) == 2 and calls[1][0] == b, "padded rows on the prefix, not packed"
    assert_same(got, hidden_and_grads(plain.train(), batch))
