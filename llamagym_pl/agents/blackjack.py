"""An agent for Gymnasium's ``Blackjack-v1``."""

from __future__ import annotations

from typing import Any

from llamagym_pl.agent import Agent

STICK, HIT = 0, 1


class BlackjackAgent(Agent):
    """Plays Blackjack by answering ``hit`` or ``stick``.

    Observations are ``(player_sum, dealer_card, usable_ace)``. The text is kept short and
    regular so that the tiny offline model, trained from scratch, can learn it quickly; a
    pretrained chat model reads it just as well.
    """

    action_names = ["stick", "hit"]  # STICK, HIT: the candidates of data.policy: score

    def get_system_prompt(self) -> str:
        # Short: every token of it is encoded at every step (a from-scratch model gains nothing
        # from a persona; a pretrained chat model understands this just as well).
        return "Play blackjack. Answer hit or stick."

    def format_observation(self, observation: Any) -> str:
        player, dealer, usable_ace = observation
        ace = "yes" if usable_ace else "no"
        return f"Your sum is {int(player)}. The dealer shows {int(dealer)}. Usable ace: {ace}."

    def extract_action(self, response: str) -> int:
        # The first action word wins: "hit, then stick" means hit now.
        return self.first_action_name(response)
