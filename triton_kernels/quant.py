"""Blockwise 8-bit codes inside the kernels (the scheme of ``badam_ext.states.quant``).

Values are handled as ``[rows, QBLOCK]`` tiles, one row per quantization block, so a row's absmax is
one ``tl.max`` along the row. Encoding searches the sorted 256-entry map (8 gathers from a 1 KiB
table that stays in L1) and picks the nearer neighbour, ties to the lower code, in the same fp32
operations as the torch codec: both backends produce the same codes.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dequantize_rows(codes, scales, qmap_ptr):
    """fp32 ``qmap[codes] * scale`` of a ``[rows, QBLOCK]`` tile of codes and its ``[rows]`` scales."""
    return tl.load(qmap_ptr + codes.to(tl.int32)) * scales[:, None]


@triton.jit
def encode(x, qmap_ptr):
    """Index (int32) of the map entry nearest to each ``x`` in [-1, 1]; ties to the lower index."""
    idx = tl.zeros(x.shape, dtype=tl.int32)
    for bit in tl.static_range(7, -1, -1):  # largest idx with qmap[idx] <= x
        cand = idx + (1 << bit)
        idx = tl.where(tl.load(qmap_ptr + cand) <= x, cand, idx)
    lo = tl.minimum(idx, 254)
    below = tl.load(qmap_ptr + lo)
    above = tl.load(qmap_ptr + lo + 1)
    return tl.where(above - x < x - below, lo + 1, lo)


@triton.jit
def quantize_rows(x, qmap_ptr):
    """(uint8 codes, fp32 absmax per row) of a ``[rows, QBLOCK]`` fp32 tile; masked-out elements
    must already be 0. A row of zeros gets absmax 0 and the code of zero."""
    absmax = tl.max(tl.abs(x), axis=1)
    safe = tl.where(absmax > 0, absmax, 1.0)
    normalized = tl.div_rn(x, safe[:, None])
    return encode(normalized, qmap_ptr).to(tl.uint8), absmax
