"""Fused Triton kernels for the active block (imported as ``badam_ext.kernels``).

One launch per launch group (the tensors of one param group with one weight dtype):

- :class:`BlockTables` -- per-switch pointer / offset / chunk tables (``BlockTables.build``)
- :func:`block_load` -- master = fp32(weight), moments zero (every state format)
- :func:`new_step_state`, :func:`reset_step_state`, :func:`advance_step` -- the fp64 ``[t, b1^t, b2^t]``
- :func:`grad_sq_norm` -- per-chunk sums of squares of the gradients (the norm: ``badam_ext.ops.grad_norm``)
- :func:`fused_adamw_step` -- the AdamW step, writing master, m, v (fp32 or 8-bit) and the low-precision weight

On CPU tensors the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` before triton is
imported); otherwise they need CUDA tensors.

Names are resolved lazily; the backend-independent contract (plain torch) is ``badam_ext.contract``.
"""
from __future__ import annotations

import importlib
from typing import Any

name = "triton"

_EXPORTS = {
    "BlockTables": ".tables",
    "advance_step": ".step_state",
    "block_load": ".switch_load",
    "fused_adamw_step": ".adamw",
    "grad_sq_norm": ".norm",
    "interpreted": ".launch_config",
    "new_step_state": "..contract",
    "reset_step_state": "..contract",
}

__all__ = sorted([*_EXPORTS, "name"])


def __getattr__(attr: str) -> Any:
    if attr in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[attr], __name__), attr)
        globals()[attr] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
