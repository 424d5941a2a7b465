"""Multi-turn conversations through the tokenizer's chat template.

An episode is ``[system?], user(obs_0), assistant(resp_0), user(obs_1), assistant(resp_1), ...``:
here it is built as messages, rendered, tokenized and left padded, a prompt is fitted to a token
budget, and words the tokenizer cannot read are reported. Where a reply's tokens lie in a
rendered chat is :mod:`llamagym_pl.spans`'s job.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from jinja2.exceptions import TemplateError
from torch import Tensor
from transformers import PreTrainedTokenizerBase

Message = dict[str, str]

log = logging.getLogger(__name__)

_SYSTEM_PROBE = "llamagym-pl-system-probe"
# tokenizer -> (chat template it was probed with, supports system role)
_system_role_cache: weakref.WeakKeyDictionary[Any, tuple[Any, bool]] = weakref.WeakKeyDictionary()


def supports_system_role(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the chat template renders a system message.

    False when rendering one raises (Gemma: "System role not supported") or silently drops its
    content. The answer is cached per tokenizer and chat template.
    """
    template = tokenizer.chat_template
    cached = _system_role_cache.get(tokenizer)
    if cached is not None and cached[0] == template:
        return cached[1]
    probe = [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "hi"}]
    try:
        supported = _SYSTEM_PROBE in render(tokenizer, probe, add_generation_prompt=True)
    except TemplateError:
        supported = False
    _system_role_cache[tokenizer] = (template, supported)
    return supported


def build_messages(
    tokenizer: PreTrainedTokenizerBase,
    system_prompt: str | None,
    observations: Sequence[str],
    responses: Sequence[str],
) -> list[Message]:
    """Interleave ``user(obs_i), assistant(resp_i)``, after an optional system message.

    ``responses`` has one entry per observation, or one fewer (the conversation then ends with
    a user message, awaiting a reply). Without a system role in the template, the system prompt
    is folded into the first user message as ``f"{system_prompt}\\n\\n{obs_0}"``. An empty or
    ``None`` system prompt adds nothing.
    """
    if not observations:
        raise ValueError("a conversation needs at least one observation")
    if len(responses) not in (len(observations), len(observations) - 1):
        raise ValueError(
            f"got {len(observations)} observations and {len(responses)} responses; "
            "expected as many responses, or one fewer"
        )
    user_texts = list(observations)
    messages: list[Message] = []
    if system_prompt:
        if supports_system_role(tokenizer):
            messages.append({"role": "system", "content": system_prompt})
        else:
            user_texts[0] = f"{system_prompt}\n\n{user_texts[0]}"
    for i, user_text in enumerate(user_texts):
        messages.append({"role": "user", "content": user_text})
        if i < len(responses):
            messages.append({"role": "assistant", "content": responses[i]})
    return messages


def render(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], add_generation_prompt: bool
) -> str:
    """Render ``messages`` to text with the tokenizer's chat template."""
    return render_batch(tokenizer, [messages], add_generation_prompt)[0]


def render_batch(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[Message]],
    add_generation_prompt: bool,
) -> list[str]:
    """:func:`render` for many conversations in one ``apply_chat_template`` call.

    Same text as rendering one by one; one call saves the per-call setup, which costs more than
    the Jinja rendering itself for the short conversations of a rollout.
    """
    if not tokenizer.chat_template:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template; set `tokenizer.chat_template` "
            "to a Jinja template or pick an instruct/chat model"
        )
    if not conversations:
        return []
    texts = tokenizer.apply_chat_template(
        [list(c) for c in conversations], tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert isinstance(texts, list)  # a batch with tokenize=False renders to a list of strings
    return texts


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of rendered text. Templates already write BOS, so none is added here."""
    return encode_texts(tokenizer, [text])[0]


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """:func:`encode_text` for many texts: one call into the (Rust) tokenizer, same ids.

    Identical texts (the same first hand dealt to two envs, the same turn in two episodes) are
    tokenized once; each gets its own list.
    """
    if not texts:
        return []
    unique = list(dict.fromkeys(texts))
    ids = dict(zip(unique, tokenizer(unique, add_special_tokens=False)["input_ids"], strict=True))
    return [list(ids[text]) for text in texts]


def prompt_token_ids(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Sequence[Message]]
) -> list[list[int]]:
    """The token ids of each conversation's generation prompt (chat template, then tokenizer)."""
    return encode_texts(tokenizer, render_batch(tokenizer, conversations, add_generation_prompt=True))


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Sequence[Message]]
) -> tuple[Tensor, Tensor]:
    """Generation prompts for a batch of conversations, left padded (see :func:`left_pad`)."""
    return left_pad(prompt_token_ids(tokenizer, conversations), tokenizer.pad_token_id)


def left_pad(prompts: Sequence[Sequence[int]], pad: int | None) -> tuple[Tensor, Tensor]:
    """Token id lists as one left-padded batch.

    Left padding puts every prompt's last token in the last column, where generation continues.

    Returns:
        ``(input_ids, attention_mask)``, both ``(B, L)`` long; the mask is 0 on padding.
    """
    if pad is None:
        raise ValueError(
            "the tokenizer has no pad token; set `tokenizer.pad_token` (e.g. to its eos token) before "
            "batching prompts"
        )
    length = max(len(p) for p in prompts)
    # Padded as Python lists, then one tensor each: no per-row tensor and slice assignment.
    input_ids = torch.tensor([[pad] * (length - len(p)) + p for p in prompts], dtype=torch.long)  # (B, L)
    mask = [[0] * (length - len(p)) + [1] * len(p) for p in prompts]
    return input_ids, torch.tensor(mask, dtype=torch.long)  # (B, L), (B, L)


