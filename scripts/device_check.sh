#!/usr/bin/env bash
# The GPU check of issue 15 in one command (docs/gpu.md): compares the demo's ResNet-50 ports
# in float32 (TF32 on/off), float16 and bfloat16, times capture against a plain forward and
# measures peak device memory; results.json + results.md land in $OUT (else a temp dir).
#
#   bash scripts/device_check.sh                  # on the GPU machine (--device cuda)
#   bash scripts/device_check.sh --device cpu --bench-batches 1 --memory-batch 2   # rehearsal
#
# Python: $PYTHON, else .venv/bin/python, else python3 (the GPU image's, which holds torch).
# When layerdiff is not importable there, it is staged from this checkout into a temp dir
# (no network, no build): wheels in .whl/ first (e.g. a newer protobuf, see docs/gpu.md).
# DEVICE_CHECK_STAGE=1 stages it even when it imports (to rehearse the GPU image's path).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=$REPO/.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-$(mktemp -d -t device-check-XXXXXX)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export OUT PYTHONUNBUFFERED=1
# Imports are tried outside the checkout: there `import layerdiff` would find the bare source
# folder, which lacks layerdiff.adapters (setuptools maps adapters/ there at install).
CHECK="import layerdiff.adapters.torch, layerdiff.caffe.caffe_pb2"
if [ -n "${DEVICE_CHECK_STAGE:-}" ] || ! (cd /tmp && "$PY" -c "$CHECK" 2>/dev/null); then
  SITE=$(mktemp -d -t layerdiff-site-XXXXXX)
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
      .whl/*.whl
  fi
  cp -r layerdiff "$SITE/layerdiff"
  cp -r adapters "$SITE/layerdiff/adapters"  # installed as layerdiff.adapters (pyproject.toml)
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  if ! (cd /tmp && "$PY" -c "$CHECK"); then
    "$PY" -c "import google.protobuf as p; print('protobuf', p.__version__)" || true
    echo "error: layerdiff does not import with $PY (caffe_pb2 needs protobuf >= 7.35.1:" \
      "carry the wheel in .whl/, see docs/gpu.md)" >&2
    exit 2
  fi
fi
(cd /tmp && "$PY" -c "import sys, torch, numpy, layerdiff
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'available', torch.cuda.is_available(), 'numpy', numpy.__version__, 'layerdiff from',
      layerdiff.__file__)")
set -o pipefail
# 570 s: inside the device machine's 10-minute limit per command, whatever --budget-s says
# (DEVICE_CHECK_LIMIT_S overrides it for a slow rehearsal on a small CPU machine).
timeout "${DEVICE_CHECK_LIMIT_S:-570}" "$PY" benchmarks/device_check.py --out "$OUT" "$@" 2>&1 \
  | tee "$OUT/log.txt"
