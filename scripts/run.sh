#!/usr/bin/env bash
# Set up (idempotent) and run the main job: a BlockAdam finetuning run on the embedded default,
# with the VRAM/time profiler. Arguments go to `badam-ext train` (see `badam-ext train --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh | tail -n 1)
exec "$PY" -m badam_ext.cli train "$@"
