"""Gradient norm of a block: per-chunk sums of squares (deterministic, no atomics); the norm over
launch groups is ``badam_ext.ops.grad_norm``, written once for both backends."""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .chunk_map import as_pointer, chunk_at
from ..contract import check_partials
from .launch_config import GRAD_SQ_NORM, device_guard
from .tables import TL_DTYPES, BlockTables, align_hint


#: elements each norm program reads: the step's chunks are small (512 on an H200), and a reduction
#: over so few elements per program ran at 39% of copy bandwidth there, against 93% at 2048
NORM_ELEMENTS_PER_PROGRAM = 2048


def chunks_per_program(block_size: int) -> int:
    """Consecutive chunks of the tables that one norm program sums into one partial."""
    return max(1, NORM_ELEMENTS_PER_PROGRAM // block_size)


def num_partials(tables: BlockTables) -> int:
    """Partial sums :func:`grad_sq_norm` writes (one per program)."""
    return triton.cdiv(tables.num_chunks, chunks_per_program(tables.block_size))


@triton.jit
def _grad_sq_norm_kernel(meta_ptr, chunk_ptr, grad_table_ptr, partials_ptr, num_chunks,
                         G_DTYPE: tl.constexpr, G_ALIGN: tl.constexpr, BLOCK: tl.constexpr,
                         CHUNKS: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    first = tl.program_id(0).to(tl.int64) * CHUNKS
    for i in tl.static_range(CHUNKS):
        if first + i < num_chunks:
            tid, start, _, _, numel, _ = chunk_at(meta_ptr, chunk_ptr, first + i, BLOCK)
            g_ptr = as_pointer(tl.load(grad_table_ptr + tid), G_DTYPE, G_ALIGN)
            idx = start + tl.arange(0, BLOCK)
            if start + BLOCK <= numel:
                g = tl.load(g_ptr + idx, eviction_policy="evict_first").to(tl.float32)
            else:
                g = tl.load(g_ptr + idx, mask=idx < numel, other=0.0).to(tl.float32)
            acc += g * g
    tl.store(partials_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def grad_sq_norm(tables: BlockTables, grads: Sequence[torch.Tensor], partials: torch.Tensor) -> None:
    """Write sums of squares of the raw gradient elements (fp32) into ``partials``: one per program,
    each over :func:`chunks_per_program` consecutive chunks of the tables (:func:`num_partials` in all).

    ``partials`` needs at least ``tables.num_chunks`` fp32 elements; elements past the partials
    written are set to zero, so ``partials.sum()`` is the group's squared norm. No grad scale is
    applied: this is the norm of the gradients as stored.
    """
    table, g_dtype, g_aligned = tables.gather_grads(grads)
    check_partials(partials, tables.device, tables.num_chunks)
    programs = num_partials(tables)
    with device_guard(tables.device):
        _grad_sq_norm_kernel[(programs,)](
            tables.meta, tables.chunks, table, partials, tables.num_chunks,
            G_DTYPE=TL_DTYPES[g_dtype], G_ALIGN=align_hint(g_aligned, g_dtype, vector_elems=8),
            BLOCK=tables.block_size, CHUNKS=chunks_per_program(tables.block_size),
            num_warps=tables.warps_for(GRAD_SQ_NORM),
        )
    if partials.numel() > programs:
        partials[programs:].zero_()

