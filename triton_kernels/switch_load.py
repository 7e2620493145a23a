"""Block switch: master = fp32(weight), exp_avg = exp_avg_sq = 0, in one pass over the block."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_map import as_pointer, program_chunk
from .launch_config import device_guard
from .tables import TL_DTYPES, BlockTables, align_hint


@triton.jit
def _load_chunk(w_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, start, numel, BLOCK: tl.constexpr,
                MASKED: tl.constexpr):
    idx = start + tl.arange(0, BLOCK)
    mask = idx < numel if MASKED else None
    w = tl.load(w_ptr + idx, mask=mask, eviction_policy="evict_first").to(tl.float32)
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    tl.store(master_ptr + idx, w, mask=mask)
    tl.store(exp_avg_ptr + idx, zero, mask=mask)
    tl.store(exp_avg_sq_ptr + idx, zero, mask=mask)


@triton.jit
def _block_load_kernel(meta_ptr, chunk_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr,
                       W_DTYPE: tl.constexpr, W_ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    _, start, w_addr, offset, numel, _ = program_chunk(meta_ptr, chunk_ptr, BLOCK)
    w_ptr = as_pointer(w_addr, W_DTYPE, W_ALIGN)
    # Full chunks take the unmasked path: a mask against a table-loaded numel would stop vectorization.
    if start + BLOCK <= numel:
        _load_chunk(w_ptr, master_ptr + offset, exp_avg_ptr + offset, exp_avg_sq_ptr + offset, start, numel,
                    BLOCK, False)
    else:
        _load_chunk(w_ptr, master_ptr + offset, exp_avg_ptr + offset, exp_avg_sq_ptr + offset, start, numel,
                    BLOCK, True)


def block_load(tables: BlockTables, master_flat: torch.Tensor, exp_avg_flat: torch.Tensor,
               exp_avg_sq_flat: torch.Tensor) -> None:
    """One pass over the group: ``master[off + i] = float(weight[i])``; exp_avg = exp_avg_sq = 0.

    Arena elements outside the tensors' ranges (alignment padding) are not touched.
    """
    tables.check_arena(master=master_flat, exp_avg=exp_avg_flat, exp_avg_sq=exp_avg_sq_flat)
    with device_guard(tables.device):
        _block_load_kernel[(tables.num_chunks,)](
            tables.meta, tables.chunks, master_flat, exp_avg_flat, exp_avg_sq_flat,
            W_DTYPE=TL_DTYPES[tables.dtype], W_ALIGN=align_hint(tables.weights_aligned, tables.dtype), BLOCK=tables.block_size,
            num_warps=tables.num_warps,
        )
