"""TextWorld as a Gymnasium env: a seeded generated game, played with command strings.

``TextWorldEnv(seed, world_size, nb_objects, quest_length)`` plays the game that

    tw-make custom --world-size W --nb-objects N --quest-length L --seed S --output \\
        <cache>/tw_games/custom-wsW-noN-qlL-seedS.z8

makes (the same arguments make the same game, byte for byte). It is made at first use into
``$LLAMAGYM_PL_CACHE/tw_games`` (default ``~/.cache/llamagym_pl/tw_games``), atomically, and
reused afterwards. Needs the ``textworld`` extra: ``pip install -e '.[textworld]'``.

TextWorld's own API is the old Gym one, ``(obs, score, done, infos)``. Here it is Gymnasium's:
``reset(seed=...)`` returns ``(observation, info)`` and ``step(command)`` returns
``(observation, reward, terminated, truncated, info)`` with

- ``observation``: the game's text, as TextWorld gives it (the first one starts with the
  TextWorld banner; agents clean it up, see :class:`~llamagym_pl.agents.textworld.TextWorldAgent`);
- ``reward``: the change of the game's score (TextWorld's score is cumulative);
- ``terminated``: the game ended, won (``info["won"]``) or lost (``info["lost"]``);
- ``truncated``: never here; the time limit is Gymnasium's ``TimeLimit`` (``max_episode_steps``
  of :func:`gymnasium.make`, 50 at registration), so a cut episode is not mistaken for an end;
- ``info``: ``admissible_commands`` (the commands valid in this state, for
  ``data.policy: score``), ``won``, ``lost``, ``score``, ``max_score``, ``moves``, ``objective``
  and ``policy_commands`` (a winning command sequence from this state, as TextWorld plans it).
"""

from __future__ import annotations

import os
import re
import shutil
import string
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym

from llamagym_pl.tiny_model import cache_dir

try:
    import textworld
except ImportError as err:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"the TextWorld env needs the textworld package ({err}); install it with "
        "pip install -e '.[textworld]'"
    ) from err

REQUEST_INFOS = textworld.EnvInfos(
    admissible_commands=True,
    possible_admissible_commands=True,
    won=True,
    lost=True,
    score=True,
    max_score=True,
    moves=True,
    objective=True,
    policy_commands=True,
)
INFO_KEYS = ("admissible_commands", "won", "lost", "score", "max_score", "moves", "objective")
INFO_KEYS += ("policy_commands",)

COMMAND_CHARSET = string.ascii_letters + string.digits + string.punctuation + " "
"""Characters of a command: printable, one line (a newline would type a second command)."""

# Interpreter commands that leave the game world: "quit"/"restart" ask "Are you sure?" and then
# swallow every command but yes/no, and "restart"/"restore"/"undo" would rewind the score that
# rewards are computed from. They are not passed to the game.
META_COMMANDS = ("quit", "q", "restart", "restore", "save", "undo", "script", "unscript", "transcript")
META_REPLY = "That command is not available in this game."
# A meta command is the first word of a command or of one of the commands typed on one line
# ("look. quit", "look then quit"); elsewhere the word can be a name ("take type Q keycard").
_META = re.compile(rf"(?:^|[.,;!?]|\bthen\b)\s*(?:{'|'.join(META_COMMANDS)})\b", re.IGNORECASE)


def is_meta_command(command: str) -> bool:
    """Whether ``command`` would reach the interpreter's meta commands (see ``META_COMMANDS``)."""
    return _META.search(command.strip()) is not None


TW_MAKE_TIMEOUT_S = 300


def game_name(seed: int, world_size: int, nb_objects: int, quest_length: int) -> str:
    return f"custom-ws{world_size}-no{nb_objects}-ql{quest_length}-seed{seed}"


