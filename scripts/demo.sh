#!/usr/bin/env bash
# The main job on the built-in example: write the example Caffe model, inspect it, run it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=$(mktemp -d)/layerdiff-example
.venv/bin/layerdiff example "$out"
.venv/bin/layerdiff inspect "$out"
.venv/bin/layerdiff run "$out" --input ones:0.5
