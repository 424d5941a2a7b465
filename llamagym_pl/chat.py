"""Multi-turn conversations through the tokenizer's chat template.

An episode is ``[system?], user(obs_0), assistant(resp_0), user(obs_1), assistant(resp_1), ...``.
PPO needs to know which tokens the policy produced (to score their log-probs) and where to read
the value of each state. Both are found by rendering *prefixes* of the conversation with the chat
template and tokenizing them: the tokens of assistant turn ``t`` are those that the conversation
up to and including ``assistant_t`` has beyond the generation prompt after ``user_t``. Nothing is
found by splitting on a template marker like ``[/INST]``, so any prefix-stable template works,
and a template that is not prefix-stable is refused loudly rather than mis-masked.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jinja2.exceptions import TemplateError
from torch import Tensor
from transformers import PreTrainedTokenizerBase

Message = dict[str, str]

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
    if not tokenizer.chat_template:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template; set `tokenizer.chat_template` "
            "to a Jinja template or pick an instruct/chat model"
        )
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert isinstance(text, str)  # tokenize=False returns the rendered string
    return text


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of rendered text. Templates already write BOS, so none is added here."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Sequence[Message]]
) -> tuple[Tensor, Tensor]:
    """Generation prompts for a batch of conversations, left padded.

    Left padding puts every prompt's last token in the last column, where generation continues.

    Returns:
        ``(input_ids, attention_mask)``, both ``(B, L)`` long; the mask is 0 on padding.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no pad token; set `tokenizer.pad_token` "
            "(e.g. to its eos token) before batching prompts"
        )
    prompts = [
        encode_text(tokenizer, render(tokenizer, c, add_generation_prompt=True)) for c in conversations
    ]
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), tokenizer.pad_token_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)  # (B, L)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, length - len(prompt) :] = 1
    return input_ids, attention_mask


@dataclass
class EncodedEpisode:
    """One tokenized episode with the positions PPO needs.

    Attributes:
        input_ids: the whole rendered conversation.
        action_mask: True on the tokens the policy produced: each response and the template's
            end-of-turn token(s), but not whitespace the template writes after them when that
            tokenizes separately.
        turn_index: per token, the assistant turn it belongs to, -1 elsewhere.
        value_positions: per assistant turn ``t``, the index of the last token before the turn's
            first action token (the end of its generation prompt): the value of turn ``t``'s
            state is read there.
        bootstrap_position: with a trailing observation, the index of the last token of the
            final generation prompt (the state after the last turn); otherwise None.
    """

    input_ids: list[int]
    action_mask: list[bool]
    turn_index: list[int]
    value_positions: list[int]
    bootstrap_position: int | None


def encode_episode(
    tokenizer: PreTrainedTokenizerBase,
    system_prompt: str | None,
    observations: Sequence[str],
    responses: Sequence[str],
) -> EncodedEpisode:
    """Tokenize an episode and locate each assistant turn from chat-template prefixes.

    ``observations`` has one entry per response, plus optionally one more: the state after the
    last turn, rendered as a final user message with a generation prompt (for bootstrapping).

    Raises:
        ValueError: if a rendered prefix does not tokenize to a prefix of the whole episode
            (the template is not prefix-stable, e.g. it rewrites earlier turns).
    """
    bootstrap = len(observations) == len(responses) + 1
    messages = build_messages(tokenizer, system_prompt, observations, responses)
    input_ids = encode_text(tokenizer, render(tokenizer, messages, add_generation_prompt=bootstrap))
    action_mask = [False] * len(input_ids)
    turn_index = [-1] * len(input_ids)
    value_positions: list[int] = []
    user_positions = [i for i, m in enumerate(messages) if m["role"] == "user"]
    previous_end = 0
    for turn in range(len(responses)):
        user_end = user_positions[turn] + 1  # messages[:user_end] ends with user message `turn`
        prompt = render(tokenizer, messages[:user_end], add_generation_prompt=True)
        start = _prefix_length(tokenizer, input_ids, [prompt], turn, "generation prompt")
        done = render(tokenizer, messages[: user_end + 1], add_generation_prompt=False)
        # Prefer the turn without trailing whitespace (the "\n" after "<|im_end|>"): the policy
        # did not generate it. Fall back when stripping changes how the text tokenizes.
        end = _prefix_length(tokenizer, input_ids, [done.rstrip(), done], turn, "assistant turn")
        if not previous_end <= start < end:
            raise ValueError(
                f"assistant turn {turn} spans tokens [{start}, {end}) after the previous turn ended "
                f"at {previous_end}: the chat template of {tokenizer.name_or_path!r} does not render "
                "the reply as a non-empty span after its generation prompt"
            )
        for i in range(start, end):
            action_mask[i] = True
            turn_index[i] = turn
        value_positions.append(start - 1)
        previous_end = end
    return EncodedEpisode(
        input_ids=input_ids,
        action_mask=action_mask,
        turn_index=turn_index,
        value_positions=value_positions,
        bootstrap_position=len(input_ids) - 1 if bootstrap else None,
    )


def _prefix_length(
    tokenizer: PreTrainedTokenizerBase, full_ids: list[int], candidates: list[str], turn: int, what: str
) -> int:
    """Token count of the first candidate text whose tokens are a prefix of ``full_ids``."""
    for text in candidates:
        ids = encode_text(tokenizer, text)
        if full_ids[: len(ids)] == ids:
            return len(ids)
    raise ValueError(
        f"the chat template of {tokenizer.name_or_path!r} is not prefix-stable: the {what} of turn "
        f"{turn} does not tokenize to a prefix of the whole episode, so the response tokens cannot "
        "be located (does the template rewrite earlier turns, or move the system prompt?)"
    )