class PromptBudgetError(ValueError):
    """The system prompt and the current observation alone exceed the prompt budget."""

    def __init__(self, system_tokens: int, needed: int, budget: int) -> None:
        super().__init__(
            f"the system prompt ({system_tokens} tokens) and the current observation render to {needed} "
            f"tokens, more than max_prompt_tokens={budget}: raise the budget or shorten the prompt"
        )
        self.system_tokens, self.needed, self.budget = system_tokens, needed, budget


def fit_to_budget(
    tokenizer: PreTrainedTokenizerBase,
    system_prompt: str | None,
    observations: Sequence[str],
    responses: Sequence[str],
    max_tokens: int,
) -> tuple[list[str], list[str]]:
    """Drop the oldest (observation, response) pairs until the rendered prompt fits ``max_tokens``.

    The system prompt and the current observation (the last one; with as many responses as
    observations, the last pair) are always kept. The length counted is that of the rendered
    conversation, with the generation prompt when it ends on an observation: what the policy
    is fed. Returns the kept ``(observations, responses)``.

    Raises:
        PromptBudgetError: (a ValueError) if the system prompt and the current observation alone
            exceed the budget.
    """
    drop = prompt_start(tokenizer, system_prompt, observations, responses, max_tokens)
    return list(observations[drop:]), list(responses[drop:])


def prompt_start(
    tokenizer: PreTrainedTokenizerBase,
    system_prompt: str | None,
    observations: Sequence[str],
    responses: Sequence[str],
    max_tokens: int,
    min_start: int = 0,
) -> int:
    """How many of the oldest (observation, response) pairs :func:`fit_to_budget` drops.

    ``min_start`` skips drop counts known not to fit: with a prefix-stable template, the
    previous turn's count (this turn's prompt extends that one by a reply and an observation,
    so it cannot fit with less dropped). The rollout passes it, so a long episode renders
    about one or two candidate prompts per turn rather than one per turn of history.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    if not observations or len(responses) not in (len(observations), len(observations) - 1):
        raise ValueError(f"got {len(observations)} observations and {len(responses)} responses")
    if not 0 <= min_start < len(observations):
        raise ValueError(f"min_start={min_start} must keep the current observation")
    prompt = len(observations) > len(responses)

    def length(drop: int) -> int:
        messages = build_messages(tokenizer, system_prompt, observations[drop:], responses[drop:])
        return len(encode_text(tokenizer, render(tokenizer, messages, add_generation_prompt=prompt)))

    # Linear from the oldest turn: the first drop count that fits keeps the most history.
    for drop in range(min_start, len(observations)):
        n = length(drop)
        if n <= max_tokens:
            return drop
    system = len(encode_text(tokenizer, system_prompt)) if system_prompt else 0
    raise PromptBudgetError(system, n, max_tokens)


class UnknownWords:
    """Warns once per word that a tokenizer can only read as its unknown token.

    A word-level vocabulary (the offline tiny model's) maps every word it lacks to ``<unk>``: a
    prompt saying "guess my number" would lose both words, and two observations could become the
    same tokens. The policy cannot learn what it cannot read, so the first prompt or candidate
    holding such a word logs one line naming the words and the fix.
    """

    def __init__(self) -> None:
        self.warned: set[str] = set()

    def check(
        self, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], ids: Sequence[Sequence[int]]
    ) -> None:
        """Warn about the words of ``texts`` that the tokenizer cannot read. ``ids`` are those texts'
        tokens in any grouping (prompts, candidates): the words are looked up only if they hold the
        unknown token."""
        unk = tokenizer.unk_token_id
        if unk is None or not any(unk in row for row in ids):
            return
        lost = [w for w in unknown_words(tokenizer, texts) if w not in self.warned]
        if lost:
            self.warned.update(lost)
            log.warning(
                "the tokenizer of %r reads %d word(s) of the prompts or actions only as %r, so the policy "
                "cannot tell them apart: %s. For the offline tiny model, build one with them: `python -m "
                "llamagym_pl.tiny_model --out models/my-tiny --extra-words %s` and set model.name_or_path: "
                "models/my-tiny (or reword the agent's texts)",
                tokenizer.name_or_path,
                len(lost),
                tokenizer.unk_token,
                ", ".join(lost),
                " ".join(lost),
            )


def unknown_words(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[str]:
    """The words of ``texts`` (runs of letters, digits or ``_``) that tokenize to the unknown token,
    in order of first appearance, lowercased when the tokenizer lowercases."""
    unk = tokenizer.unk_token_id
    words = list(dict.fromkeys(w for text in texts for w in re.findall(r"\w+", text)))
    if unk is None or not words:
        return []
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
    lost = [w for w, row in zip(words, ids, strict=True) if unk in row]
    return list(dict.fromkeys(normalizer.normalize_str(w) if normalizer is not None else w for w in lost))
