"""Env faults in a rollout: counted and recovered from (:class:`EnvFaults`), and a time limit on
``env.step``/``env.reset`` (``data.env_timeout_s``) that turns a hang into such a fault."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from llamagym_pl.guards import ConfigError, RunAborted

log = logging.getLogger(__name__)


class EnvFaults:
    """Counts the env faults of one rollout; raises :class:`RunAborted` past ``limit``.

    A fault is ``env.step``/``env.reset`` raising (or running past ``data.env_timeout_s``), or a
    non-finite reward. The rollout drops
    the episode it happened in and resets that env with its next derived seed.
    """

    def __init__(self, env_id: str, limit: int) -> None:
        self.env_id = env_id
        self.limit = limit
        self.count = 0

    def record(self, where: str, err: BaseException) -> None:
        self.count += 1
        if self.count > self.limit:
            raise RunAborted(
                f"env {self.env_id!r} failed {self.count} times in one rollout, more than "
                f"data.max_env_errors={self.limit}; last in {where}: {type(err).__name__}: {err}. "
                "Fix the env (its traceback is chained above) or raise data.max_env_errors"
            ) from err
        log.warning(
            "env %r failed in %s (%s: %s): episode dropped, env reset with its next seed (%d of at most %d)",
            self.env_id, where, type(err).__name__, err, self.count, self.limit,
        )  # fmt: skip


class EnvTimeout(TimeoutError):
    """An env call that ran past ``data.env_timeout_s``: a fault, like an env that raises."""


@contextmanager
def env_deadline(seconds: float | None, what: str) -> Iterator[None]:
    """Raise :class:`EnvTimeout` inside the ``with`` body once it has run ``seconds`` (None: no limit).

    SIGALRM, not a worker thread: the exception is raised in the env's own code, which unwinds
    (its ``finally`` blocks run) and can be reset like an env that raised. A thread cannot be
    stopped: a hung ``step`` would keep running, and spinning, beside the env's next episode.
    Unix only, main thread only (where Lightning runs the rollout): see :func:`check_env_timeout`.
    """
    if seconds is None:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise EnvTimeout(f"{what} took longer than data.env_timeout_s={seconds}")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_env_timeout(seconds: float | None) -> None:
    """Refuse ``data.env_timeout_s`` where SIGALRM cannot deliver it (Windows, a non-main thread)."""
    if seconds is None:
        return
    if not hasattr(signal, "setitimer"):
        raise ConfigError(f"data.env_timeout_s={seconds} needs SIGALRM (Unix); set it to null here")
    if threading.current_thread() is not threading.main_thread():
        raise ConfigError(
            f"data.env_timeout_s={seconds} works in the main thread only (it uses SIGALRM), and this "
            f"rollout runs in thread {threading.current_thread().name!r}: set it to null, or play there"
        )
