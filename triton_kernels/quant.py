"""Blockwise 8-bit codes inside the kernels (the scheme and the codec of ``badam_ext.states.quant``).

Values are handled as ``[rows, QBLOCK]`` tiles, one row per quantization block, so a row's absmax is
one ``tl.max`` along the row. The kernels read one int32 codebook per map (``states.quant.codebook``):
the map's bits at ``[0, 256)`` (decoding is one gather; it stays in L1) and the encoder's buckets after
it. Encoding makes no search: the high bits of the fp32 ratio pick a bucket, and adding the bucket's
entry to the ratio's bits and shifting gives the torch codec's code (one gather, two integer operations).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..states.quant import SMALLEST_SCALE, bucket_layout, encoder_highest_bits
from .launch_config import GPU_BUILD

_M_SHIFT, _V_SHIFT = tl.constexpr(bucket_layout(True)[0]), tl.constexpr(bucket_layout(False)[0])
_M_HIGHEST, _V_HIGHEST = tl.constexpr(encoder_highest_bits(True)), tl.constexpr(encoder_highest_bits(False))
_SMALLEST_SCALE = tl.constexpr(SMALLEST_SCALE)
#: where the buckets start in a codebook
_BUCKETS = tl.constexpr(256)


@triton.jit
def lookup(table_ptr, index, OFFSET: tl.constexpr = 0):
    """int32 ``table[index + OFFSET]`` of an int32 table for a tile of int32 indices, in the tile's own layout.

    A gather through ``tl.load`` gets a layout of one element per thread, and triton 3.6 then moves
    the whole tile into that layout through shared memory (H200: about a fifth of the 8-bit step's
    L1 work). A read-only load in inline PTX is elementwise, so the tile keeps its vector layout. Its
    address is a 32 x 32 -> 64-bit multiply-add from ``table + OFFSET`` (a scalar, computed once),
    which ptxas turns into a shift-and-add pair.
    """
    if GPU_BUILD:
        return tl.inline_asm_elementwise(
            "{ .reg .u64 addr; mad.wide.u32 addr, $1, 4, $2; ld.global.nc.b32 $0, [addr]; }",
            "=r,r,l", [index, (table_ptr + OFFSET).to(tl.int64)],
            dtype=tl.int32, is_pure=True, pack=1,
        )
    else:
        return tl.load(table_ptr + OFFSET + index)


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
    HIGHEST: tl.constexpr = _M_HIGHEST if SIGNED else _V_HIGHEST
    magnitude = tl.abs(x)
    absmax = tl.max(magnitude, axis=1)
    absmax = tl.where(absmax < _SMALLEST_SCALE, 0.0, absmax)  # 1 / absmax would overflow: stored as zeros
    inverse = tl.div_rn(1.0, tl.where(absmax > 0, absmax, 1.0))
    # ratio >= 0: its bits order as its value; as unsigned, a NaN with the sign bit set clamps to the top too
    bits = (magnitude * inverse[:, None]).to(tl.uint32, bitcast=True)
    bits = tl.minimum(bits, HIGHEST).to(tl.int32, bitcast=True)
    count = (bits + lookup(codebook_ptr, bits >> SHIFT, _BUCKETS)) >> SHIFT
    if SIGNED:
        codes = tl.where(x < 0, ZERO - count, ZERO + count)
    else:
        codes = count
    return codes.to(tl.uint8), absmax
