"""What a sweep prints of its study: one trial's settings on a line, and the table of all trials."""

from __future__ import annotations

from typing import Any

import optuna


def format_params(params: dict[str, Any]) -> str:
    """``key=value`` pairs on one line, floats to four significant digits."""
    return " ".join(f"{k}={_value(v)}" for k, v in params.items())


def trials_table(study: optuna.Study) -> str:
    """The study's trials, one row each: number, state, value, epochs, then each searched key."""
    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.params})
    head = ["trial", "state", "value", "epochs", *keys]
    rows = [head]
    for t in trials:
        value = "" if t.value is None else f"{t.value:+.4f}"
        epochs = str(t.last_step) if t.last_step is not None else ""
        cells = [_cell(t.params.get(k)) for k in keys]
        rows.append([str(t.number), t.state.name, value, epochs, *cells])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return "" if value is None else _value(value)


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
