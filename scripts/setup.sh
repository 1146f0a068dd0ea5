#!/usr/bin/env bash
# Create .venv (if missing) and install layerdiff with its dev extras into it, plus the onnx
# extra when pyproject.toml defines one. One line per step; a step that fails prints its log.
# torch==2.13.0 first: it is the CPU wheel; a looser pin could pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=$(mktemp "${TMPDIR:-/tmp}/layerdiff-setup.XXXXXX")
trap 'rm -f "$LOG"' EXIT

# run "what" CMD...: one line; the command's whole output only when it fails (then exit).
run() {
  local what=$1
  shift
  printf 'setup: %s ... ' "$what"
  if "$@" >"$LOG" 2>&1; then
    echo ok
  else
    local rc=$?
    echo "FAILED (exit $rc), its output:"
    cat "$LOG"
    exit "$rc"
  fi
}

if [ ! -x .venv/bin/python ]; then
  run "create .venv with $PY" "$PY" -m venv .venv
fi
# A newer pip is welcome, not required (an offline machine keeps the one venv brought).
if .venv/bin/python -m pip install --upgrade pip >"$LOG" 2>&1; then
  echo "setup: upgrade pip ... ok"
else
  echo "setup: upgrade pip ... failed, keeping $(.venv/bin/python -m pip --version | cut -d' ' -f1-2)"
fi
run "install torch==2.13.0 (CPU wheel)" .venv/bin/python -m pip install "torch==2.13.0"
# Which of the extras dev and onnx pyproject.toml defines (Python 3.10 has no tomllib).
EXTRAS=$(.venv/bin/python - <<'PY'
import re

try:
    import tomllib

    with open("pyproject.toml", "rb") as f:
        defined = tomllib.load(f)["project"].get("optional-dependencies", {})
except ImportError:
    text = open("pyproject.toml").read()
    section = text.split("[project.optional-dependencies]", 1)[-1].split("\n[", 1)[0]
    defined = re.findall(r"^([A-Za-z0-9_-]+)\s*=", section, re.M)
print(",".join(e for e in ("dev", "onnx") if e in defined))
PY
)
run "install layerdiff -e .[$EXTRAS]" .venv/bin/python -m pip install -e ".[$EXTRAS]"
