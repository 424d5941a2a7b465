"""Action scoring: the policy is a softmax over candidate actions' log-likelihoods (GLAM / TWOSOME).

Instead of generating a reply, the LM scores every candidate action text ``c_k`` as the
assistant's reply to the prompt (Carta et al. 2023, GLAM; Tan et al. 2024, TWOSOME):

    log p(c_k | prompt) = sum over c_k's tokens of log-softmax(logits)[token]
    score_k = log p(c_k | prompt) / n          n: 1 (sum), c_k's tokens (token), c_k's words (word)
    pi(k | prompt) = softmax_k(score_k)

TWOSOME normalizes by length so that long commands are not penalized for their length alone.
Log-probs come from the log-softmax (:func:`llamagym_pl.ppo.token_logprobs`): lamorel summed raw
logits, which are no log-likelihood (a constant shift per position changes them, not p).

A candidate's tokens are located as a reply is (:func:`llamagym_pl.spans.encode_candidates`): the
conversation rendered with the candidate as the assistant's reply, minus the generation prompt,
end-of-turn token included. The chosen candidate is the turn's reply, so episodes, values and GAE
are exactly those of generated replies; only the action probability differs (one per turn).

This module is the forward pass that scores candidates (each prompt encoded once, its candidates
on its KV cache); the distributions and the layout are in :mod:`llamagym_pl.actions.candidates`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from llamagym_pl import ppo
from llamagym_pl.actions.candidates import candidate_batch
from llamagym_pl.lm_calls import lm_call_names
from llamagym_pl.prefix_cache import new_cache, reuses_prefix, run_prefix, shared_prefix_length, windows_cover
from llamagym_pl.spans import EncodedCandidates


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
    share (e.g. the system prompt, :mod:`llamagym_pl.prefix_cache`) is encoded once per batch and
    its cache repeated for every prompt. The value of a turn is read at
    its prompt's last token (it depends on the prompt only). Positions count real tokens only,
    as in the right-padded episode sequences.

    Gradient checkpointing drops the KV cache in training (transformers re-runs each layer in
    backward), so there the rows are encoded whole, prompt + candidate, with the same result.
    Returns (R,) log-prob sums and (N,) values, with grad when grad is enabled.
    """
    if reuses_prefix(policy):
        return _cached_forward(policy, batch)
    return _row_forward(policy, batch)


def _cached_forward(policy, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    ids, mask, row_turn = batch["prompt_ids"], batch["prompt_mask"], batch["row_turn"]  # (N, P), (R,)
    cands, cand_mask = batch["candidate_ids"], batch["candidate_mask"]  # (R, K)
    cache_kw, keep_kw = lm_call_names(policy.lm)
    last_only = {keep_kw: 1} if keep_kw else {}
    cache = new_cache(policy.lm)
    n, p = ids.shape
    # [prefix | padding | rest] moves padding into a sliding window's columns: whole prompts there.
    shared = shared_prefix_length(ids, mask) if windows_cover(policy.lm, p + cands.shape[1]) else 0
    if shared:
        # The prefix every prompt starts with runs once, (1, c), its cache repeated for the N prompts.
        first = p - int(mask[0].sum())
        cache, _ = run_prefix(policy.lm, ids[:1, first : first + shared], n)
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
    _, keep_kw = lm_call_names(policy.lm)
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
