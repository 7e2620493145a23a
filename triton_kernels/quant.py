"""Blockwise 8-bit codes inside the kernels (the scheme and the codec of ``badam_ext.states.quant``).

Values are handled as ``[rows, QBLOCK]`` tiles, one row per quantization block, so a row's absmax is
one ``tl.max`` along the row. The kernels read one int32 codebook per map (``states.quant.codebook``):
the map's bits at ``[0, 256)`` (decoding is one gather; it stays in L1), then the encoder's directory
of binades and its buckets. Encoding makes no search: the fp32 ratio's exponent picks a binade, whose
directory entry gives its first bucket and the shift that picks the bucket from the mantissa; the
bucket's entry holds the code below it and the mantissa of the one threshold inside it, so two
gathers and one integer comparison give the torch codec's code.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..states.quant import DIRECTORY_SHIFT_BITS, MANTISSA_BITS, SMALLEST_SCALE, bucket_layout
from .launch_config import interpreted

_M_LOWEST, _M_BINADES = (tl.constexpr(v) for v in bucket_layout(True))
_V_LOWEST, _V_BINADES = (tl.constexpr(v) for v in bucket_layout(False))
_MANTISSA_BITS = tl.constexpr(MANTISSA_BITS)
_MANTISSA = tl.constexpr((1 << MANTISSA_BITS) - 1)
_DIRECTORY_SHIFT_BITS = tl.constexpr(DIRECTORY_SHIFT_BITS)
_DIRECTORY_SHIFT_MASK = tl.constexpr((1 << DIRECTORY_SHIFT_BITS) - 1)
_SMALLEST_SCALE = tl.constexpr(SMALLEST_SCALE)
#: where the directory starts in a codebook
_DIRECTORY = tl.constexpr(256)
#: GPU builds read the codebook through inline PTX (the interpreter has no PTX); see ``lookup``
_ASM_LOOKUP = tl.constexpr(not interpreted())


@triton.jit
def lookup(table_ptr, index):
    """int32 ``table[index]`` of an int32 table for a tile of indices, in the tile's own layout.

    A gather through ``tl.load`` gets a layout of one element per thread, and triton 3.6 then moves
    the whole tile into that layout through shared memory (H200: about a fifth of the 8-bit step's
    L1 work). A read-only load in inline PTX is elementwise, so the tile keeps its vector layout.
    """
    if _ASM_LOOKUP:
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
    LOWEST: tl.constexpr = _M_LOWEST if SIGNED else _V_LOWEST
    LAST: tl.constexpr = (_M_BINADES if SIGNED else _V_BINADES) - 1
    magnitude = tl.abs(x)
    absmax = tl.max(magnitude, axis=1)
    absmax = tl.where(absmax < _SMALLEST_SCALE, 0.0, absmax)  # 1 / absmax would overflow: stored as zeros
    inverse = tl.div_rn(1.0, tl.where(absmax > 0, absmax, 1.0))
    bits = (magnitude * inverse[:, None]).to(tl.int32, bitcast=True)  # ratio >= 0: bits order as values
    binade = tl.minimum(tl.maximum((bits >> _MANTISSA_BITS) - LOWEST, 0), LAST)
    directory = lookup(codebook_ptr, _DIRECTORY + binade)
    mantissa = bits & _MANTISSA
    bucket = (directory >> _DIRECTORY_SHIFT_BITS) + (mantissa >> (directory & _DIRECTORY_SHIFT_MASK))
    entry = lookup(codebook_ptr, bucket)
    count = (entry >> _MANTISSA_BITS) + (mantissa > (entry & _MANTISSA)).to(tl.int32)
    if SIGNED:
        codes = tl.where(x < 0, ZERO - count, ZERO + count)
    else:
        codes = count
    return codes.to(tl.uint8), absmax
