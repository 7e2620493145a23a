"""Block switch: fill the state of the new block in one pass, for every state format.

master = fp32(weight) (when the format has a master); the moments are zero: fp32 zeros, or, for
8-bit moments, the code of zero and an absmax of zero for every quantization block.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..contract import check_state
from ..states.quant import QUANT_BLOCK, zero_code
from .adamw import check_quant_block
from .chunk_map import as_pointer, chunk_at
from .launch_config import BLOCK_LOAD, device_guard
from .tables import TL_DTYPES, BlockTables, align_hint
from .tuning_cache import VALID_WARPS

#: elements each block-load program fills at least, per format (H200, bench_states --load-chunks):
#: fp32 over 512-element chunks 93.2% of copy bandwidth at one chunk a program, 91.8-91.1% at 2-8;
#: 8-bit over its one-warp 256-element chunks 66.3% at one, 87.5% at 2, 89.9% at 4, 91.2% at 8
#: (without a master 20.1% at one, 84.6% at 8): such a program spends longer finding its chunk
#: than moving it
LOAD_ELEMENTS_FP32, LOAD_ELEMENTS_8BIT = 512, 2048


@triton.jit
def _load_chunk(w_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, start, numel, BLOCK: tl.constexpr,
                MASKED: tl.constexpr, HAS_MASTER: tl.constexpr):
    idx = start + tl.arange(0, BLOCK)
    mask = idx < numel if MASKED else None
    if HAS_MASTER:
        w = tl.load(w_ptr + idx, mask=mask, eviction_policy="evict_first").to(tl.float32)
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_MASTER:
        tl.store(master_ptr + idx, w, mask=mask)
    tl.store(exp_avg_ptr + idx, zero, mask=mask)
    tl.store(exp_avg_sq_ptr + idx, zero, mask=mask)


@triton.jit
def _load_chunk_8bit(w_ptr, master_ptr, m_codes_ptr, m_scale_ptr, v_codes_ptr, v_scale_ptr, start, numel,
                     BLOCK: tl.constexpr, MASKED: tl.constexpr, HAS_MASTER: tl.constexpr,
                     M_ZERO: tl.constexpr, V_ZERO: tl.constexpr, QBLOCK: tl.constexpr):
    idx = start + tl.arange(0, BLOCK)
    rows = tl.arange(0, BLOCK // QBLOCK)
    qrow = start // QBLOCK + rows
    mask = idx < numel if MASKED else None
    row_mask = start + rows * QBLOCK < numel if MASKED else None
    if HAS_MASTER:
        w = tl.load(w_ptr + idx, mask=mask, eviction_policy="evict_first").to(tl.float32)
        tl.store(master_ptr + idx, w, mask=mask)
    tl.store(m_codes_ptr + idx, tl.full([BLOCK], M_ZERO, tl.uint8), mask=mask)
    tl.store(v_codes_ptr + idx, tl.full([BLOCK], V_ZERO, tl.uint8), mask=mask)
    zero = tl.zeros([BLOCK // QBLOCK], dtype=tl.float32)
    tl.store(m_scale_ptr + qrow, zero, mask=row_mask)
    tl.store(v_scale_ptr + qrow, zero, mask=row_mask)


@triton.jit
def _load_span(meta_ptr, chunk_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, exp_avg_scale_ptr,
               exp_avg_sq_scale_ptr, chunk, W_DTYPE: tl.constexpr, W_ALIGN: tl.constexpr,
               BLOCK: tl.constexpr, SPAN: tl.constexpr, HAS_MASTER: tl.constexpr, QUANT: tl.constexpr,
               M_ZERO: tl.constexpr, V_ZERO: tl.constexpr, QBLOCK: tl.constexpr):
    """Fill SPAN elements of one tensor from the first element of chunk ``chunk`` (int64)."""
    _, start, w_addr, offset, numel, _ = chunk_at(meta_ptr, chunk_ptr, chunk, BLOCK)
    w_ptr = as_pointer(w_addr, W_DTYPE, W_ALIGN)
    # Full spans take the unmasked path: a mask against a table-loaded numel would stop vectorization.
    if QUANT:
        ms = exp_avg_scale_ptr + offset // QBLOCK
        vs = exp_avg_sq_scale_ptr + offset // QBLOCK
        # 4-byte code stores: the register layout of the fp32 master stream (see the step kernel)
        mc = tl.multiple_of(exp_avg_ptr + offset, 4)
        vc = tl.multiple_of(exp_avg_sq_ptr + offset, 4)
        if start + SPAN <= numel:
            _load_chunk_8bit(w_ptr, master_ptr + offset, mc, ms, vc, vs,
                             start, numel, SPAN, False, HAS_MASTER, M_ZERO, V_ZERO, QBLOCK)
        else:
            _load_chunk_8bit(w_ptr, master_ptr + offset, mc, ms, vc, vs,
                             start, numel, SPAN, True, HAS_MASTER, M_ZERO, V_ZERO, QBLOCK)
    elif start + SPAN <= numel:
        _load_chunk(w_ptr, master_ptr + offset, exp_avg_ptr + offset, exp_avg_sq_ptr + offset, start, numel,
                    SPAN, False, HAS_MASTER)
    else:
        _load_chunk(w_ptr, master_ptr + offset, exp_avg_ptr + offset, exp_avg_sq_ptr + offset, start, numel,
                    SPAN, True, HAS_MASTER)


@triton.jit
def _block_load_kernel(meta_ptr, chunk_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, exp_avg_scale_ptr,
                       exp_avg_sq_scale_ptr, num_chunks, W_DTYPE: tl.constexpr, W_ALIGN: tl.constexpr,
                       BLOCK: tl.constexpr, CHUNKS: tl.constexpr,
                       # the state format: one specialization each
                       HAS_MASTER: tl.constexpr, QUANT: tl.constexpr, M_ZERO: tl.constexpr,
                       V_ZERO: tl.constexpr, QBLOCK: tl.constexpr):
    # A program fills CHUNKS consecutive chunks: as one tile when they lie in one tensor (the common
    # case: one table lookup, every access in flight at once), else chunk by chunk.
    first = tl.program_id(0).to(tl.int64) * CHUNKS
    last = tl.minimum(first + CHUNKS, num_chunks) - 1
    if CHUNKS == 1:
        one_tensor = True
    else:
        one_tensor = (last == first + CHUNKS - 1) & (tl.load(chunk_ptr + 2 * first) == tl.load(chunk_ptr + 2 * last))
    if one_tensor:
        _load_span(meta_ptr, chunk_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, exp_avg_scale_ptr,
                   exp_avg_sq_scale_ptr, first, W_DTYPE, W_ALIGN, BLOCK, BLOCK * CHUNKS, HAS_MASTER, QUANT,
                   M_ZERO, V_ZERO, QBLOCK)
    else:
        for i in tl.static_range(CHUNKS):
            if first + i < num_chunks:
                _load_span(meta_ptr, chunk_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, exp_avg_scale_ptr,
                           exp_avg_sq_scale_ptr, first + i, W_DTYPE, W_ALIGN, BLOCK, BLOCK, HAS_MASTER, QUANT,
                           M_ZERO, V_ZERO, QBLOCK)


def chunks_per_program(block_size: int, quantized: bool = False) -> int:
    """Consecutive chunks of the tables one block-load program fills (at least one), for fp32 or
    8-bit (``quantized``) moments."""
    return max(1, (LOAD_ELEMENTS_8BIT if quantized else LOAD_ELEMENTS_FP32) // block_size)


def block_load(tables: BlockTables, master_flat: Optional[torch.Tensor], exp_avg_flat: torch.Tensor,
               exp_avg_sq_flat: torch.Tensor, *, exp_avg_scale: Optional[torch.Tensor] = None,
               exp_avg_sq_scale: Optional[torch.Tensor] = None, chunks: Optional[int] = None,
               num_warps: Optional[int] = None) -> None:
    """One pass over the group: ``master[off + i] = float(weight[i])`` (unless ``master_flat`` is
    None); the moments zero (8-bit: zero codes and zero absmax, see :func:`fused_adamw_step`).

    Arena elements outside the tensors' ranges (alignment padding) are not touched. Each program
    fills ``chunks`` consecutive chunks of the tables (default :func:`chunks_per_program`) with
    ``num_warps`` warps (default the tables' choice for the block load).
    """
    quantized = check_state(tables, master_flat, exp_avg_flat, exp_avg_sq_flat, exp_avg_scale, exp_avg_sq_scale)
    if quantized:
        check_quant_block(tables)
    if chunks is None:
        chunks = chunks_per_program(tables.block_size, quantized)
    elif isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1 or chunks & (chunks - 1):
        raise ValueError(f"chunks per block-load program must be a power of two >= 1, got {chunks!r}")
    if num_warps is None:
        num_warps = tables.warps_for(BLOCK_LOAD)
    elif isinstance(num_warps, bool) or not isinstance(num_warps, int) or num_warps not in VALID_WARPS:
        raise ValueError(f"warps per block-load program must be one of {VALID_WARPS}, got {num_warps!r}")
    master = master_flat if master_flat is not None else exp_avg_flat
    with device_guard(tables.device):
        _block_load_kernel[(triton.cdiv(tables.num_chunks, chunks),)](
            tables.meta, tables.chunks, master, exp_avg_flat, exp_avg_sq_flat,
            exp_avg_scale if quantized else master, exp_avg_sq_scale if quantized else master, tables.num_chunks,
            W_DTYPE=TL_DTYPES[tables.dtype], W_ALIGN=align_hint(tables.weights_aligned, tables.dtype), BLOCK=tables.block_size,
            CHUNKS=chunks,
            HAS_MASTER=master_flat is not None, QUANT=quantized, M_ZERO=zero_code(True), V_ZERO=zero_code(False),
            QBLOCK=QUANT_BLOCK, num_warps=num_warps,
        )
