"""Blockwise 8-bit codes inside the kernels (the scheme of ``badam_ext.states.quant``).

Values are handled as ``[rows, QBLOCK]`` tiles, one row per quantization block, so a row's absmax is
one ``tl.max`` along the row. Encoding computes an approximate index from the map's structure
(decimal exponent and linear fraction, with approximate ``log2`` / ``exp2``), then picks the exact
nearest entry among the five around it (7 gathers from a 1 KiB table that stays in L1), ties to the
lower code, in the same fp32 comparisons as the torch codec: both backends produce the same codes.
"""
from __future__ import annotations

import triton
import triton.language as tl

_LOG2_10 = tl.constexpr(3.321928094887362)
_INV_LOG2_10 = tl.constexpr(1.0 / 3.321928094887362)
_INV_0_9 = tl.constexpr(1.0 / 0.9)


@triton.jit
def dequantize_rows(codes, scales, qmap_ptr):
    """fp32 ``qmap[codes] * scale`` of a ``[rows, QBLOCK]`` tile of codes and its ``[rows]`` scales."""
    return tl.load(qmap_ptr + codes.to(tl.int32)) * scales[:, None]


@triton.jit
def _guess(x, SIGNED: tl.constexpr):
    """Index of the map entry nearest to ``x``, give or take one (``badam_ext.states.quant`` maps:
    decade ``e`` holds ``n = 2**(E - 1 - e)`` values ``10**-e * (0.1 + 0.9 * k / n)``, k = 1..n, and
    the k-th value of decade e is magnitude number ``n + k - 2`` counted from the smallest)."""
    EXPONENTS: tl.constexpr = 7 if SIGNED else 8
    ZERO: tl.constexpr = 127 if SIGNED else 0
    a = tl.abs(x)
    tiny = a < 1e-12  # below half the smallest magnitude of either map: the code of zero
    a = tl.where(tiny, 1.0, a)
    # a guess: multiplications only (no division), approximate log2 / exp2 are fine
    e = tl.minimum(tl.maximum(tl.floor(-tl.log2(a) * _INV_LOG2_10), 0.0), EXPONENTS - 1.0)
    n = tl.exp2((EXPONENTS - 1.0) - e)
    k = tl.floor((a * tl.exp2(e * _LOG2_10) - 0.1) * (n * _INV_0_9) + 0.5)  # continuous across decades
    j = tl.where(tiny, -1, (n + k - 2.0).to(tl.int32))
    if SIGNED:
        return tl.where(x < 0, ZERO - (j + 1), ZERO + (j + 1))
    else:
        return ZERO + (j + 1)


@triton.jit
def encode(x, qmap_ptr, SIGNED: tl.constexpr):
    """Index (int32) of the map entry nearest to each ``x`` in [-1, 1]; ties to the lower index.

    ``lo`` = the largest index with ``qmap[lo] <= x`` (the guess is within one of the nearest entry,
    so ``lo`` lies in the five-entry window), then the nearer of ``lo`` and ``lo + 1``.
    """
    start = tl.minimum(tl.maximum(_guess(x, SIGNED) - 2, 0), 251)
    lo = start - 1
    for i in tl.static_range(5):  # one entry live at a time: the count of entries <= x
        lo += (tl.load(qmap_ptr + start + i) <= x).to(tl.int32)
    lo = tl.minimum(tl.maximum(lo, 0), 254)
    below = tl.load(qmap_ptr + lo)  # L1 hits again, cheaper than keeping five entries in registers
    above = tl.load(qmap_ptr + lo + 1)
    return tl.where(above - x < x - below, lo + 1, lo)


@triton.jit
def quantize_rows(x, qmap_ptr, SIGNED: tl.constexpr):
    """(uint8 codes, fp32 absmax per row) of a ``[rows, QBLOCK]`` fp32 tile; masked-out elements
    must already be 0. A row of zeros gets absmax 0 and the code of zero."""
    absmax = tl.max(tl.abs(x), axis=1)
    safe = tl.where(absmax > 0, absmax, 1.0)
    normalized = tl.div_rn(x, safe[:, None])
    return encode(normalized, qmap_ptr, SIGNED).to(tl.uint8), absmax