def make_game(seed: int, world_size: int = 2, nb_objects: int = 4, quest_length: int = 2) -> Path:
    """The ``.z8`` file of the game ``tw-make custom`` makes with these settings (made if missing).

    Made in a temporary folder beside its destination, then moved in (the ``.json`` TextWorld
    reads beside the game first, the ``.z8`` last), so a crash or a concurrent maker (another
    DDP rank) never leaves a half-written game that looks complete.
    """
    settings = {"world-size": world_size, "nb-objects": nb_objects, "quest-length": quest_length}
    for flag, value in settings.items():
        if value < 1:
            raise ValueError(f"TextWorld {flag.replace('-', '_')}={value} must be >= 1")
    games = cache_dir() / "tw_games"
    name = game_name(seed, world_size, nb_objects, quest_length)
    path = games / f"{name}.z8"
    if path.is_file() and path.with_suffix(".json").is_file():
        return path
    games.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=games))
    try:
        _run_tw_make({**settings, "seed": seed, "output": tmp / path.name})
        for suffix in (".ni", ".json", ".z8"):  # the .z8 last: it marks a complete game
            if (tmp / name).with_suffix(suffix).is_file():
                os.replace((tmp / name).with_suffix(suffix), path.with_suffix(suffix))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _run_tw_make(flags: dict[str, Any]) -> None:
    # tw-make is a script installed beside this interpreter; run it with this interpreter so it
    # uses the same environment, whatever is on PATH.
    script = Path(sys.executable).with_name("tw-make")
    script = script if script.is_file() else shutil.which("tw-make")
    if script is None:
        raise FileNotFoundError("tw-make (installed with textworld) is not beside python nor on PATH")
    cmd = [sys.executable, str(script), "custom", "--silent"]
    cmd += [str(arg) for flag, value in flags.items() for arg in (f"--{flag}", value)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TW_MAKE_TIMEOUT_S, check=False)
    if done.returncode != 0 or not Path(flags["output"]).is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ValueError(f"tw-make could not make the TextWorld game ({' '.join(cmd[1:])}): {tail[0]}")


class CommandSpace(gym.spaces.Text):
    """Command strings (one line of printable characters). ``sample()`` draws one of the game's
    commands (``commands``), not random characters: a random action is then a move of the game
    (the rollout's ``invalid_action: random`` fallback plays one)."""

    def __init__(self, commands: list[str], max_length: int = 200, seed: int | None = None) -> None:
        super().__init__(max_length, min_length=1, charset=COMMAND_CHARSET, seed=seed)
        if not commands:
            raise ValueError("CommandSpace needs at least one command to sample from")
        self.commands = list(commands)

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        if mask is not None or probability is not None:
            return super().sample(mask, probability)
        return self.commands[int(self.np_random.integers(len(self.commands)))]


class TextWorldEnv(gym.Env[str, str]):
    """One generated TextWorld game (see the module docstring for the step semantics).

    Args:
        seed: the game's generation seed (``tw-make --seed``): which game, not how it is played
            (a game is deterministic; ``reset(seed=...)`` seeds only ``np_random``).
        world_size: rooms (``--world-size``).
        nb_objects: minimum number of objects (``--nb-objects``).
        quest_length: commands the quest needs (``--quest-length``).
    """

    metadata = {"render_modes": []}

    def __init__(
        self, seed: int = 0, world_size: int = 2, nb_objects: int = 4, quest_length: int = 2
    ) -> None:
        self.game_file = make_game(seed, world_size, nb_objects, quest_length)
        with warnings.catch_warnings():
            # Jericho cannot find the score in TextWorld's games and says so; TextWorld keeps it.
            warnings.filterwarnings("ignore", message=r"Game .* is not fully supported")
            self._game = textworld.start(str(self.game_file), REQUEST_INFOS)
        state = self._game.reset()
        self.observation_space = gym.spaces.Text(1_000_000, min_length=0, charset=string.printable)
        self.action_space = CommandSpace(sorted(state["possible_admissible_commands"]))
        self._score = 0
        self._info: dict[str, Any] | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict]:
        super().reset(seed=seed)
        state = self._game.reset()
        self._score = state["score"]
        self._info = _info(state)
        return state["feedback"], dict(self._info)

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        if self._info is None:
            raise RuntimeError("TextWorldEnv.step() before reset()")
        command = str(action).strip()
        if is_meta_command(command):
            return META_REPLY, 0.0, False, False, dict(self._info)  # the game is left untouched
        state, score, done = self._game.step(command)
        reward = float(score - self._score)
        self._score = score
        self._info = _info(state)
        terminated = bool(done or state["won"] or state["lost"])
        return state["feedback"], reward, terminated, False, dict(self._info)

    def close(self) -> None:
        self._game.close()
        super().close()


def _info(state: Any) -> dict[str, Any]:
    info = {key: state[key] for key in INFO_KEYS}
    info["admissible_commands"] = list(info["admissible_commands"])
    info["policy_commands"] = list(info["policy_commands"] or [])
    return info
