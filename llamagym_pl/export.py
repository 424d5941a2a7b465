"""Export a trained policy for use outside this library.

``python -m llamagym_pl.export --ckpt_path runs/x/checkpoints/last.ckpt --out exported [--merge]``

writes into ``--out``:

* the tokenizer (with the pad token used in training);
* ``value_head.safetensors``: the critic (``summary.weight`` (1, H), ``summary.bias`` (1,));
* with LoRA, ``adapter/``: the peft adapter, loadable with
  ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "OUT/adapter")``;
* with ``--merge`` or without LoRA, a full model loadable with
  ``AutoModelForCausalLM.from_pretrained("OUT")``. Merging always happens on a fresh,
  unquantized copy of the base in the training ``dtype`` (QLoRA's recommendation): merging into
  4-bit weights would round the LoRA update away.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from llamagym_pl.loading import load_causal_lm
from llamagym_pl.module import PPOModule
from llamagym_pl.policy import is_peft

VALUE_HEAD_FILE = "value_head.safetensors"
ADAPTER_DIR = "adapter"


def export(ckpt_path: str | Path, out: str | Path, merge: bool = False) -> Path:
    """Write the policy of checkpoint ``ckpt_path`` to directory ``out`` (see module docstring)."""
    # kl_coef=0: the reference policy is not exported, so its copy is not worth building.
    module = PPOModule.load_from_checkpoint(
        ckpt_path, map_location="cpu", weights_only=True, kl_coef=0.0, target_kl_ref=None
    )
    hp = module.hparams
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    module.tokenizer.save_pretrained(out)
    head = module.policy.value_head.state_dict()
    save_file({k: v.detach().float().contiguous() for k, v in head.items()}, str(out / VALUE_HEAD_FILE))
    lm = module.policy.lm
    if not is_peft(lm):
        lm.save_pretrained(out)
    else:
        lm.save_pretrained(out / ADAPTER_DIR)
        if merge:
            _merge(hp.name_or_path, hp.dtype, hp.trust_remote_code, out)
    info = {"ckpt_path": str(ckpt_path), "name_or_path": hp.name_or_path, "lora_r": hp.lora_r}
    info |= {"merged": merge or not is_peft(lm), "quantization": hp.quantization}
    (out / "llamagym_export.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def _merge(name_or_path: str, dtype: str, trust_remote_code: bool, out: Path) -> None:
    from peft import PeftModel

    base = load_causal_lm(name_or_path, dtype, trust_remote_code)
    merged = PeftModel.from_pretrained(base, out / ADAPTER_DIR).merge_and_unload()
    merged.save_pretrained(out)


def load_value_head(out: str | Path) -> dict[str, torch.Tensor]:
    """The exported value head's state dict (for :class:`~llamagym_pl.policy.ValueHead`)."""
    from safetensors.torch import load_file

    return load_file(str(Path(out) / VALUE_HEAD_FILE))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", required=True, help="a Lightning checkpoint of PPOModule")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--merge", action="store_true", help="also write the LoRA-merged full model")
    args = parser.parse_args(argv)
    print(export(args.ckpt_path, args.out, merge=args.merge))


if __name__ == "__main__":
    main()
