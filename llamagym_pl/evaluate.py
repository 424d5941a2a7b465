"""``python -m llamagym_pl.evaluate --config <yaml> --ckpt_path <ckpt> [--episodes N] [--out F]``.

Greedy decoding on fixed, seeded evaluation deals, batched over ``data.eval_num_envs`` envs.
Prints mean return ± standard error, win/draw/loss and invalid-action rates, and writes them
as JSON (default: ``eval.json`` beside the checkpoint). The same config file as for training
is used, so the agent, env and model settings match the run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from llamagym_pl.fit import build_cli


def load_weights(module, ckpt_path: str) -> None:
    """Load a Lightning checkpoint's weights (``weights_only``: no pickled code runs)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path!r} does not exist; pass the path of a .ckpt file")
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state, strict=False)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    episodes, out = 20_000, None
    for flag in ("--episodes", "--out"):
        if flag in argv:
            i = argv.index(flag)
            value = argv[i + 1]
            del argv[i : i + 2]
            if flag == "--episodes":
                episodes = int(value)
            else:
                out = value
    cli = build_cli(args=argv, run_fit=False)
    ckpt_path = cli.config.get("ckpt_path")
    if not ckpt_path:
        raise SystemExit("evaluate needs --ckpt_path PATH (a checkpoint written by llamagym_pl.fit)")
    module, datamodule = cli.model, cli.datamodule
    load_weights(module, ckpt_path)
    results = datamodule.evaluate(module.policy, module.tokenizer, episodes)
    results["ckpt_path"] = str(ckpt_path)
    print(
        f"mean return {results['return_mean']:+.4f} ± {results['return_stderr']:.4f} (s.e.) over "
        f"{results['episodes']} episodes | win {results['win_rate']:.3f} draw {results['draw_rate']:.3f} "
        f"loss {results['loss_rate']:.3f} | invalid actions {results['invalid_action_rate']:.4f}"
    )
    out_path = Path(out) if out else Path(ckpt_path).with_name("eval.json")
    out_path.write_text(json.dumps(results, indent=2))
    print(f"wrote {out_path}")
    return results


if __name__ == "__main__":
    main()
