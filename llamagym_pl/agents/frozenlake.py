"""An agent for Gymnasium's ``FrozenLake-v1``."""

from __future__ import annotations

from typing import Any

from llamagym_pl.agent import Agent

DEFAULT_SYSTEM_PROMPT = "Walk on the frozen lake to the goal. Answer with one word: left, down, right or up."


class FrozenLakeAgent(Agent):
    """Walks the lake by answering ``left``, ``down``, ``right`` or ``up``.

    Observations are the cell index ``row * ncol + col``; the text names the row, the column
    and the cell (``ncol`` defaults to 4, the 4x4 map). Only the position is said, not the map:
    the agent learns where the holes are from the rewards.

    Args:
        ncol: the map's width.
        system_prompt: the system message (None: the default instruction, for chat models; ""
            sends none, which keeps the tiny model's prompts short and its state easy to read).
    """

    action_names = ["left", "down", "right", "up"]  # in the env's action order

    def __init__(self, *args: Any, ncol: int = 4, system_prompt: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if ncol < 1:
            raise ValueError(f"ncol={ncol} must be >= 1 (the map's width, 4 for the 4x4 map)")
        self.ncol = ncol
        self.system_prompt = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt

    def get_system_prompt(self) -> str:
        return self.system_prompt

    def format_observation(self, observation: Any) -> str:
        cell = int(observation)
        row, col = divmod(cell, self.ncol)
        # The cell number too: one token that tells the position apart. With row and column
        # alone a small model trained from scratch generalizes along the row and plays the same
        # move on (2, 0), where down falls into a hole, as on (2, 1), where down is best.
        return f"You are at row {row}, column {col} (cell {cell})."

    def extract_action(self, response: str) -> int:
        return self.first_action_name(response)
