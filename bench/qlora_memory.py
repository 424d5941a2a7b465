"""Memory of one PPO step (LoRA r=8 on every linear layer), in a fresh process per mode.

usage: python bench/qlora_memory.py MODEL_DIR {none,4bit,8bit} [gc]
(build MODEL_DIR: python -m llamagym_pl.tiny_model --out DIR --hidden-size 256
 --num-layers 4 --num-heads 4)
Reports the LM's weight bytes, RSS after loading, and the peak RSS of the step above the RSS
before it (Linux VmHWM, reset through /proc/self/clear_refs just before the step).
"""

import gc
import sys
import time

import bitsandbytes  # noqa: F401  (imported in every mode so the baseline is the same)
import torch
from transformers import AutoTokenizer

from llamagym_pl.actions import GenerateStyle
from llamagym_pl.actions.generate import row_minibatch
from llamagym_pl.buffer import build_buffer
from llamagym_pl.episode import Episode
from llamagym_pl.loading import build_policy
from llamagym_pl.update import minibatch_loss, prepare_rollout


def status_mib(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


model_dir, quantization = sys.argv[1], sys.argv[2]
checkpointing = "gc" in sys.argv[3:]
torch.manual_seed(0)
base = status_mib("VmRSS")
tokenizer = AutoTokenizer.from_pretrained(model_dir)
policy = build_policy(
    model_dir, quantization=quantization, lora_r=8, lora_alpha=16, gradient_checkpointing=checkpointing
)
weights = sum(t.numel() * t.element_size() for t in [*policy.parameters(), *policy.buffers()]) / 2**20
obs = [" ".join(["your sum is 14 . the dealer shows 7 ."] * 8)] * 2  # ~180-token episodes
eps = [Episode("you play blackjack .", obs, ["hit", "stick"], [0.0, 1.0], [False] * 2, terminated=True)] * 8
buf = build_buffer(tokenizer, eps)
prepare_rollout(policy, buf, GenerateStyle(), 1.0, 0.95, batch_size=8)  # touches every weight page
batch = row_minibatch(buf, list(range(8)))
opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
gc.collect()
before = status_mib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
t = time.perf_counter()
loss, _ = minibatch_loss(GenerateStyle(), policy.train(), batch, 0.2, True, 0.5, 0.0)
loss.backward()
opt.step()
step_s = time.perf_counter() - t
print(
    f"{quantization:5s} gc={checkpointing:d} batch={tuple(batch['input_ids'].shape)} "
    f"weights={weights:.0f}MiB "
    f"rss_loaded=+{before - base:.0f}MiB step_peak=+{status_mib('VmHWM') - before:.0f}MiB step={step_s:.2f}s"
)
