"""Where the policy's tokens are in a rendered chat: each reply's span, found from chat-template prefixes.

PPO needs to know which tokens the policy produced (to score their log-probs) and where to read
the value of each state. Both are found by rendering *prefixes* of the conversation with the chat
template and tokenizing them: the tokens of assistant turn ``t`` are those that the conversation
up to and including ``assistant_t`` has beyond the generation prompt after ``user_t``. Nothing is
found by splitting on a template marker like ``[/INST]``, so any prefix-stable template works,
and a template that is not prefix-stable is refused loudly rather than mis-masked.

Rollouts record the token ids they sample (token in, token out); these encodings serve episodes
written as text (:func:`llamagym_pl.buffer.add_token_ids`) and the candidate actions of score mode
(:func:`encode_candidates`, a candidate located as a reply is).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from llamagym_pl.chat import Message, build_messages, encode_texts, render_batch


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
    return encode_episodes(tokenizer, [(system_prompt, observations, responses)])[0]


EpisodeText = tuple[str | None, Sequence[str], Sequence[str]]
"""``(system_prompt, observations, responses)`` of one episode, as :func:`encode_episode` takes."""


def encode_episodes(
    tokenizer: PreTrainedTokenizerBase, episodes: Sequence[EpisodeText]
) -> list[EncodedEpisode]:
    """:func:`encode_episode` for many episodes, with the same result for each.

    An episode of T turns needs 2T+1 rendered prefixes and as many tokenizations; here they are
    rendered in two ``apply_chat_template`` calls and tokenized in one tokenizer call for all
    episodes together (a Blackjack rollout's buffer builds 1.4x faster than one call per text).
    """
    messages = [build_messages(tokenizer, *episode) for episode in episodes]
    bootstrap = [len(obs) == len(resp) + 1 for _, obs, resp in episodes]
    turns: list[tuple[int, int]] = []  # (e, end): messages[e][:end] ends with the turn's user message
    for e, (msgs, (_, _, responses)) in enumerate(zip(messages, episodes, strict=True)):
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        turns += [(e, users[t] + 1) for t in range(len(responses))]
    with_prompt = [msgs for msgs, b in zip(messages, bootstrap, strict=True) if b]
    with_prompt += [messages[e][:end] for e, end in turns]  # each turn's generation prompt
    without = [msgs for msgs, b in zip(messages, bootstrap, strict=True) if not b]
    without += [messages[e][: end + 1] for e, end in turns]  # ... and the turn with its reply
    rendered_with = iter(render_batch(tokenizer, with_prompt, add_generation_prompt=True))
    rendered_without = iter(render_batch(tokenizer, without, add_generation_prompt=False))
    full_texts = [next(rendered_with) if b else next(rendered_without) for b in bootstrap]
    prompt_texts, done_texts = list(rendered_with), list(rendered_without)
    # Prefer each turn without trailing whitespace (the "\n" after "<|im_end|>"): the policy did
    # not generate it. Fall back to the whole text where stripping changes how it tokenizes.
    ids = encode_texts(tokenizer, full_texts + prompt_texts + [d.rstrip() for d in done_texts])
    num_episodes, num_turns = len(episodes), len(turns)
    full_ids = ids[:num_episodes]
    prompt_ids = ids[num_episodes : num_episodes + num_turns]
    done_ids = ids[num_episodes + num_turns :]
    retry = [k for k, (e, _) in enumerate(turns) if not _is_prefix(done_ids[k], full_ids[e])]
    for k, retried in zip(retry, encode_texts(tokenizer, [done_texts[k] for k in retry]), strict=True):
        done_ids[k] = retried
    by_episode: list[list[tuple[list[int], list[int]]]] = [[] for _ in episodes]
    for k, (e, _) in enumerate(turns):
        by_episode[e].append((prompt_ids[k], done_ids[k]))
    return [
        _locate_turns(tokenizer, input_ids, spans, b)
        for input_ids, spans, b in zip(full_ids, by_episode, bootstrap, strict=True)
    ]


def _locate_turns(
    tokenizer: PreTrainedTokenizerBase,
    input_ids: list[int],
    turns: list[tuple[list[int], list[int]]],
    bootstrap: bool,
) -> EncodedEpisode:
    """Masks and positions from each turn's (generation prompt ids, prompt + reply ids)."""
    action_mask = [False] * len(input_ids)
    turn_index = [-1] * len(input_ids)
    value_positions: list[int] = []
    previous_end = 0
    for turn, (prompt, done) in enumerate(turns):
        start = _prefix_length(tokenizer, input_ids, prompt, turn, "generation prompt")
        end = _prefix_length(tokenizer, input_ids, done, turn, "assistant turn")
        if not previous_end <= start < end:
            raise ValueError(
                f"assistant turn {turn} spans tokens [{start}, {end}) after the previous turn ended "
                f"at {previous_end}: the chat template of {tokenizer.name_or_path!r} does not render "
                "the reply as a non-empty span after its generation prompt"
            )
        action_mask[start:end] = [True] * (end - start)
        turn_index[start:end] = [turn] * (end - start)
        value_positions.append(start - 1)
        previous_end = end
    return EncodedEpisode(
        input_ids=input_ids,
        action_mask=action_mask,
        turn_index=turn_index,
        value_positions=value_positions,
        bootstrap_position=len(input_ids) - 1 if bootstrap else None,
    )


def _is_prefix(ids: list[int], full_ids: list[int]) -> bool:
    return full_ids[: len(ids)] == ids


def _prefix_length(
    tokenizer: PreTrainedTokenizerBase, full_ids: list[int], ids: list[int], turn: int, what: str
) -> int:
    """``len(ids)``, after checking that ``ids`` (a rendered prefix) start ``full_ids``."""
    if _is_prefix(ids, full_ids):
        return len(ids)
    raise ValueError(
        f"the chat template of {tokenizer.name_or_path!r} is not prefix-stable: the {what} of turn "
        f"{turn} does not tokenize to a prefix of the whole episode, so the response tokens cannot "
        "be located (does the template rewrite earlier turns, or move the system prompt?)"
    )


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
