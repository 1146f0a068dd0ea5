#!/usr/bin/env bash
# The whole test suite, from a fresh clone: sets up .venv, lints, runs pytest.
# Any non-zero pytest exit fails, including 5 ("no tests collected").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
# Single-threaded BLAS, as the golden traces were recorded (see tests/conftest.py).
export OPENBLAS_NUM_THREADS=1
.venv/bin/python -m pytest -q "$@"
