# forkless: `make run` (the demo) and `make test` (everything CI runs) set themselves up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODELS := .models
PORT ?= 8080

.PHONY: venv run run-runtime serve test test-fast lint bench reliability models clean

venv: $(VENV)/.installed

# Idempotent: reinstalls only when the pins change. constraints.txt pins every transitive package.
$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar off -e '.[runtime,operator,dev]' -c constraints.txt
	@touch $@

models: venv
	@$(PY) -m forkless_runtime.example_models $(MODELS)

# The full demo: local control plane (or the chart on $KUBECONFIG's cluster), operator, an
# InferenceService, the runtime started exactly as its Deployment renders it, one request answered.
run: venv
	@$(PY) hack/demo.py

# Serve the example MLP with two spawned workers, send it a request, print the answer, stop.
run-runtime: models
	@$(PY) hack/demo-runtime.py --model $(MODELS)/mlp.pt --port $(PORT)

serve: models
	$(VENV)/bin/forkless-runtime serve --model-name mlp --model-uri $(MODELS)/mlp.pt --workers 2 --port $(PORT)

test: venv
	$(PY) -m pytest -q -ra

test-fast: venv
	$(PY) -m pytest -q -ra -m "not cluster and not slow"

lint: venv
	$(VENV)/bin/ruff check runtime operator tests bench hack
	$(VENV)/bin/mypy

bench: venv
	$(PY) bench/run.py $(BENCH_ARGS)

# Fuzz, soak with worker kills, overload; writes bench/results/reliability.md (RELIABILITY_ARGS="--duration 600").
reliability: venv
	$(PY) bench/reliability.py $(RELIABILITY_ARGS)

clean:
	rm -rf $(VENV) $(MODELS) *.egg-info .pytest_cache .mypy_cache .ruff_cache
