#!/usr/bin/env bash
# The main job: set up .venv, then `layerdiff demo`. It builds a Caffe ResNet-50 and a
# PyTorch port of it with the classic BatchNorm conversion bug, finds the first divergence and
# its cause, and checks the fixed port. Arguments go to `layerdiff demo` (e.g. --keep DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/layerdiff demo "$@"
