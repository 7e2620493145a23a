"""Backend selection: the Triton kernels or their plain-torch twin, behind one interface."""
from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import torch

BACKENDS = ("auto", "triton", "torch")

_ENTRY_POINTS = (
    "BlockTables",
    "new_step_state",
    "reset_step_state",
    "advance_step",
    "block_load",
    "grad_sq_norm",
    "grad_norm",
    "fused_adamw_step",
)


@dataclass(frozen=True)
class Backend:
    """The kernel contract's entry points of one backend (see ARCHITECTURE.md, "Kernels")."""

    name: str
    BlockTables: Any
    new_step_state: Callable[..., torch.Tensor]
    reset_step_state: Callable[..., None]
    advance_step: Callable[..., None]
    block_load: Callable[..., None]
    grad_sq_norm: Callable[..., None]
    grad_norm: Callable[..., torch.Tensor]
    fused_adamw_step: Callable[..., None]

    @classmethod
    def from_module(cls, name: str, module: ModuleType) -> "Backend":
        return cls(name, **{attr: getattr(module, attr) for attr in _ENTRY_POINTS})


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _triton_backend(device: torch.device) -> Backend:
    if device.type == "cpu" and not _interpret_requested():
        raise RuntimeError(
            "the triton backend on CPU runs in Triton's interpreter: set TRITON_INTERPRET=1 in the "
            "environment before triton is first imported (e.g. `TRITON_INTERPRET=1 python train.py`), "
            "or use backend='torch' (or 'auto') for CPU tensors"
        )
    if device.type not in ("cuda", "cpu"):
        raise RuntimeError(f"the triton backend supports CUDA devices (and CPU in the interpreter), not {device}")
    from . import kernels

    interpreted = kernels.interpreted()
    if device.type == "cpu" and not interpreted:
        raise RuntimeError(
            "TRITON_INTERPRET=1 is set but the kernels were compiled for the GPU: triton was imported "
            "before the variable was set. Set it before anything imports triton."
        )
    if device.type == "cuda" and interpreted:
        raise RuntimeError(
            "TRITON_INTERPRET=1 runs the kernels on the host and cannot use CUDA tensors: unset it "
            "for CUDA, or use backend='torch'"
        )
    return Backend.from_module("triton", kernels)


def get_backend(name: str, device: torch.device | str) -> Backend:
    """``"triton"``, ``"torch"`` or ``"auto"`` (triton on CUDA, torch otherwise) for ``device``."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(map(repr, BACKENDS))}")
    device = torch.device(device)
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from . import torch_ops

        return Backend.from_module("torch", torch_ops)
    return _triton_backend(device)
