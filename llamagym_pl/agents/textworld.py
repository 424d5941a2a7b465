"""An agent for TextWorld games (``llamagym_pl/TextWorld-v0``), the seed LlamaGym's second example.

Importing this module registers the env (and needs the ``textworld`` extra). With
``data.policy: score`` the LM chooses among the game's admissible commands
(``info["admissible_commands"]``, :meth:`Agent.candidate_actions`' default); with
``data.policy: generate`` it writes the command, and the game answers whatever it is typed.
"""

from __future__ import annotations

import re

import llamagym_pl.envs.textworld  # noqa: F401 - registers llamagym_pl/TextWorld-v0; needs textworld
from llamagym_pl.agent import Agent

# The TextWorld banner: the lines of ASCII art (no letters) that open the first observation.
_BANNER = re.compile(r"\A(?:[^A-Za-z\n]*\n)+")
# The input prompt ">" that ends every observation, with the interpreter's status line after it
# ("-= Spare Room =-0/1": the room, then score/moves).
_PROMPT = re.compile(r">\s*(?:-=.*?=-\s*-?\d+/\d+)?\s*\Z")


class TextWorldAgent(Agent):
    """Plays a TextWorld game with one command per turn (``go south``, ``take key`` ...)."""

    def get_system_prompt(self) -> str:
        return (
            "You are playing a text adventure game. Each message describes where you are and what "
            "happened. Follow the task you are given. Answer with one command only, for example: "
            "go north, take key, open door."
        )

    def format_observation(self, observation: str) -> str:
        """The game's text without the banner, the prompt and its status line, on one line."""
        text = _PROMPT.sub("", _BANNER.sub("", observation))
        return " ".join(text.split())

    def extract_action(self, response: str) -> str:
        """The reply's first non-empty line: the command typed into the game."""
        for line in response.splitlines():
            if line.strip():
                return line.strip()
        raise ValueError(f"no command in reply {response!r}")
