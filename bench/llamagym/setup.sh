#!/usr/bin/env bash
# Build LlamaGym 0.1.1's own venv from the package registry, and the two random Llama models the
# side-by-side table runs (bench/llamagym/side_by_side.py; about a minute plus the downloads).
#   bash bench/llamagym/setup.sh
# Into $LLAMAGYM_DIR (default: bench_results/llamagym of the project, where side_by_side.py looks):
# venv/, tiny-llama/ (0.66M params, vocab 4096) and small-llama/ (58M params, vocab 32000).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
DIR="${LLAMAGYM_DIR:-$(cd "$HERE/../.." && pwd)/bench_results/llamagym}"
V="$DIR/venv"

python3 -m venv "$V"
"$V/bin/pip" install torch==2.13.0   # the torch our own venv has (make install), so only the libraries differ
# LlamaGym 0.1.1 pins nothing: these are the versions of its release (Feb 2024) that still import.
"$V/bin/pip" install "trl==0.7.11" "transformers==4.36.2" "peft==0.7.1" "accelerate==0.21.0" \
    "gymnasium==0.29.1" "numpy<2"
# trl 0.7.11 needs `datasets`; a current one brings a pyarrow that refuses numpy<2 and `import trl`
# fails, so the early-2024 versions:
"$V/bin/pip" install "datasets==2.16.1" "pyarrow==14.0.2" "pandas==2.1.4" "numpy<2"
# llamagym's metadata also asks for bitsandbytes<0.41, textworld, wandb and scipy, which Blackjack
# on the CPU without 8-bit loading never imports.
"$V/bin/pip" install --no-deps "llamagym==0.1.1"
"$V/bin/pip" freeze > "$DIR/pip-freeze.txt"

"$V/bin/python" "$HERE/models.py" --out "$DIR/tiny-llama"
"$V/bin/python" "$HERE/models.py" --out "$DIR/small-llama" --vocab 32000 --hidden 512 --layers 8 \
    --heads 8 --inter 1376
