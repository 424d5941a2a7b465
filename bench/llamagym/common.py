"""What every side-by-side runner shares: LlamaGym's example Blackjack prompts, its action parsing,
and the load check. Plain Python: it is imported in LlamaGym's own venv and in ours."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

# LlamaGym's examples/blackjack.py, word for word.
SYSTEM_PROMPT = (
    "You are an expert blackjack player. Every turn, you'll see your current sum, the dealer's "
    "showing card value, and whether you have a usable ace. Win by exceeding the dealer's hand "
    'but not exceeding 21.\nDecide whether to stay with your current sum by writing "Action: 0" '
    'or accept another card by writing "Action: 1". Accept a card unless very close to 21.'
)
ACTION = re.compile(r"Action: ([01])")
HIT = 1  # what an unparsable reply plays, in every runner (LlamaGym's example returned None)
ENV_ID, ENV_KWARGS = "Blackjack-v1", {"natural": False, "sab": False}
SEED = 42069  # LlamaGym's example seed; the env is seeded once, at the first reset


def format_observation(observation: Any) -> str:
    return (
        f"You: {observation[0]}. Dealer: {observation[1]}. "
        f"You have {'an' if bool(observation[2]) else 'no'} ace."
    )


def parse_action(response: str) -> tuple[int, bool]:
    """The action a reply names, and whether it named one (else :data:`HIT`)."""
    match = ACTION.search(response)
    if match:
        return int(match.group(1)), True
    low = response.lower()
    if "stick" in low:
        return 0, True
    if "hit" in low:
        return 1, True
    return HIT, False


class OtherLoad:
    """CPU seconds the rest of the machine used while a run went on: a run beside a busy process is
    no fair comparison (the driver warns above 0.1 cores)."""

    def __init__(self) -> None:
        self.start = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[float, float]:
        """(the machine's busy CPU seconds, this process's CPU seconds)."""
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
        times = os.times()
        return busy, times.user + times.system

    def cores(self, wall: float) -> float:
        """Mean cores used by other processes since construction, over ``wall`` seconds."""
        busy, own = self._snapshot()
        return max(0.0, (busy - self.start[0]) - (own - self.start[1])) / wall


def write_json(result: dict[str, Any], path: str | None) -> None:
    print(json.dumps(result))
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1) + "\n")
