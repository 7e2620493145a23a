#!/usr/bin/env bash
# Idempotent set-up: a venv in .venv with pinned dependencies and the C++ extension built in place.
#   BADAM_VENV=path        use another venv folder (default .venv)
#   BADAM_SYSTEM_PYTHON=1  use the current python3 as is (e.g. a GPU machine with torch already installed,
#                          no network): only the extension is built, nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${BADAM_SYSTEM_PYTHON:-0}" == "1" ]]; then
  PY=python3
else
  VENV=${BADAM_VENV:-.venv}
  if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
  fi
  PY="$VENV/bin/python"
  if ! "$PY" -c "import torch, triton, transformers, accelerate, badam, pytest" 2>/dev/null; then
    "$PY" -m pip install -q --upgrade pip
    # torch alone and first: on the CI machine 2.13.0 is a CPU wheel on local disk; a bare `torch`
    # requirement resolved together with the rest could pull a multi-GB CUDA build instead.
    "$PY" -m pip install -q "${BADAM_TORCH_SPEC:-torch==2.13.0}"
    "$PY" -m pip install -q -r requirements-ci.txt
  fi
fi
# --no-build-isolation: compile against the torch above, not a fresh one in an isolated build env.
# Rebuild when _C is missing or older than any C++ source.
if ! "$PY" -c "import torch, badam_ext._C" 2>/dev/null \
   || [[ -n "$(find csrc setup.py -newer "$(ls badam_ext/_C*.so 2>/dev/null | head -n 1)" 2>/dev/null | head -n 1)" ]]; then
  "$PY" -m pip install -q --no-build-isolation --no-deps -e .
fi
"$PY" -c "import torch, badam_ext._C, badam_ext.kernels" || { echo "badam_ext._C or badam_ext.kernels failed to import" >&2; exit 1; }
echo "$PY"
