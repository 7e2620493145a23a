"""FSDP2 (``torch.distributed.fsdp.fully_shard``) support: BlockAdam on each rank's local shards.

After ``fully_shard`` every parameter is a ``DTensor`` sharded along dim 0 over a 1-D device mesh, and
FSDP2 reduce-scatters the gradients itself (averaged over ranks), only for the parameters that got a
gradient: switching blocks is just flipping ``requires_grad``, with no re-wrapping. BlockAdam then
works on local shards only: the arena holds the local shard of the active block, the fused step reads
``p.grad.to_local()`` and writes ``p.to_local()`` in place (the storage FSDP2 all-gathers from).

A rank whose shard of a small parameter is empty (dim 0 smaller than the world size) has nothing to
optimise for it: such tensors are left out of that rank's arena layout and kernel tables, since the
arena and the kernels take no empty tensors. A block that is empty on a rank as a whole gets no
layout there; the rank still joins the gradient-norm all-reduce.

Gradient clipping needs the norm of the whole gradient: the local sum of squares is all-reduced over
the mesh's process group (:meth:`Sharding.all_reduce_sum`).

Usage: ``fully_shard`` each decoder layer, then the model, then build ``BlockAdam(model, ...)`` (no
``distributed`` / ``process_group``: FSDP2 does the reduction). Give the model its training dtype
(e.g. bf16 weights; the fp32 master lives in the arena) rather than an FSDP2 ``MixedPrecisionPolicy``:
FSDP2 fixes each module's gradient dtypes at its first forward from the parameters that require grad
then, so a block made trainable later gets gradients it cannot assign (a ``grad_dtype`` RuntimeError).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch built without distributed support: nothing can be a DTensor
    DTensor = None
    Shard = None

__all__ = ["Sharding", "is_sharded", "local_tensor", "sharding_of"]


def is_sharded(tensor: Any) -> bool:
    """True when ``tensor`` is a ``DTensor`` (a parameter or gradient managed by FSDP2)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (an alias of its storage, no autograd), else ``tensor`` itself."""
    if not is_sharded(tensor):
        return tensor
    with torch.no_grad():  # under no_grad to_local() returns the local tensor itself, not a new view
        return tensor.to_local()


@dataclass(frozen=True)
class Sharding:
    """The 1-D mesh the managed parameters are sharded over, and its process group."""

    mesh: Any
    group: Any

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the mesh's ranks, in place (a collective: every rank must call it)."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor


def _is_shard0(placement: Any) -> bool:
    # exact type: _StridedShard (FSDP2 + tensor parallel) also derives from Shard in some versions
    return type(placement) is Shard and placement.dim == 0


def sharding_of(named: Sequence[tuple[str, torch.Tensor]]) -> Sharding | None:
    """The sharding of the partition's parameters: None when none is a DTensor.

    Raises ``ValueError`` when only some are DTensors, or when a DTensor is not sharded along dim 0
    over one common 1-D mesh (FSDP2's default layout; HSDP and tensor parallel are not supported).
    """
    sharded = [(n, p) for n, p in named if is_sharded(p)]
    if not sharded:
        return None
    if len(sharded) != len(named):
        plain = next(n for n, p in named if not is_sharded(p))
        raise ValueError(
            f"some block parameters are FSDP2-sharded DTensors ({sharded[0][0]!r}) and some are plain "
            f"tensors ({plain!r}): apply fully_shard to every module holding block parameters (e.g. each "
            "decoder layer, then the whole model) before building BlockAdam"
        )
    mesh = sharded[0][1].device_mesh
    for name, p in sharded:
        if p.device_mesh.ndim != 1:
            raise ValueError(
                f"parameter {name!r} lives on a {p.device_mesh.ndim}-D device mesh: BlockAdam supports "
                "FSDP2 over a 1-D mesh only (no HSDP, no tensor parallel)"
            )
        if len(p.placements) != 1 or not _is_shard0(p.placements[0]):
            raise ValueError(
                f"parameter {name!r} has placements {tuple(p.placements)}: BlockAdam supports FSDP2's "
                "default Shard(0) layout only"
            )
        if p.device_mesh != mesh:
            raise ValueError(
                f"parameter {name!r} is sharded over mesh {p.device_mesh}, {sharded[0][0]!r} over {mesh}: "
                "all block parameters must share one mesh"
            )
    return Sharding(mesh, mesh.get_group())
