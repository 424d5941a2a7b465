#!/usr/bin/env bash
# Issue #15's GPU check in one command, on one CUDA GPU: the CUDA tests (pytest -m gpu) and a CUDA
# bench row (a random Qwen2.5-0.5B-shaped policy, LoRA in bf16, on our rollout and update code:
# decode tokens/s against the HBM-bandwidth bound, MFU, peak GPU memory). Writes gpu_check.json,
# gpu_check.txt and the parts' logs into --out, and exits non-zero naming the parts that failed.
# Under 10 minutes (each part has a time limit); about 5 expected on an H100/H200, not measured yet.
#
#   bash bench/gpu_check.sh --out gpu_check_out               # on the GPU machine
#   bash bench/gpu_check.sh --dry-run --out /tmp/gpu_check    # any CPU: tiny shapes, stand-in peaks
#   bash bench/gpu_check.sh --help                            # every flag (peak overrides, timeouts)
#
# Python: $PYTHON, else the repository's .venv/bin/python, else python3. It needs torch built for
# CUDA, transformers, peft, lightning and pytest (make install gives a CPU torch: install a CUDA
# wheel of the same version on the GPU machine).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 2
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi

# Nothing is downloaded: the bench model is built from a config and the tests build the tiny
# model. Offline mode makes a missing file fail at once instead of after the hub's retries.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

"$python" bench/gpu_check.py "$@"
status=$?
# 0: every part passed; 1: a part failed (the report names it); 2: bad flags (argparse).
if (( status > 2 )); then
    echo "gpu_check: bench/gpu_check.py itself died (exit $status) before its report; see above" >&2
fi
exit "$status"
