"""The search-space file of :mod:`llamagym_pl.sweep`: what to search, what to optimize, how to prune.

.. code-block:: yaml

    objective: {metric: eval/return_mean, direction: maximize}
    pruner: median                  # none | median | percentile | threshold | hyperband |
                                    # successive_halving, or {name: median, n_warmup_steps: 20, ...}
    sampler: {n_startup_trials: 4}  # optional: optuna.samplers.TPESampler arguments (not seed)
    fixed:                          # optional: the same override for every trial
      trainer.max_epochs: 40
    params:                         # any fit key (model.*, data.*, trainer.*, ...)
      model.learning_rate: {type: float, low: 3.0e-4, high: 3.0e-3, log: true}
      model.update_epochs: {type: int, low: 1, high: 4}
      data.num_envs: {type: categorical, choices: [16, 32, 64]}

This module checks the file's own shape (types, ranges, names of fields); whether its keys and
values are valid ``fit`` settings is checked against ``fit``'s parser by :mod:`llamagym_pl.sweep`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml

from llamagym_pl.guards import ConfigError

PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "threshold": optuna.pruners.ThresholdPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
}
TOP_LEVEL = ("objective", "pruner", "sampler", "fixed", "params")
PARAM_FIELDS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}


class SpaceError(ConfigError):
    """A search-space file that cannot work; the message names the file and the field."""


@dataclass(frozen=True)
class Param:
    """One searched ``fit`` key and its Optuna distribution."""

    key: str
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        """This parameter's value for ``trial`` (recorded in the study under ``key``)."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.type == "int":
            step = int(self.step) if self.step is not None else 1
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=step, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def edge_values(self) -> list[Any]:
        """The values to check against ``fit``'s parser before any trial: both ends, or every choice."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


@dataclass(frozen=True)
class Space:
    """A parsed search-space file."""

    path: Path
    metric: str
    direction: Literal["maximize", "minimize"]
    params: tuple[Param, ...]
    pruner: optuna.pruners.BasePruner
    sampler_kwargs: dict[str, Any] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)

    def sampler(self, seed: int) -> optuna.samplers.TPESampler:
        return optuna.samplers.TPESampler(seed=seed, **self.sampler_kwargs)


def override_args(settings: dict[str, Any]) -> list[str]:
    """``{key: value}`` as ``fit`` flags (``--key value``); jsonargparse reads each value as YAML,
    so a non-string is written as JSON (a subset of YAML: ``null``, ``true``, ``1e-05``)."""
    args: list[str] = []
    for key, value in settings.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


def load_space(path: str | Path) -> Space:
    """Read and check a search-space file; :class:`SpaceError` (one line) if it cannot work."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SpaceError(f"cannot read search space {path}: {' '.join(str(err).split())}") from None

    def fail(message: str) -> SpaceError:
        return SpaceError(f"search space {path}: {message}")

    if not isinstance(raw, dict):
        raise fail(f"expected a mapping with {', '.join(TOP_LEVEL)}")
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        raise fail(f"unknown field {unknown[0]!r} (fields: {', '.join(TOP_LEVEL)})")
    metric, direction = _objective(raw.get("objective"), fail)
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise fail(
            "params: expected a mapping of fit keys to ranges, e.g. model.learning_rate: {type: float, ...}"
        )
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise fail("fixed: expected a mapping of fit keys to values")
    both = sorted(set(fixed) & set(params))
    if both:
        raise fail(f"{both[0]} is both fixed and searched")
    sampler_kwargs = raw.get("sampler") or {}
    if not isinstance(sampler_kwargs, dict) or "seed" in sampler_kwargs:
        raise fail("sampler: expected TPESampler arguments other than seed (the sweep's --seed sets it)")
    try:
        optuna.samplers.TPESampler(**sampler_kwargs)
    except (TypeError, ValueError) as err:
        raise fail(f"sampler: {err}") from None
    return Space(
        path=path,
        metric=metric,
        direction=direction,
        params=tuple(_param(str(key), spec, fail) for key, spec in params.items()),
        pruner=_pruner(raw.get("pruner", "median"), fail),
        sampler_kwargs=sampler_kwargs,
        fixed={str(k): v for k, v in fixed.items()},
    )


def _objective(objective: Any, fail: Any) -> tuple[str, Literal["maximize", "minimize"]]:
    if not isinstance(objective, dict) or set(objective) != {"metric", "direction"}:
        raise fail("objective: expected {metric: eval/..., direction: maximize|minimize}")
    metric, direction = objective["metric"], objective["direction"]
    # Only greedy evaluation (Lightning validation) is reported during a trial, and only it is
    # comparable between trials: rollout/* and train/* depend on the searched settings themselves.
    if not isinstance(metric, str) or not metric.startswith("eval/"):
        raise fail(f"objective.metric {metric!r} must be a greedy evaluation metric, eval/...")
    if direction not in ("maximize", "minimize"):
        raise fail(f"objective.direction {direction!r} must be maximize or minimize")
    return metric, direction


def _param(key: str, spec: Any, fail: Any) -> Param:
    if not isinstance(spec, dict) or spec.get("type") not in PARAM_FIELDS:
        raise fail(f"{key}: expected {{type: float|int|categorical, ...}}, got {spec!r}")
    kind = spec["type"]
    extra = sorted(set(spec) - PARAM_FIELDS[kind])
    if extra:
        raise fail(
            f"{key}: unknown field {extra[0]!r} for type {kind} (fields: {sorted(PARAM_FIELDS[kind])})"
        )
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise fail(f"{key}: choices must be a non-empty list")
        plain = (type(None), bool, int, float, str)  # what Optuna's CategoricalDistribution stores
        bad = [c for c in choices if not isinstance(c, plain)]
        if bad:
            raise fail(f"{key}: choice {bad[0]!r} is not a number, string, boolean or null")
        return Param(key, kind, choices=tuple(choices))
    low, high = (_number(key, name, spec.get(name), fail) for name in ("low", "high"))
    step = None if spec.get("step") is None else _number(key, "step", spec["step"], fail)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise fail(f"{key}: log must be true or false, got {log!r}")
    if kind == "int" and not (low.is_integer() and high.is_integer()):
        raise fail(f"{key}: an int range needs whole low and high, got {low:g} and {high:g}")
    if low >= high:
        raise fail(f"{key}: empty range, low {low:g} must be below high {high:g}")
    if log and low <= 0:
        raise fail(f"{key}: a log range needs low > 0, got {low:g}")
    if log and step is not None:
        raise fail(f"{key}: log and step cannot be combined")
    if step is not None and step <= 0:
        raise fail(f"{key}: step must be > 0, got {step:g}")
    return Param(key, kind, low=low, high=high, log=log, step=step)


def _number(key: str, name: str, value: Any, fail: Any) -> float:
    # PyYAML reads 1e-4 (no dot) as a string (YAML 1.1): accept any number Python can read.
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise fail(f"{key}: {name} must be a finite number, got {value!r}")
    return number


def _pruner(spec: Any, fail: Any) -> optuna.pruners.BasePruner:
    if spec is None:
        spec = "none"
    kwargs = dict(spec) if isinstance(spec, dict) else {"name": spec}
    name = kwargs.pop("name", None)
    if name not in PRUNERS:
        raise fail(f"pruner: {name!r} is not one of {', '.join(PRUNERS)} (or {{name: ..., <its arguments>}})")
    try:
        return PRUNERS[name](**kwargs)
    except (TypeError, ValueError) as err:
        raise fail(f"pruner: {name}: {err}") from None
