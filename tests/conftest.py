"""Test session setup.

Without an NVIDIA GPU the Triton kernels run in Triton's interpreter, which must be chosen before
triton is first imported: decided here from the system alone, without importing torch or triton.
"""
from __future__ import annotations

import os
import shutil


def _nvidia_gpu_present() -> bool:
    return os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None


if not _nvidia_gpu_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")
