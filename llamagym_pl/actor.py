"""One turn, as the rollout and the imperative loop both play it.

Each episode's latest observation becomes a prompt (under the budget), the action style replies
to the whole batch, and each reply becomes a valid env action (the invalid-action policy), all
recorded in the episodes, token in, token out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from llamagym_pl.actions import ActionStyle
from llamagym_pl.actions.base import State
from llamagym_pl.episode import Episode, InvalidActions, PromptBudget


class Actor:
    """One turn of a batch of episodes: each latest observation's prompt (under the budget), the
    style's replies, and each reply parsed into an env action (invalid ones counted, with their
    fallback). Keeps the token counts and time spent replying, for the rollout statistics."""

    def __init__(self, style: ActionStyle, invalid: InvalidActions, budget: PromptBudget) -> None:
        self.style = style
        self.invalid = invalid
        self.budget = budget
        self.prompt_tokens = self.reply_tokens = 0
        self.seconds = 0.0

    def act(
        self,
        policy: Any,
        tokenizer: Any,
        episodes: Sequence[Episode],
        states: Sequence[State],
        rngs: Sequence[np.random.Generator],
        greedy: bool,
        count: bool = True,
    ) -> list[Any]:
        """Reply in each episode's latest state (``rngs[k]`` draws ``episodes[k]``'s fallback
        action); record the turns; return the actions to play. ``count``: add to the counts."""
        prompts = [self.budget.messages(tokenizer, ep) for ep in episodes]
        start = time.perf_counter()
        replies = self.style.reply(policy, tokenizer, prompts, states, greedy)
        seconds = time.perf_counter() - start
        actions = []
        for ep, reply, rng in zip(episodes, replies, rngs, strict=True):
            action, invalid = self.invalid.parse(reply, rng)
            ep.add_turn(reply, action, invalid, self.invalid.penalty)
            actions.append(action)
        if count:
            self.seconds += seconds
            self.prompt_tokens += sum(len(reply.prompt_ids) for reply in replies)
            self.reply_tokens += sum(len(reply.reply_ids) for reply in replies)
        return actions

    def reset_counts(self) -> None:
        self.prompt_tokens = self.reply_tokens = 0
        self.seconds = 0.0
