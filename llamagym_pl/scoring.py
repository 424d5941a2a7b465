"""Action scoring: the policy is a softmax over candidate actions' log-likelihoods (GLAM / TWOSOME).

Instead of generating a reply, the LM scores every candidate action text ``c_k`` as the
assistant's reply to the prompt (Carta et al. 2023, GLAM; Tan et al. 2024, TWOSOME):

    log p(c_k | prompt) = sum over c_k's tokens of log-softmax(logits)[token]
    score_k = log p(c_k | prompt) / n          n: 1 (sum), c_k's tokens (token), c_k's words (word)
    pi(k | prompt) = softmax_k(score_k)

TWOSOME normalizes by length so that long commands are not penalized for their length alone.
Log-probs come from the log-softmax (:func:`llamagym_pl.ppo.token_logprobs`): lamorel summed raw
logits, which are no log-likelihood (a constant shift per position changes them, not p).

A candidate's tokens are located as :func:`llamagym_pl.chat.encode_episodes` locates a reply: the
conversation rendered with the candidate as the assistant's reply, minus the generation prompt,
end-of-turn token included. The chosen candidate is the turn's reply, so episodes, values and GAE
are exactly those of generated replies; only the action probability differs (one per turn).

Layout of N turns and their R candidate rows (row ``r`` is candidate ``row_slot[r]`` of turn
``row_turn[r]``): scores are (R,), candidate distributions (N, C) with ``-inf`` past a turn's
candidates, C the most candidates of any turn.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedTokenizerBase

from llamagym_pl import ppo
from llamagym_pl.chat import Message, encode_texts, render_batch

ScoreNormalization = Literal["token", "word", "sum"]


@dataclass
class EncodedCandidates:
    """A generation prompt's token ids and, per candidate, its reply tokens (end of turn included)."""

    prompt_ids: list[int]
    candidate_ids: list[list[int]]


def encode_candidates(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[Message]],
    candidates: Sequence[Sequence[str]],
) -> list[EncodedCandidates]:
    """Tokenize each conversation's generation prompt and locate each candidate reply after it.

    ``conversations[b]`` ends with a user message; ``candidates[b]`` are its candidate replies.

    Raises:
        ValueError: if a candidate's rendering does not extend its prompt's tokens by a non-empty
            span (the chat template is not prefix-stable).
    """
    if len(conversations) != len(candidates):
        raise ValueError(f"{len(conversations)} conversations but {len(candidates)} candidate lists")
    replies = [
        [*conv, {"role": "assistant", "content": c}]
        for conv, cs in zip(conversations, candidates, strict=True)
        for c in cs
    ]
    prompts = render_batch(tokenizer, conversations, add_generation_prompt=True)
    done = render_batch(tokenizer, replies, add_generation_prompt=False)
    # As in encode_episodes: the reply without the whitespace the template writes after its
    # end-of-turn token, unless stripping it changes how the reply itself tokenizes.
    ids = encode_texts(tokenizer, prompts + [d.rstrip() for d in done] + done)
    n, r = len(prompts), len(done)
    prompt_ids, stripped, whole = ids[:n], ids[n : n + r], ids[n + r :]
    out, row = [], 0
    for b, cands in enumerate(candidates):
        prompt, spans = prompt_ids[b], []
        for c in cands:
            reply = stripped[row] if whole[row][: len(stripped[row])] == stripped[row] else whole[row]
            row += 1
            if reply[: len(prompt)] != prompt or len(reply) <= len(prompt):
                raise ValueError(
                    f"the chat template of {tokenizer.name_or_path!r} is not prefix-stable: the candidate "
                    f"{c!r} does not render as a non-empty reply after its generation prompt"
                )
            spans.append(reply[len(prompt) :])
        out.append(EncodedCandidates(prompt, spans))
    return out


def word_count(text: str) -> int:
    """Words of a candidate (whitespace separated, at least 1): TWOSOME's word normalization."""
    return max(len(text.split()), 1)


def normalize_scores(
    logprob_sums: Tensor, num_tokens: Tensor, num_words: Tensor, normalization: ScoreNormalization
) -> Tensor:
    """A candidate's score from its summed token log-probs. All (R,) -> (R,) float32."""
    sums = logprob_sums.float()
    if normalization == "sum":
        return sums
    if normalization == "token":
        return sums / num_tokens.to(sums)
    if normalization == "word":
        return sums / num_words.to(sums)
    raise ValueError(f"score_normalization={normalization!r} is not one of token, word, sum")


def candidate_logits(scores: Tensor, row_turn: Tensor, row_slot: Tensor, num_turns: int) -> Tensor:
    """Scatter (R,) candidate scores into (N, C) logits, ``-inf`` where a turn has no candidate.

    ``log_softmax(., -1)`` of the result is each turn's candidate distribution, and
    :func:`llamagym_pl.ppo.entropy_from_logits` its entropy.
    """
    num_slots = int(row_slot.max()) + 1 if row_slot.numel() else 1
    logits = scores.new_full((num_turns, num_slots), float("-inf"))  # (N, C)
    return logits.index_put((row_turn, row_slot), scores)  # out of place: keeps the graph


