# All targets use the project's own virtual environment in .venv/.
PY ?= .venv/bin/python
CONFIG ?= experiments/blackjack.yaml

.PHONY: install constraints test lint fit resume tensorboard bench plot evaluate clean

install:  ## create .venv, install the CPU torch wheel first, then the project with the dev, textworld, sweep and wandb extras, at the versions CI tested (constraints.txt)
	python3 -m venv .venv
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -c constraints.txt -e '.[dev,textworld,sweep,wandb]'

constraints:  ## rewrite constraints.txt from .venv (after upgrading a dependency there and passing `make test`)
	echo "# The versions CI tested: \`make install\` installs these (\`make constraints\` writes this file from .venv)." > constraints.txt
	echo "# Library users get pyproject.toml's ranges instead." >> constraints.txt
	$(PY) -m pip freeze --exclude-editable | grep -iv '^llamagym[-_]pl[= @]' \
		| sed -E 's/^(torch==[^+]*)\+.*/\1/' >> constraints.txt

test:  ## the CPU test suite (offline)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

lint:
	$(PY) -m ruff check llamagym_pl tests
	$(PY) -m ruff format --check llamagym_pl tests

fit:  ## train the default experiment
	$(PY) -m llamagym_pl.fit --config $(CONFIG)

resume:  ## continue the default experiment from its last checkpoint
	$(PY) -m llamagym_pl.fit --config $(CONFIG) --ckpt_path last

bench:  ## throughput vs the bare model's limit (~5 min on 2 CPU cores), then bench-llamagym (QUICK=1: a smoke run)
	$(PY) bench/bench.py $(if $(QUICK),--quick) $(BENCH_ARGS)
	$(if $(QUICK),,$(PY) bench/ddp_scaling.py)
	$(MAKE) --no-print-directory bench-llamagym

.PHONY: bench-llamagym
bench-llamagym:  ## LlamaGym 0.1.1 vs us, same agent and models (~25 min; skipped until bash bench/llamagym/setup.sh)
	$(PY) bench/llamagym/side_by_side.py $(if $(QUICK),--quick) $(LLAMAGYM_ARGS)

tensorboard:
	.venv/bin/tensorboard --logdir runs

clean:
	rm -rf runs lightning_logs .pytest_cache

LOGDIR ?= $(shell ls -d runs/blackjack/version_* 2>/dev/null | sort -V | tail -n 1)
plot:  ## render the newest blackjack run's learning curve to docs/blackjack-curve.png
	$(PY) -m llamagym_pl.plot --logdir $(LOGDIR) --out docs/blackjack-curve.png --blackjack

CKPT ?= runs/blackjack/checkpoints/last.ckpt
evaluate:  ## greedy evaluation (20,000 episodes) of the last checkpoint
	$(PY) -m llamagym_pl.evaluate --config $(CONFIG) --ckpt_path $(CKPT)

gpu-check:  ## issue #15's GPU check (pytest -m gpu + a CUDA bench row) into OUT (default bench_results/gpu_check); DRY=1: on the CPU
	PYTHON=$(PY) bash bench/gpu_check.sh $(if $(DRY),--dry-run) --out $(or $(OUT),bench_results/gpu_check)
