"""Launch groups: the active block's tensors split by (param group, weight dtype).

One fused launch covers one launch group, so a block of one dtype in one param group costs one launch
per step. The tables (pointers, arena offsets, chunk map) are built once per block switch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .contract import SUPPORTED_DTYPES

#: integer dtype of each float width, to compare weights bit for bit
_BITS = {2: torch.int16, 4: torch.int32}
_GRAD_DTYPES = frozenset(SUPPORTED_DTYPES)


class MissingGradError(RuntimeError):
    """Parameters of the active block have no gradient; ``names`` lists them."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(
            f"no gradient for {len(names)} parameter(s) of the active block: {names[:5]}"
            f"{' ...' if len(names) > 5 else ''}. Call backward() before step(), and make sure "
            "these parameters take part in the loss (BlockAdam does not skip parameters silently)."
        )
        self.names = names


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass
class LaunchGroup:
    """Tensors of the active block that share a param group and a weight dtype."""

    group_index: int
    names: list[str]
    params: list[torch.nn.Parameter]
    tables: Any
    # parameter or gradient -> the tensor the kernels see (FSDP2: this rank's local shard)
    local: Callable[[torch.Tensor], torch.Tensor] = _identity
    # arena offset (elements) of each tensor's master / moments
    offsets: list[int] = field(default_factory=list)
    # (address, dtype) of each weight when the tables were built: the kernels write there
    storage: list[tuple[int, torch.dtype]] = field(init=False)
    # shape and device of each local weight: its gradient must match them
    shapes: list[torch.Size] = field(init=False)
    devices: list[torch.device] = field(init=False)
    # version counters of each weight after our last write (see record_versions)
    versions: list[Any] = field(init=False)
    sharded: bool = field(init=False)

    def __post_init__(self) -> None:
        held = [self.local(p) for p in self.params]
        self.storage = [(t.data_ptr(), p.dtype) for t, p in zip(held, self.params)]
        self.shapes = [t.shape for t in held]
        self.devices = [t.device for t in held]
        self.sharded = any(t is not p for t, p in zip(held, self.params))
        self.record_versions()

    def _current_versions(self) -> list[Any]:
        if not self.sharded:
            return [p._version for p in self.params]
        # FSDP2: an in-place write through the DTensor bumps its counter, not its local shard's
        return [(p._version, self.local(p)._version) for p in self.params]

    def record_versions(self) -> None:
        """Remember the weights' version counters. Call after each of our own writes: the Triton
        kernels write through raw pointers, which torch does not count, and the torch backend's
        writes are counted like anybody's."""
        self.versions = self._current_versions()

    def rewritten(self) -> list[int]:
        """Indices of the weights written in place since :meth:`record_versions` (e.g. by
        ``model.load_state_dict``); a loop over the version counters, no device work."""
        current = self._current_versions()
        if current == self.versions:
            return []
        return [i for i, (now, then) in enumerate(zip(current, self.versions)) if now != then]

    def resync_master(self, master: torch.Tensor, indices: Sequence[int]) -> None:
        """Re-load the fp32 master of weights ``indices`` from the weights themselves; moments are kept.

        Where a 16-bit weight still holds, bit for bit, the master rounded to nearest, the master's
        extra precision is kept (a rewrite with the same values changes nothing); everywhere else
        the master becomes the weight. ``master`` is the arena's flat master region.
        """
        for i in indices:
            weight = self.local(self.params[i]).detach().reshape(-1)
            span = master[self.offsets[i]:self.offsets[i] + weight.numel()]
            if weight.dtype == torch.float32:
                span.copy_(weight)
                continue
            bits = _BITS[weight.element_size()]
            agrees = span.to(weight.dtype).view(bits) == weight.view(bits)
            span.copy_(torch.where(agrees, span, weight.float()))
        self.record_versions()

    def check_storage(self) -> None:
        """Raise if a weight was re-allocated since the tables were built (the step would write to
        orphaned memory): e.g. ``model.to(dtype)`` or ``model.half()`` after the optimizer was made."""
        for name, param, (ptr, dtype) in zip(self.names, self.params, self.storage):
            if self.local(param).data_ptr() != ptr or param.dtype != dtype:
                raise RuntimeError(
                    f"parameter {name} was re-allocated after BlockAdam was built (its storage or dtype "
                    "changed, e.g. by model.to(...) or model.half()): move or cast the model first, then "
                    "build the optimizer"
                )

    def grads(self) -> list[torch.Tensor]:
        """The current gradients, in table order, checked against their weights (dense, contiguous,
        same shape and device, one supported dtype); a missing one is an error (MissingGradError),
        never skipped."""
        grads = [param.grad for param in self.params]
        if any(grad is None for grad in grads):
            raise MissingGradError([name for name, grad in zip(self.names, grads) if grad is None])
        if self.sharded:
            grads = [self.local(grad) for grad in grads]
        for name, grad, shape, device in zip(self.names, grads, self.shapes, self.devices):
            fine = (grad.layout is torch.strided and grad.shape == shape and grad.dtype in _GRAD_DTYPES
                    and grad.device == device and grad.is_contiguous())
            if not fine:
                _check_grad(name, grad, shape, device)
        for name, grad in zip(self.names[1:], grads[1:]):
            if grad.dtype != grads[0].dtype:
                raise TypeError(
                    f"the gradient of {name} is {grad.dtype} but that of {self.names[0]} is "
                    f"{grads[0].dtype}: the gradients of one param group's {self.params[0].dtype} "
                    "weights must share a dtype (one fused launch reads them all)"
                )
        return grads


