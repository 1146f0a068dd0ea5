#!/usr/bin/env bash
# The main job: set up .venv, then `layerdiff demo`. It builds a Caffe ResNet-50 and a
# PyTorch port of it with the classic BatchNorm conversion bug, finds the first divergence and
# its cause, and checks the fixed port. Arguments go to `layerdiff demo` (e.g. --keep DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Single-threaded BLAS/OpenMP unless told otherwise: the demo's many small per-layer ops run
# about twice as fast without thread wake-ups (measured on 2 cores).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
.venv/bin/layerdiff demo "$@"
