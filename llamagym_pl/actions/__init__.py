"""Action styles: how the policy chooses an action and how its log-probability is computed.

``generate`` (:class:`GenerateStyle`): the LM writes each reply, every token an action.
``score`` (:class:`ScoreStyle`): the LM picks among candidate actions, one action per turn.
The protocol they share, :class:`ActionStyle`, is in :mod:`llamagym_pl.actions.base`.
"""

from __future__ import annotations

from typing import Any, Literal

from llamagym_pl.actions.base import ActionStyle, ActionTerms, Prepared, Rollout, RolloutDataset, read_rows
from llamagym_pl.actions.candidates import ScoreNormalization
from llamagym_pl.actions.generate import GenerateStyle
from llamagym_pl.actions.score import ScoreStyle

PolicyStyle = Literal["generate", "score"]

__all__ = [
    "ActionStyle",
    "ActionTerms",
    "GenerateStyle",
    "PolicyStyle",
    "Prepared",
    "Rollout",
    "RolloutDataset",
    "ScoreNormalization",
    "ScoreStyle",
    "make_style",
    "read_rows",
]


def make_style(
    policy: PolicyStyle,
    agent: Any,
    temperature: float = 1.0,
    max_new_tokens: int = 8,
    score_normalization: ScoreNormalization = "token",
    **settings: Any,
) -> ActionStyle:
    """The style named by ``policy`` (``data.policy``); ``settings`` are generation settings
    (see :class:`GenerateStyle`), unused by ``score``."""
    if policy == "generate":
        return GenerateStyle(max_new_tokens, temperature, **settings)
    if policy == "score":
        return ScoreStyle(agent, score_normalization, temperature)
    raise ValueError(f"policy={policy!r} is not one of generate, score")
