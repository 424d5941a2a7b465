"""Gymnasium envs of this package, registered on import (no optional dependency is imported here).

``llamagym_pl/TextWorld-v0``: a seeded, generated TextWorld game (needs the ``textworld`` extra,
imported only when the env is made), see :mod:`llamagym_pl.envs.textworld`::

    import gymnasium as gym
    import llamagym_pl.envs  # or gym.make("llamagym_pl.envs:llamagym_pl/TextWorld-v0", ...)

    env = gym.make("llamagym_pl/TextWorld-v0", seed=1, max_episode_steps=8)
"""

from __future__ import annotations

import gymnasium as gym

TEXTWORLD_ID = "llamagym_pl/TextWorld-v0"

if TEXTWORLD_ID not in gym.registry:
    gym.register(
        id=TEXTWORLD_ID,
        entry_point="llamagym_pl.envs.textworld:TextWorldEnv",
        # Gymnasium's TimeLimit truncates (TextWorld's own limit would end the game as "done",
        # indistinguishable from a win or a loss). TextWorld's register_game default: 50.
        max_episode_steps=50,
        kwargs={"seed": 0, "world_size": 2, "nb_objects": 4, "quest_length": 2},
    )

__all__ = ["TEXTWORLD_ID"]
