# The two commands the README leads with: `make demo` and `make test`.
# Both create .venv if it is missing and install torch==2.13.0 (the CPU wheel) before the project,
# so pip never resolves torch to a multi-GB CUDA build.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.k2pipe-installed

.PHONY: demo test test-all lint install clean

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
	$(BIN)/ruff check k2model pipelines ray_jobs tests benchmarks infra

# The suite, then the tests whose numbers depend on what optimizer.ns_dtype=auto resolves to, again as
# the other CPU kind (AMX/AVX512-BF16 machines resolve it to bf16, AVX2-only ones to fp32).
OTHER_CPU_KIND = $(BIN)/python -c "from k2model.optim import native_bf16_matmul; print('avx2' if native_bf16_matmul('cpu') else 'amx')"

test: $(STAMP) lint
	$(BIN)/python -m pytest -q --durations=15 tests
	$(BIN)/python -m pytest -q -m auto_dtype --cpu-kind=$$($(OTHER_CPU_KIND)) tests

# Everything `make test` runs, then the multi-node fault scenarios CI skips (root and `ip netns` needed).
test-all: test
	$(BIN)/python -m pytest -q --fault-matrix -m fault_matrix tests

clean:
	rm -rf $(VENV) k2runs mlruns mlflow.db
