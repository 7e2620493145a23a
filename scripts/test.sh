#!/usr/bin/env bash
# The test command: set up (idempotent), then the C++ tests (ctest) and the Python tests.
# Without a GPU the Triton kernels run in the Triton interpreter and GPU tests are skipped;
# on a GPU machine run `bash scripts/test.sh -m gpu` for the GPU tests alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh | tail -n 1)
# ninja and cmake helpers installed into the venv must be on PATH for the CMake build.
export PATH="$("$PY" -c "import os, sys; print(os.path.dirname(sys.executable))"):$PATH"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi

TORCH_PREFIX=$("$PY" -c "import torch; print(torch.utils.cmake_prefix_path)")
cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DPython3_EXECUTABLE="$PY" >/dev/null
cmake --build build/cmake -j2 >/dev/null
ctest --test-dir build/cmake --output-on-failure

"$PY" -m pytest -q "$@"
