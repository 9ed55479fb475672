# The two commands the README leads with: `make demo` and `make test`.
# Both create .venv if it is missing and install torch==2.13.0 (the CPU wheel) before the project,
# so pip never resolves torch to a multi-GB CUDA build.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.k2pipe-installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | sed '/is ignored/d'
	$(BIN)/python -m pip install -q torch==2.13.0 2>&1 | sed '/is ignored/d'
	$(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | sed '/is ignored/d'
	$(BIN)/python -c "import torch, ray, mlflow, k2model, pipelines, ray_jobs" 
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/k2pipe run

lint: $(STAMP)
	$(BIN)/ruff check k2model pipelines ray_jobs tests benchmarks

test: $(STAMP) lint
	$(BIN)/python -m pytest -q --durations=15 tests

clean:
	rm -rf $(VENV) k2runs mlruns mlflow.db
