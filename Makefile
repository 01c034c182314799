# Two commands for a new user: `make run` (the tiny study) and `make test` (the test suite).
# Both create the virtual environment from pyproject.toml first (exact pins, CPU torch).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: run test smoke dry-run lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/.installed  ## the tiny study on CPU, end to end (results/tiny-qwen3/)
	snakemake --profile profiles/local all

test: $(BIN)/.installed  ## unit tests + real Snakemake runs of the smoke config
	pytest

smoke: $(BIN)/.installed  ## the smoke study only (~2 minutes)
	snakemake --profile profiles/local --configfile config/smoke.yaml all

dry-run: $(BIN)/.installed
	snakemake -n all

lint: $(BIN)/.installed
	snakemake --lint

clean:
	rm -rf results .snakemake
