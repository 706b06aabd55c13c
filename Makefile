# forkless: `make run` (the demo) and `make test` (everything CI runs) set themselves up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODELS := .models
PORT ?= 8080

.PHONY: venv run run-runtime serve images test test-fast lint bench reliability models clean proto kserve-env ray-env

venv: $(VENV)/.installed

# Idempotent: reinstalls only when the pins change. constraints.txt pins every transitive package.
$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar off -e '.[runtime,operator,dev]' -c constraints.txt
	@touch $@

# KServe 0.21 and what it needs, beside the venv (its pins clash with the operator's kubernetes client):
# the tests put it on PYTHONPATH to run KServe's own server and forkless's `format: kserve` side by side,
# as a user's image adds it to the runtime's.
KSERVE_ENV := .venv-kserve
KSERVE_REQUIREMENTS := examples/kserve/custom-predictor/requirements.txt
kserve-env: $(KSERVE_ENV)/.installed

$(KSERVE_ENV)/.installed: $(KSERVE_REQUIREMENTS) | venv
	rm -rf $(KSERVE_ENV)
	$(PY) -m pip install --quiet --progress-bar off --no-deps --target $(KSERVE_ENV) -r $(KSERVE_REQUIREMENTS)
	@touch $@

# Ray Serve 2.60 beside the venv (engine: ray): the tests run a local Ray cluster with the serveConfigV2 the
# operator renders, and check it against Ray's own schema. The list is ray[serve] resolved against
# constraints.txt, so nothing the venv pins is replaced.
RAY_ENV := .venv-ray
RAY_REQUIREMENTS := examples/ray/requirements.txt
ray-env: $(RAY_ENV)/.installed

$(RAY_ENV)/.installed: $(RAY_REQUIREMENTS) | venv
	rm -rf $(RAY_ENV)
	$(PY) -m pip install --quiet --progress-bar off --no-deps --target $(RAY_ENV) -r $(RAY_REQUIREMENTS)
	@touch $@

models: venv
	@$(PY) -m forkless_runtime.example_models $(MODELS)

# The full demo: local control plane (or the chart on $KUBECONFIG's cluster), operator, an
# InferenceService, the runtime started exactly as its Deployment renders it, one request answered.
run: venv
	@$(PY) hack/demo.py

# Serve the example MLP with two spawned workers, send it a request, print the answer, stop.
# forkless-runtime and forkless-operator images without Docker (buildah, a Debian base from
# mmdebstrap, wheels of the pinned constraints), imported into the local real node when it runs.
images:
	@hack/images.sh all runtime operator ray

run-runtime: models
	@$(PY) hack/demo-runtime.py --model $(MODELS)/mlp.pt --port $(PORT)

serve: models
	$(VENV)/bin/forkless-runtime serve --model-name mlp --model-uri $(MODELS)/mlp.pt --workers 2 --port $(PORT)

test: venv kserve-env ray-env
	$(VENV)/bin/ruff check runtime operator tests bench hack
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -ra

test-fast: venv
	$(PY) -m pytest -q -ra -m "not cluster and not slow"

lint: venv
	$(VENV)/bin/ruff check runtime operator tests bench hack
	$(VENV)/bin/mypy

# Runtime side by side (bare model, front-end ceiling, forkless, KServe 0.21) -> bench/results/latest.md;
# then the operator at 1000 InferenceServices -> bench/results/operator-latest.md; then a 1 GiB model
# download against the S3 server's raw throughput -> bench/results/storage-latest.md; then each
# precision's speed and error, and the plan against measured memory -> bench/results/precision-latest.md;
# then HTTP against gRPC; then the same model through both engines (forkless, Ray Serve) -> engines-latest.md.
bench: venv ray-env
	$(PY) bench/run.py $(BENCH_ARGS)
	$(PY) bench/operator_scale.py $(OPERATOR_BENCH_ARGS)
	$(PY) bench/storage.py $(STORAGE_BENCH_ARGS)
	$(PY) bench/precision.py $(PRECISION_BENCH_ARGS)
	$(PY) bench/protocols.py $(PROTOCOLS_BENCH_ARGS)
	$(PY) bench/engines.py $(ENGINES_BENCH_ARGS)

# Fuzz, soak with worker kills, overload (bench/results/reliability.md; RELIABILITY_ARGS="--duration 600"),
# then the operator under faults: killed mid-burst, API server restarted, children edited by others.
reliability: venv
	$(PY) bench/reliability.py $(RELIABILITY_ARGS)
	$(PY) -m pytest -q tests/reliability/test_operator_chaos.py tests/reliability/test_crd_properties.py

clean:
	rm -rf $(VENV) $(KSERVE_ENV) $(RAY_ENV) $(MODELS) *.egg-info .pytest_cache .mypy_cache .ruff_cache

# Regenerate the gRPC messages from runtime/forkless_runtime/protocol/proto/grpc_service.proto
# (tests/runtime/test_codecs.py fails when the committed pb2 drifts from the proto).
proto: venv
	cd runtime/forkless_runtime/protocol/proto && ../../../../$(PY) -m grpc_tools.protoc -I. --python_out=.. --pyi_out=.. grpc_service.proto
	cd operator/forkless_operator/proto && ../../../$(PY) -m grpc_tools.protoc -I. --python_out=.. --pyi_out=.. externalscaler.proto
