"""``python -m llamagym_pl.plot --logdir runs/blackjack/version_0 --out curve.png``.

Renders a run's learning curve from its TensorBoard event files: the sampled rollout return
and the greedy evaluation return (± s.e.) against the number of episodes played.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from llamagym_pl.tb import read_scalars


def plot_run(log_dir: str | Path, out: str | Path, reference: dict[str, float] | None = None) -> Path:
    """Write the PNG and return its path; ``reference`` draws labelled horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = read_scalars(log_dir)
    if "rollout/return_mean" not in scalars:
        raise ValueError(f"{log_dir} has no rollout/return_mean scalar; is it a llamagym_pl run?")
    episodes = dict(scalars.get("rollout/episodes", []))
    steps = sorted(episodes)
    cumulative = dict(zip(steps, np.cumsum([episodes[s] for s in steps]), strict=True))

    def x_of(step: int) -> float:
        # eval points are logged at the step of the epoch they follow
        earlier = [s for s in steps if s <= step]
        return float(cumulative[earlier[-1]]) if earlier else 0.0

    fig, ax = plt.subplots(figsize=(8, 4.5))
    train = scalars["rollout/return_mean"]
    ax.plot([x_of(s) for s, _ in train], [v for _, v in train], alpha=0.45, label="rollout return (sampled)")
    if "eval/return_mean" in scalars:
        ev = scalars["eval/return_mean"]
        err = dict(scalars.get("eval/return_stderr", []))
        ax.errorbar(
            [x_of(s) for s, _ in ev],
            [v for _, v in ev],
            yerr=[err.get(s, 0.0) for s, _ in ev],
            marker="o",
            capsize=3,
            label="eval return (greedy)",
        )
    for name, value in (reference or {}).items():
        ax.axhline(value, linestyle="--", linewidth=0.8, color="gray")
        ax.annotate(name, (0, value), textcoords="offset points", xytext=(4, 2), fontsize=8, color="gray")
    ax.set_xlabel("episodes played")
    ax.set_ylabel("mean return per episode")
    ax.set_title(str(log_dir))
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


BLACKJACK_REFERENCE = {"optimal (sab=False)": -0.0466, "stick at >= 17": -0.079, "random": -0.396}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--logdir", required=True, help="a run version directory (event files)")
    parser.add_argument("--out", default="curve.png")
    parser.add_argument("--blackjack", action="store_true", help="draw the Blackjack reference returns")
    args = parser.parse_args(argv)
    path = plot_run(args.logdir, args.out, BLACKJACK_REFERENCE if args.blackjack else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
