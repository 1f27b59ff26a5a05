#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the pure-Python / manylinux wheels `make gpu-check` installs on a GPU machine that
# has torch (with CUDA), transformers, timm and numpy but not our other dependencies. Run it here, with network
# access to PyPI, then copy the checkout (with .whl/) to the GPU machine. PY_VERSION: that machine's Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python
PY_VERSION=${PY_VERSION:-3.12}
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for p in hjson pydantic pydantic-core annotated-types typing-inspection omegaconf antlr4-python3-runtime tiktoken \
         py-cpuinfo; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
      "${plat[@]}" -d .whl "$p"
done
# DeepSpeed ships as source only; its wheel is pure Python (ops build on first use) and needs torch to build.
ls .whl/deepspeed-*.whl >/dev/null 2>&1 || "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==0.19.8"
ls -la .whl
