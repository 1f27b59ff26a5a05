# Two set-up commands (README): `make demo` runs the main job on the embedded default, `make test` the suite.
# Each creates .venv if missing and installs the project into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch/torchvision first, pinned to the releases this machine image provides (CPU use; CUDA when present).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo demo-vlm test test-fast lint venv clean-demo gpu-check

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m lavis.demo

# The same loop on the tiny Qwen2.5-VL recipe (lavis/projects/demo/shapes_qwen2_5_vl.yaml): train with 2 stages,
# export a transformers directory (--hf-out), score it on the same held-out benchmarks.
demo-vlm: $(STAMP)
	$(BIN)/python -m lavis.demo --vlm

# Everything, on two pytest-xdist workers: much of a launch's time is one process starting up and importing, so two
# at a time keep both cores busy (832 tests took 26 min this way on a 2-core machine with other jobs running).
test: lint
	$(BIN)/python -m pytest -q -n 2 tests

# The in-process tests only (no training launches, servers, CLI subprocesses or browsers): the edit-test loop,
# on two pytest-xdist workers.
# A test that starts a process without the `process` marker fails (tests/conftest.py), so the split stays true.
test-fast: lint
	$(BIN)/python -m pytest -q -n 2 -m "not process" tests

# ruff (settings in pyproject.toml): lint and import order; lint-imports: the import layers of docs/ARCHITECTURE.md
# (contracts in pyproject.toml); pyright: types of lavis/ in basic mode ([tool.pyright] in pyproject.toml, about a
# minute on two cores). `make test` runs them first.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/pyright

clean-demo:
	rm -rf output/shapes output/shapes_qwen2_5_vl cache/dataset/shapes

# One GPU, no weight files, within 8 minutes: writes output/gpu_check/gpu_check.json (README "GPU check").
# Needs only torch with CUDA on the machine; other dependencies come from .whl/ (scripts/prepare_gpu_wheels.sh).
gpu-check:
	scripts/gpu_check.sh
