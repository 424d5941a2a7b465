"""Example agents, selectable in YAML by class path (e.g. ``llamagym_pl.agents.BlackjackAgent``)."""

from llamagym_pl.agents.blackjack import BlackjackAgent
from llamagym_pl.agents.frozenlake import FrozenLakeAgent

__all__ = ["BlackjackAgent", "FrozenLakeAgent"]
