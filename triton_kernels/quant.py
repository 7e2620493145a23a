"""Blockwise 8-bit codes inside the kernels (the scheme and the codec of ``badam_ext.states.quant``).

Values are handled as ``[rows, QBLOCK]`` tiles, one row per quantization block, so a row's absmax is
one ``tl.max`` along the row. The kernels read one int32 codebook per map (``states.quant.codebook``):
the map's bits at ``[0, 256)`` (decoding is one gather; it stays in L1) and the encoder's buckets after
it. Encoding makes no search: the high bits of the fp32 ratio pick a bucket, whose entry holds the
code below it and the low bits of the one threshold inside it, so one gather and one integer
comparison give the torch codec's code.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..states.quant import SMALLEST_SCALE, bucket_layout
from .launch_config import GPU_BUILD

_M_SHIFT, _M_BASE, _M_BUCKETS = (tl.constexpr(v) for v in bucket_layout(True))
_V_SHIFT, _V_BASE, _V_BUCKETS = (tl.constexpr(v) for v in bucket_layout(False))
_M_LOW = tl.constexpr((1 << bucket_layout(True)[0]) - 1)
_V_LOW = tl.constexpr((1 << bucket_layout(False)[0]) - 1)
_SMALLEST_SCALE = tl.constexpr(SMALLEST_SCALE)
#: where the buckets start in a codebook
_BUCKETS = tl.constexpr(256)


@triton.jit
def lookup(table_ptr, index):
    """int32 ``table[index]`` of an int32 table for a tile of indices, in the tile's own layout.

    A gather through ``tl.load`` gets a layout of one element per thread, and triton 3.6 then moves
    the whole tile into that layout through shared memory (H200: about a fifth of the 8-bit step's
    L1 work). A read-only load in inline PTX is elementwise, so the tile keeps its vector layout.
    """
    if GPU_BUILD:
        return tl.inline_asm_elementwise(
            "ld.global.nc.b32 $0, [$1];", "=r,l", [(table_ptr + index).to(tl.int64)],
            dtype=tl.int32, is_pure=True, pack=1,
        )
    else:
        return tl.load(table_ptr + index)


@triton.jit
def dequantize_rows(codes, scales, codebook_ptr):
    """fp32 ``map[codes] * scale`` of a ``[rows, QBLOCK]`` tile of codes and its ``[rows]`` scales."""
    return lookup(codebook_ptr, codes.to(tl.int32)).to(tl.float32, bitcast=True) * scales[:, None]


@triton.jit
def quantize_rows(x, codebook_ptr, SIGNED: tl.constexpr):
    """(uint8 codes, fp32 absmax per row) of a ``[rows, QBLOCK]`` fp32 tile; masked-out elements
    must already be 0. A row of zeros, or of absmax below ``SMALLEST_SCALE``, gets absmax 0 and the
    code of zero."""
    ZERO: tl.constexpr = 127 if SIGNED else 0
    SHIFT: tl.constexpr = _M_SHIFT if SIGNED else _V_SHIFT
    BASE: tl.constexpr = _M_BASE if SIGNED else _V_BASE
    LAST: tl.constexpr = (_M_BUCKETS if SIGNED else _V_BUCKETS) - 1
    LOW: tl.constexpr = _M_LOW if SIGNED else _V_LOW
    magnitude = tl.abs(x)
    absmax = tl.max(magnitude, axis=1)
    absmax = tl.where(absmax < _SMALLEST_SCALE, 0.0, absmax)  # 1 / absmax would overflow: stored as zeros
    inverse = tl.div_rn(1.0, tl.where(absmax > 0, absmax, 1.0))
    bits = (magnitude * inverse[:, None]).to(tl.int32, bitcast=True)  # ratio >= 0: bits order as values
    bucket = tl.minimum(tl.maximum((bits >> SHIFT) - BASE, 0), LAST)
    entry = lookup(codebook_ptr, _BUCKETS + bucket)
    count = (entry >> SHIFT) + ((bits & LOW) > (entry & LOW)).to(tl.int32)
    if SIGNED:
        codes = tl.where(x < 0, ZERO - count, ZERO + count)
    else:
        codes = count
    return codes.to(tl.uint8), absmax