def prompt_logits(
    sums: Tensor,
    encoded: Sequence[EncodedCandidates],
    candidates: Sequence[Sequence[str]],
    normalization: ScoreNormalization,
) -> Tensor:
    """(B, C) candidate logits of B prompts from their candidates' (R,) log-prob sums."""
    num_tokens = torch.tensor([len(c) for e in encoded for c in e.candidate_ids])
    num_words = torch.tensor([word_count(c) for cands in candidates for c in cands])
    scores = normalize_scores(sums, num_tokens, num_words, normalization)
    return candidate_logits(scores, *row_layout([len(c) for c in candidates]), len(candidates))


def row_layout(num_candidates: Sequence[int]) -> tuple[Tensor, Tensor]:
    """``(row_turn, row_slot)`` (R,) for turns with ``num_candidates`` candidates each."""
    counts = torch.as_tensor(list(num_candidates), dtype=torch.long)
    row_turn = torch.repeat_interleave(torch.arange(len(counts)), counts)  # (R,)
    first = torch.cumsum(counts, 0) - counts  # (N,) first row of each turn
    return row_turn, torch.arange(len(row_turn)) - first[row_turn]


def candidate_batch(encoded: Sequence[EncodedCandidates], pad_token_id: int) -> dict[str, Tensor]:
    """The shared-prompt layout of B prompts and their R candidates (see :func:`candidate_forward`).

    ``prompt_ids``/``prompt_mask`` (B, P) left padded; ``candidate_ids``/``candidate_mask``
    (R, K) right padded; ``row_turn`` (R,) the prompt of each candidate row.
    """
    prompts = [e.prompt_ids for e in encoded]
    cands = [c for e in encoded for c in e.candidate_ids]
    p, k = max(len(x) for x in prompts), max(len(c) for c in cands)
    return {
        "prompt_ids": torch.tensor([[pad_token_id] * (p - len(x)) + x for x in prompts]),
        "prompt_mask": torch.tensor([[0] * (p - len(x)) + [1] * len(x) for x in prompts]),
        "candidate_ids": torch.tensor([c + [pad_token_id] * (k - len(c)) for c in cands]),
        "candidate_mask": torch.tensor([[True] * len(c) + [False] * (k - len(c)) for c in cands]),
        "row_turn": row_layout([len(e.candidate_ids) for e in encoded])[0],
    }


@torch.no_grad()
def candidate_logprob_sums(policy, encoded: Sequence[EncodedCandidates], pad_token_id: int) -> Tensor:
    """log p(candidate | prompt) of every candidate, each prompt encoded once (KV cache reused).

    Returns (R,) float32 on the CPU, rows in the order of ``encoded`` and its candidates.
    """
    device = next(policy.parameters()).device
    batch = {k: v.to(device) for k, v in candidate_batch(encoded, pad_token_id).items()}
    return candidate_forward(policy, batch)[0].float().cpu()


