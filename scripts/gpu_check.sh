#!/usr/bin/env bash
# `make gpu-check`: the one-GPU check (python -m lavis.bench --suite gpu) from a fresh checkout on a machine with
# torch + CUDA. Wheels in .whl/ (scripts/prepare_gpu_wheels.sh) are installed into a private directory first, so
# the machine's own Python environment is left as it is. Extra arguments go to the suite (e.g. --out FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SITE=${LAVIS_GPU_SITE:-/tmp/lavis-gpu-site}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Some images set TORCH_CUDA_ARCH_LIST=9.0a, which DeepSpeed's op builder cannot parse; give it the plain number.
if [[ "${TORCH_CUDA_ARCH_LIST:-}" == *a ]]; then export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST%a}"; fi
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$PY" -m lavis.bench --suite gpu --output-dir "${OUT_DIR:-output/gpu_check}" "$@"