def _check_grad(name: str, grad: torch.Tensor, shape: torch.Size, device: torch.device) -> None:
    """Raise, naming the parameter, unless the fused step can read ``grad`` for a weight of ``shape``."""
    if grad.layout != torch.strided:
        raise ValueError(f"the gradient of {name} is a {grad.layout} tensor: BlockAdam needs dense gradients")
    if grad.shape != shape:
        raise ValueError(f"the gradient of {name} has shape {tuple(grad.shape)}, the parameter {tuple(shape)}")
    if grad.device != device:
        raise ValueError(f"the gradient of {name} is on {grad.device}, the parameter on {device}")
    if grad.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the gradient of {name} has dtype {grad.dtype}; BlockAdam reads float32, float16 "
                        "and bfloat16 gradients")
    if not grad.is_contiguous():
        raise ValueError(
            f"the gradient of {name} (shape {tuple(grad.shape)}, stride {grad.stride()}) is not contiguous: "
            "the fused step reads it as one dense array; make it contiguous (p.grad = p.grad.contiguous())"
        )


def build_launch_groups(
    names: Sequence[str],
    params: Sequence[torch.nn.Parameter],
    offsets: Sequence[int],
    group_of: Callable[[torch.nn.Parameter], int],
    decays: Callable[[str, torch.nn.Parameter], bool],
    build_tables: Callable[..., Any],
    local: Callable[[torch.Tensor], torch.Tensor] = _identity,
) -> list[LaunchGroup]:
    """Split the active tensors by (param group, dtype) and build each group's tables.

    ``local`` maps a parameter (and its gradient) to the tensor the kernels work on.
    """
    buckets: dict[tuple[int, torch.dtype], list[int]] = {}
    for i, param in enumerate(params):
        buckets.setdefault((group_of(param), param.dtype), []).append(i)
    groups = []
    for (group_index, _dtype), idx in sorted(buckets.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        sel_params = [params[i] for i in idx]
        sel_names = [names[i] for i in idx]
        tables = build_tables(
            [local(p).detach() for p in sel_params],
            [offsets[i] for i in idx],
            [decays(n, p) for n, p in zip(sel_names, sel_params)],
        )
        groups.append(LaunchGroup(group_index, sel_names, sel_params, tables, local, [offsets[i] for i in idx]))
    return groups