def candidate_forward(policy, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """log p(candidate | prompt) of R candidate rows and the value of their N prompts.

    ``batch`` holds the shared-prompt layout of :func:`candidate_batch`. Each prompt is encoded
    once: its last logits score every candidate's first token, and the candidates' remaining
    tokens run as (R, K - 1) on the prompt's KV cache (its rows repeated per candidate): with C
    candidates per turn this costs about one prompt instead of C. The prefix that all prompts
    share (e.g. the system prompt, :func:`shared_prefix_length`) is encoded once per batch and
    its cache repeated for every prompt. The value of a turn is read at
    its prompt's last token (it depends on the prompt only). Positions count real tokens only,
    as in the right-padded episode sequences.

    Gradient checkpointing drops the KV cache in training (transformers re-runs each layer in
    backward), so there the rows are encoded whole, prompt + candidate, with the same result.
    Returns (R,) log-prob sums and (N,) values, with grad when grad is enabled.
    """
    if _checkpointing(policy.lm) and policy.training and torch.is_grad_enabled():
        return _row_forward(policy, batch)
    return _cached_forward(policy, batch)


def shared_prefix_length(ids: Tensor, mask: Tensor) -> int:
    """How many first tokens all N >= 2 left-padded prompts share (typically the system prompt),
    at most the shortest prompt's length minus one: every prompt keeps a token of its own, where
    its last logits and value are read. 0 for a single prompt."""
    lengths = mask.sum(1)  # (N,)
    k = int(lengths.min()) - 1
    if ids.shape[0] < 2 or k < 1:
        return 0
    cols = (ids.shape[1] - lengths)[:, None] + torch.arange(k, device=ids.device)  # (N, k)
    heads = ids.gather(1, cols)  # the first k real tokens of each prompt
    return int((heads == heads[:1]).all(0).long().cumprod(0).sum())


def _cached_forward(policy, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    ids, mask, row_turn = batch["prompt_ids"], batch["prompt_mask"], batch["row_turn"]  # (N, P), (R,)
    cands, cand_mask = batch["candidate_ids"], batch["candidate_mask"]  # (R, K)
    cache_kw, keep_kw = _lm_kwargs(policy.lm)
    last_only = {keep_kw: 1} if keep_kw else {}
    cache = DynamicCache()
    n, p = ids.shape
    shared = shared_prefix_length(ids, mask)
    if shared:
        # The prefix every prompt starts with runs once, (1, c); its cache rows are then repeated
        # for the N prompts (index_select: in training its gradient sums over them).
        first = p - int(mask[0].sum())
        policy.lm(
            input_ids=ids[:1, first : first + shared],
            attention_mask=mask.new_ones(1, shared),
            position_ids=torch.arange(shared, device=ids.device)[None],
            use_cache=True,
            **{cache_kw: cache, **last_only},
        )
        cache.reorder_cache(torch.zeros(n, dtype=torch.long, device=ids.device))  # (1, ...) -> (N, ...)
        # Left padded, each prompt's rest is its last (length - c) columns: drop c columns at the
        # left and the mask is the old mask's first P - c columns.
        ids, mask = ids[:, shared:], mask[:, : p - shared]
    past = mask.new_ones(n, shared)  # (N, c) the shared prefix, in the cache
    out = policy.lm(
        input_ids=ids,
        attention_mask=torch.cat([past, mask], 1),
        position_ids=shared + (mask.cumsum(1) - 1).clamp(min=0),
        use_cache=True,
        output_hidden_states=True,
        **{cache_kw: cache, **last_only},
    )
    values = policy.value_head(out.hidden_states[-1][:, -1])  # (N,)
    sums = ppo.token_logprobs(out.logits[:, -1][row_turn], cands[:, 0])  # (R,)
    rest = cands.shape[1] - 1
    if rest > 0:
        cache.reorder_cache(row_turn)  # (N, ...) -> (R, ...): each candidate gets its prompt's rows
        positions = shared + mask.sum(1)[row_turn, None] + torch.arange(rest, device=ids.device)  # (R, K - 1)
        logits = policy.lm(
            input_ids=cands[:, :-1],
            attention_mask=torch.cat([past[row_turn], mask[row_turn], cand_mask[:, :-1].long()], 1),
            position_ids=positions,
            use_cache=True,
            **{cache_kw: cache},
        ).logits  # (R, K - 1, V)
        token_lp = ppo.token_logprobs(logits, cands[:, 1:])  # (R, K - 1)
        sums = sums + torch.where(cand_mask[:, 1:], token_lp, 0.0).sum(1)
    return sums, values


def _row_forward(policy, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    prompts, row_turn = batch["prompt_ids"], batch["row_turn"]  # (N, P), (R,)
    cands, cand_mask = batch["candidate_ids"], batch["candidate_mask"]  # (R, K)
    length, k = prompts.shape[1], cands.shape[1]
    ids = torch.cat([prompts[row_turn], cands], 1)  # (R, P + K): [pad.. prompt, candidate, ..pad]
    mask = torch.cat([batch["prompt_mask"][row_turn], cand_mask.long()], 1)
    _, keep_kw = _lm_kwargs(policy.lm)
    out = policy.lm(
        input_ids=ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(1) - 1).clamp(min=0),
        use_cache=False,
        output_hidden_states=True,
        **({keep_kw: k + 1} if keep_kw else {}),
    )
    logits = out.logits[:, -(k + 1) : -1]  # (R, K, V): positions P - 1 .. P + K - 2
    sums = torch.where(cand_mask, ppo.token_logprobs(logits, cands), 0.0).sum(1)  # (R,)
    first = torch.ones_like(row_turn, dtype=torch.bool)
    first[1:] = row_turn[1:] != row_turn[:-1]  # the first row of each turn
    values = policy.value_head(out.hidden_states[-1][first, length - 1])  # (N,)
    return sums, values


def _checkpointing(lm) -> bool:
    """Whether ``lm`` recomputes activations in backward (the flag was renamed in transformers 5)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(lm), name) or hasattr(lm, name):
            return bool(getattr(lm, name))
    return False


@functools.cache
def _forward_parameters(lm_type: type) -> frozenset[str]:
    return frozenset(inspect.signature(lm_type.forward).parameters)


def _lm_kwargs(lm) -> tuple[str, str | None]:
    """The names of the KV-cache and keep-last-logits arguments of this transformers version:
    ``cache`` and ``logits_to_keep`` now; ``past_key_values`` and ``num_logits_to_keep`` before."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # through a peft wrapper
    params = _forward_parameters(type(base))
    keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    return ("cache" if "cache" in params else "past_key_values"), keep


def turn_distribution(batch: dict[str, Tensor], sums: Tensor, normalization: ScoreNormalization) -> Tensor:
    """(N, C) candidate logits of the batch's turns from their rows' log-prob sums (R,)."""
    scores = normalize_scores(sums, batch["num_tokens"], batch["num_words"], normalization)
    return candidate_logits(scores, batch["row_turn"], batch["row_slot"], batch["chosen"].shape[0])
