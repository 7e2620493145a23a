"""Gradient norm of a block: per-chunk sums of squares (deterministic, no atomics); the norm over
launch groups is ``badam_ext.ops.grad_norm``, written once for both backends."""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .chunk_map import as_pointer, program_chunk
from ..contract import check_partials
from .launch_config import GRAD_SQ_NORM, device_guard
from .tables import TL_DTYPES, BlockTables, align_hint


@triton.jit
def _grad_sq_norm_kernel(meta_ptr, chunk_ptr, grad_table_ptr, partials_ptr,
                         G_DTYPE: tl.constexpr, G_ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    tid, start, _, _, numel, _ = program_chunk(meta_ptr, chunk_ptr, BLOCK)
    g_ptr = as_pointer(tl.load(grad_table_ptr + tid), G_DTYPE, G_ALIGN)
    idx = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        g = tl.load(g_ptr + idx, eviction_policy="evict_first").to(tl.float32)
    else:
        g = tl.load(g_ptr + idx, mask=idx < numel, other=0.0).to(tl.float32)
    tl.store(partials_ptr + tl.program_id(0), tl.sum(g * g, axis=0))


def grad_sq_norm(tables: BlockTables, grads: Sequence[torch.Tensor], partials: torch.Tensor) -> None:
    """Write the sum of squares of each chunk's raw gradient elements (fp32) into ``partials``.

    ``partials`` needs at least ``tables.num_chunks`` fp32 elements; elements past that are set to
    zero, so ``partials.sum()`` is the group's squared norm. No grad scale is applied: this is the
    norm of the gradients as stored.
    """
    table, g_dtype, g_aligned = tables.gather_grads(grads)
    check_partials(partials, tables.device, tables.num_chunks)
    with device_guard(tables.device):
        _grad_sq_norm_kernel[(tables.num_chunks,)](
            tables.meta, tables.chunks, table, partials,
            G_DTYPE=TL_DTYPES[g_dtype], G_ALIGN=align_hint(g_aligned, g_dtype, vector_elems=8), BLOCK=tables.block_size, num_warps=tables.warps_for(GRAD_SQ_NORM),
        )
    if partials.numel() > tables.num_chunks:
        partials[tables.num_chunks:].zero_()

