# neox_llama: the two commands of the README, and helpers.
#   make demo   set up .venv and run the main job on the embedded default
#   make test   set up .venv and run lint + the test suite
#   make bench  every speed benchmark, ours vs a reference in the same run (BENCH_ARGS=--quick)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint docs bench clean

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "neox_llama needs Python 3.11 (the pinned torch 2.13.0 CPU wheel); set PYTHON=python3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) tools/prepare_data.py
	DS_ACCELERATOR=cpu $(PY) deepy.py train.py configs/llama3/tiny.yml configs/local.yml
	$(PY) tools/plot_metrics.py runs/local/logs/metrics.jsonl
	DS_ACCELERATOR=cpu $(PY) deepy.py train.py configs/llama3/tiny.yml configs/finetune/lora.yml
	rm -rf runs/lora/merged
	$(PY) tools/merge_lora.py --checkpoint runs/lora/checkpoints/global_step200 --output runs/lora/merged
	printf 'Give three tips for staying healthy.\nAnd one more?\n' | \
	  $(PY) tools/generate.py --checkpoint runs/lora/merged --chat --max-new-tokens 24

test: setup
	$(PY) -m ruff check .
	DS_ACCELERATOR=cpu WANDB_MODE=offline HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: setup
	DS_ACCELERATOR=cpu WANDB_MODE=offline HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not dist"

lint: setup
	$(PY) -m ruff check .

bench: setup
	DS_ACCELERATOR=cpu $(PY) benchmarks/run.py $(BENCH_ARGS)

docs: setup
	$(PY) -m neox_llama.config.docs

clean:
	rm -rf runs .pytest_cache .ruff_cache
