"""The backend seam: one typed protocol, two implementations (the Triton kernels and their torch twin).

:class:`KernelBackend` is the contract (see ARCHITECTURE.md, "Kernels"); ``badam_ext.kernels`` and
``badam_ext.torch_ops`` are modules that implement it, checked at selection. :func:`grad_norm` is the
one gradient norm, written once on top of any backend's ``grad_sq_norm``.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import torch

BACKENDS = ("auto", "triton", "torch")


class LaunchTables(Protocol):
    """Per-switch description of one launch group, built by ``KernelBackend.BlockTables.build``."""

    device: torch.device
    dtype: torch.dtype
    offsets: tuple[int, ...]
    span: int

    @property
    def num_chunks(self) -> int:
        """Programs per launch: how many partial sums ``grad_sq_norm`` writes."""


@runtime_checkable
class KernelBackend(Protocol):
    """What BlockAdam needs from a backend. Arguments are checked the same way by both
    (``badam_ext.contract``); the state format follows from the regions passed (see
    ``badam_ext.kernels.fused_adamw_step``)."""

    name: str
    BlockTables: Any  # a class with ``build(weights, offsets, decay, block_size=None, min_block_size=1, states="fp32")``

    def new_step_state(self, device: torch.device | str) -> torch.Tensor: ...

    def reset_step_state(self, step_state: torch.Tensor) -> None: ...

    def advance_step(self, step_state: torch.Tensor, beta1: float, beta2: float,
                     found_inf: Optional[torch.Tensor] = None) -> None: ...

    def block_load(self, tables: Any, master_flat: Optional[torch.Tensor], exp_avg_flat: torch.Tensor,
                   exp_avg_sq_flat: torch.Tensor, *, exp_avg_scale: Optional[torch.Tensor] = None,
                   exp_avg_sq_scale: Optional[torch.Tensor] = None) -> None: ...

    def grad_sq_norm(self, tables: Any, grads: Sequence[torch.Tensor], partials: torch.Tensor) -> None: ...

    def fused_adamw_step(self, tables: Any, grads: Sequence[torch.Tensor], master_flat: Optional[torch.Tensor],
                         exp_avg_flat: torch.Tensor, exp_avg_sq_flat: torch.Tensor, step_state: torch.Tensor, *,
                         lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                         grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None,
                         stochastic_rounding: bool = False, seed: int = 0,
                         exp_avg_scale: Optional[torch.Tensor] = None,
                         exp_avg_sq_scale: Optional[torch.Tensor] = None) -> None: ...


def grad_sq_sum(backend: KernelBackend, tables_list: Sequence[LaunchTables],
                grads_list: Sequence[Sequence[torch.Tensor]], partials: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum of squares of the raw gradients of several launch groups, as a 0-dim fp32 device tensor.

    Deterministic: each group writes its partial sums (per program or per tensor) into ``partials``
    (allocated when None or too short), which are summed in one reduction. No host sync.
    """
    if len(tables_list) != len(grads_list):
        raise ValueError(f"got {len(tables_list)} tables for {len(grads_list)} gradient lists")
    if len(tables_list) == 0:
        raise ValueError("grad_norm needs at least one launch group")
    device = tables_list[0].device
    for i, t in enumerate(tables_list):
        if t.device != device:
            raise ValueError(f"tables {i} are on {t.device}, tables 0 on {device}")
    total = sum(t.num_chunks for t in tables_list)
    if partials is None or partials.numel() < total:
        partials = torch.empty(total, dtype=torch.float32, device=device)
    start = 0
    for tables, grads in zip(tables_list, grads_list):
        backend.grad_sq_norm(tables, grads, partials[start:start + tables.num_chunks])
        start += tables.num_chunks
    return partials[:total].sum()


def grad_norm(backend: KernelBackend, tables_list: Sequence[LaunchTables],
              grads_list: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """Global L2 norm of the raw gradients of several launch groups (0-dim fp32, on their device)."""
    return grad_sq_sum(backend, tables_list, grads_list).sqrt()


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _members() -> list[str]:
    return sorted(set(KernelBackend.__annotations__) | {m for m in vars(KernelBackend) if not m.startswith("_")})


def _checked(backend: Any) -> KernelBackend:
    """``backend`` if it has every member of the protocol (a TypeError naming the missing ones)."""
    missing = [m for m in _members() if not hasattr(backend, m)]
    if missing or not isinstance(backend, KernelBackend):
        raise TypeError(f"backend {getattr(backend, 'name', backend)!r} does not implement KernelBackend "
                        f"(missing: {missing})")
    return backend


def _triton_backend(device: torch.device) -> KernelBackend:
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
    return _checked(kernels)


def get_backend(name: str, device: torch.device | str) -> KernelBackend:
    """``"triton"``, ``"torch"`` or ``"auto"`` (triton on CUDA, torch otherwise) for ``device``."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(map(repr, BACKENDS))}")
    device = torch.device(device)
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from . import torch_ops

        return _checked(torch_ops)
    return _triton_backend(device)
