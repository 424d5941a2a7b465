"""Helpers for tests that run ``python -m llamagym_pl.fit`` as a real subprocess and compare
what runs saved and logged (crash/resume, preemption, a full disk)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

Scalars = dict[str, list[tuple[int, float]]]


def environment() -> dict[str, str]:
    # One thread per run: the machine is shared, and every run must compute the same floats.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def saved(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None before the first save. Any other failure to load it
    (a half-written file) fails the test."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None


def deterministic_after(scalars: Scalars, step: int) -> Scalars:
    """Points logged after ``step``, without wall-clock timings (tags ending in ``_s``)."""
    return {
        tag: [(s, v) for s, v in pts if s > step] for tag, pts in scalars.items() if not tag.endswith("_s")
    }
