"""Opt-in: Liger-Kernel's layer kernels (RMSNorm, SwiGLU/GeGLU, RoPE) on a Hugging Face model.

They save fewer activations than Hugging Face's eager layers (no fp32 copies inside RMSNorm, no
separate SiLU output), which shrinks every layer's recompute working set, and they are faster. Their
bf16 results differ from the eager layers' by rounding, so they are off unless asked for. Liger
patches module forwards and some module-level functions (RoPE) in place; ``remove()`` of the memory
savings does not undo them.
"""
from __future__ import annotations

import inspect

from torch import nn

from .loss import liger_available

_ON = ("rope", "rms_norm", "swiglu", "geglu")
_OFF = ("cross_entropy", "fused_linear_cross_entropy")  # the loss stays ours (badam_ext.memory.loss)


def apply_liger_layers(model: nn.Module) -> list[str]:
    """Apply Liger's layer kernels to ``model`` (the loss is left alone); returns what was switched on."""
    if not liger_available():
        raise RuntimeError("liger_layers=True needs Liger-Kernel: pip install 'badam-ext[liger]'")
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    patch = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if patch is None:
        raise ValueError(f"Liger-Kernel has no layer kernels for model type {model_type!r}; pass liger_layers=False")
    params = inspect.signature(patch).parameters
    options = {k: True for k in _ON if k in params}
    options.update({k: False for k in _OFF if k in params})
    patch(model=model, **options)
    return sorted(k for k, v in options.items() if v)
