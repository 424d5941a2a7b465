"""The fit path (``llamagym_pl.fit`` on ``fit.yaml``) for the side-by-side table, in a process of
its own: env steps/s after epoch 0 (start-up and the first epoch's one-off costs excluded).

    python bench/llamagym/run_fit.py --model DIR --epochs 12 [--threads 2] [--json-out F] [fit options]

Further options go to ``llamagym_pl.fit`` (e.g. ``--data.num_envs 16``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.fit_probe import fit_probe
from bench.llamagym.common import OtherLoad, write_json

CONFIG = Path(__file__).resolve().parent / "fit.yaml"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--epochs", type=int, default=12, help="at least 2: the rate is over epochs 1..")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-out", default=None)
    args, fit_options = p.parse_known_args(argv)
    overrides = ["--model.name_or_path", args.model, "--torch_num_threads", str(args.threads), *fit_options]
    load = OtherLoad()
    with tempfile.TemporaryDirectory() as tmp:
        probe = fit_probe(args.epochs, overrides, tmp, config=CONFIG, logger=False)
    result = {
        "system": "llamagym_pl fit",
        "model": args.model,
        "fit_options": fit_options,
        "epochs": probe["epochs"],
        "env_steps": probe["env_steps"],
        "wall_s": round(probe["seconds"], 2),
        "env_steps_per_s": round(probe["env_steps_per_s"], 3),
        "other_procs_cpu_per_wall": round(load.cores(probe["seconds"]), 3),
        "threads": args.threads,
    }
    write_json(result, args.json_out)


if __name__ == "__main__":
    main()
