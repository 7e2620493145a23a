#!/usr/bin/env bash
# badam_ext's LlamaFactory integration against a real LlamaFactory 0.9.5 install, in a venv of its own.
# Kept out of CI (.ci/run): the install downloads about 1 GB and takes several minutes.
#
#   bash scripts/test_llamafactory.sh            # set up the venv (once), then the tests
#   bash scripts/test_llamafactory.sh -k resume  # extra arguments go to pytest
#
#   BADAM_LF_VENV=path   venv folder (default build/llamafactory-venv)
#
# The tests (tests/test_integrations_llamafactory.py, marker `llamafactory`) build a tiny Llama and
# its tokenizer on disk, write a local dataset_info.json with a tiny JSON dataset, and run
# `llamafactory-cli train cfg.yaml` (the reference BAdam) and `badam-ext-llamafactory train cfg.yaml`
# (BlockAdam) end to end on CPU. They then run the Hugging Face-facing tests under the transformers
# that LlamaFactory pins.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$(realpath -m "${BADAM_LF_VENV:-build/llamafactory-venv}")
PY="$VENV/bin/python"

if [[ ! -x "$PY" ]]; then
  python3 -m venv "$VENV"
fi
if ! "$PY" -c "import llamafactory, torch, triton, pytest, badam" 2>/dev/null; then
  "$PY" -m pip install -q --upgrade pip
  # torch alone and first, and held there by a constraint: LlamaFactory's plain torch / torchvision /
  # torchaudio requirements would otherwise pull the newest, multi-GB CUDA torch.
  "$PY" -m pip install -q torch==2.13.0
  printf 'torch==2.13.0\n' > "$VENV/constraints.txt"
  "$PY" -m pip install -q -c "$VENV/constraints.txt" \
    llamafactory==0.9.5 badam==1.4 \
    triton==3.9.0 numpy==2.4.6 pytest==9.2.0 nvidia-ml-py==13.615.71 pybind11==3.1.0 ninja==1.13.2 \
    setuptools==84.2.1 wheel==0.48.0 rich==15.0.0 tqdm==4.70.1 psutil==7.2.2
  # The PyPI torchvision / torchaudio wheels are CUDA builds (their extensions need libc10_cuda.so).
  # torchvision breaks `import transformers` next to a CPU torch and LlamaFactory's text training never
  # imports it: removed. LlamaFactory imports torchaudio at module level (audio data only): its
  # extension libraries are removed, so it imports as torchaudio does when it finds none.
  "$PY" -m pip uninstall -q -y torchvision
  rm -f "$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"/torchaudio/lib/*.so
fi

# This package, editable, from a private copy of the working tree inside the venv: building the C++
# extension in place there never touches the checkout's own badam_ext/_C (which .venv uses). tar
# keeps the files' times, so _C is rebuilt only when its sources are newer than it.
SRC="$VENV/src"
mkdir -p "$SRC/badam_ext"
find "$SRC" -mindepth 1 -maxdepth 1 ! -name build ! -name badam_ext -exec rm -rf {} +
find "$SRC/badam_ext" -mindepth 1 ! -name '_C*.so' -delete
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -C "$SRC" -xf -
SO=$(ls "$SRC"/badam_ext/_C*.so 2>/dev/null | head -n 1 || true)
installed_here() {  # badam_ext, its kernels and _C import from $SRC (checked outside any source tree)
  (cd / && "$PY" -c "import os, sys, badam_ext.kernels, badam_ext._C as c
sys.exit(0 if os.path.realpath(c.__file__).startswith(os.path.realpath(sys.argv[1])) else 1)" "$SRC") 2>/dev/null
}
if [[ -z "$SO" ]] || [[ -n "$(cd "$SRC" && find csrc setup.py -newer "$SO" | head -n 1)" ]] || ! installed_here; then
  (cd "$SRC" && "$PY" -m pip install -q --no-build-isolation --no-deps -e .)
fi
installed_here || { echo "badam_ext did not install into $VENV from $SRC" >&2; exit 1; }
"$PY" -c "import llamafactory, transformers, torch; print('llamafactory', llamafactory.__version__, \
'transformers', transformers.__version__, 'torch', torch.__version__)"

export PATH="$VENV/bin:$PATH"   # llamafactory-cli of this venv
cd "$SRC"
"$PY" -m pytest -q -p no:cacheprovider -m llamafactory tests/test_integrations_llamafactory.py "$@"
# The Hugging Face-facing tests under LlamaFactory's transformers (5.6.0 for LlamaFactory 0.9.5) and TRL
# (0.24). Deselected: one test expects GPT-NeoX's head to be named lm_head, which transformers 5.6
# still calls embed_out (the partition finds it under either name).
"$PY" -m pytest -q -p no:cacheprovider tests/test_hf_trainer.py tests/test_pruning.py tests/test_partition.py \
  tests/test_compile.py tests/test_integrations.py tests/test_train_data.py tests/test_behaviour.py \
  tests/test_reference_parity.py --deselect tests/test_partition.py::test_lm_head_block_last_untied
echo "LlamaFactory tests passed (source copy: $SRC, from $ROOT)"
