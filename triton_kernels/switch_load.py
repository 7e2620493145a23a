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
from .chunk_map import as_pointer, program_chunk
from .launch_config import BLOCK_LOAD, device_guard
from .tables import TL_DTYPES, BlockTables, align_hint


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
def _block_load_kernel(meta_ptr, chunk_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, exp_avg_scale_ptr,
                       exp_avg_sq_scale_ptr, W_DTYPE: tl.constexpr, W_ALIGN: tl.constexpr, BLOCK: tl.constexpr,
                       # the state format: one specialization each
                       HAS_MASTER: tl.constexpr, QUANT: tl.constexpr, M_ZERO: tl.constexpr,
                       V_ZERO: tl.constexpr, QBLOCK: tl.constexpr):
    _, start, w_addr, offset, numel, _ = program_chunk(meta_ptr, chunk_ptr, BLOCK)
    w_ptr = as_pointer(w_addr, W_DTYPE, W_ALIGN)
    # Full chunks take the unmasked path: a mask against a table-loaded numel would stop vectorization.
    if QUANT:
        ms = exp_avg_scale_ptr + offset // QBLOCK
        vs = exp_avg_sq_scale_ptr + offset // QBLOCK
        # 4-byte code stores: the register layout of the fp32 master stream (see the step kernel)
        mc = tl.multiple_of(exp_avg_ptr + offset, 4)
        vc = tl.multiple_of(exp_avg_sq_ptr + offset, 4)
        if start + BLOCK <= numel:
            _load_chunk_8bit(w_ptr, master_ptr + offset, mc, ms, vc, vs,
                             start, numel, BLOCK, False, HAS_MASTER, M_ZERO, V_ZERO, QBLOCK)
        else:
            _load_chunk_8bit(w_ptr, master_ptr + offset, mc, ms, vc, vs,
                             start, numel, BLOCK, True, HAS_MASTER, M_ZERO, V_ZERO, QBLOCK)
    elif start + BLOCK <= numel:
        _load_chunk(w_ptr, master_ptr + offset, exp_avg_ptr + offset, exp_avg_sq_ptr + offset, start, numel,
                    BLOCK, False, HAS_MASTER)
    else:
        _load_chunk(w_ptr, master_ptr + offset, exp_avg_ptr + offset, exp_avg_sq_ptr + offset, start, numel,
                    BLOCK, True, HAS_MASTER)


def block_load(tables: BlockTables, master_flat: Optional[torch.Tensor], exp_avg_flat: torch.Tensor,
               exp_avg_sq_flat: torch.Tensor, *, exp_avg_scale: Optional[torch.Tensor] = None,
               exp_avg_sq_scale: Optional[torch.Tensor] = None) -> None:
    """One pass over the group: ``master[off + i] = float(weight[i])`` (unless ``master_flat`` is
    None); the moments zero (8-bit: zero codes and zero absmax, see :func:`fused_adamw_step`).

    Arena elements outside the tensors' ranges (alignment padding) are not touched.
    """
    quantized = check_state(tables, master_flat, exp_avg_flat, exp_avg_sq_flat, exp_avg_scale, exp_avg_sq_scale)
    if quantized:
        check_quant_block(tables)
    master = master_flat if master_flat is not None else exp_avg_flat
    with device_guard(tables.device):
        _block_load_kernel[(tables.num_chunks,)](
            tables.meta, tables.chunks, master, exp_avg_flat, exp_avg_sq_flat,
            exp_avg_scale if quantized else master, exp_avg_sq_scale if quantized else master,
            W_DTYPE=TL_DTYPES[tables.dtype], W_ALIGN=align_hint(tables.weights_aligned, tables.dtype), BLOCK=tables.block_size,
            HAS_MASTER=master_flat is not None, QUANT=quantized, M_ZERO=zero_code(True), V_ZERO=zero_code(False),
            QBLOCK=QUANT_BLOCK, num_warps=tables.warps_for(BLOCK_LOAD),
        )
