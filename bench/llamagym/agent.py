"""LlamaGym's example Blackjack agent on llamagym_pl's :class:`~llamagym_pl.Agent`: the same
prompts and parsing (an unparsable reply hits), for our imperative loop and the fit path."""

from __future__ import annotations

from typing import Any

from bench.llamagym.common import SYSTEM_PROMPT, format_observation, parse_action
from llamagym_pl import Agent


class LlamaGymBlackjackAgent(Agent):
    def get_system_prompt(self) -> str:
        return SYSTEM_PROMPT

    def format_observation(self, observation: Any) -> str:
        return format_observation(observation)

    def extract_action(self, response: str) -> int:
        return parse_action(response)[0]
