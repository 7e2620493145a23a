"""Blockwise 8-bit codes inside the kernels (the scheme and the codec of ``badam_ext.states.quant``).

Values are handled as ``[rows, QBLOCK]`` tiles, one row per quantization block, so a row's absmax is
one ``tl.max`` along the row. Decoding is one gather from the 1 KiB map (it stays in L1). Encoding
makes no search and no gathers: an approximate magnitude index from the map's structure (decimal
exponent and linear fraction, with approximate ``log2`` / ``exp2``, within one of the answer), then
the two exact midpoint tests of the torch codec (fp64 products that are exact), so both backends
produce the same codes.
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
def _guess(r, EXPONENTS: tl.constexpr):
    """Magnitude index (-1 for zero) nearest to the ratio ``r`` in [0, 1], give or take one: decade
    ``e`` holds ``n = 2**(E - 1 - e)`` values ``10**-e * (0.1 + 0.9 * k / n)``, k = 1..n, and the k-th
    value of decade e is magnitude number ``n + k - 2``."""
    tiny = r < 1e-12  # below half the smallest magnitude of either map: zero
    r = tl.where(tiny, 1.0, r)
    e = tl.minimum(tl.maximum(tl.floor(-tl.log2(r) * _INV_LOG2_10), 0.0), EXPONENTS - 1.0)
    n = tl.exp2((EXPONENTS - 1.0) - e)
    k = tl.floor((r * tl.exp2(e * _LOG2_10) - 0.1) * (n * _INV_0_9) + 0.5)  # continuous across decades
    j = tl.where(tiny, -1, (n + k - 2.0).to(tl.int32))
    return tl.minimum(tl.maximum(j, -1), (1 << EXPONENTS) - 2)


@triton.jit
def _above_midpoint(u, magnitude, absmax, EXPONENTS: tl.constexpr):
    """1 where ``magnitude / absmax`` lies strictly above the midpoint below magnitude ``u``: the
    midpoint is ``num / (5**(E - p) * 2**(E + 1))`` (``states.quant.midpoint_numerator`` / ``_denominator``),
    and both sides of ``magnitude * den > num * absmax`` are exact fp64 products."""
    COUNT: tl.constexpr = (1 << EXPONENTS) - 1
    uc = tl.minimum(tl.maximum(u, 0), COUNT - 1)
    p = ((uc + 1).to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127  # floor(log2(uc + 1))
    n = (p * 0 + 1) << p
    k = uc + 2 - n
    num = tl.where(uc == 0, 10, 2 * n + 18 * k - 9)
    x = EXPONENTS - p  # 5**x by its bits (x <= 8)
    five = tl.where((x & 1) != 0, 5, 1)
    five = tl.where((x & 2) != 0, five * 25, five)
    five = tl.where((x & 4) != 0, five * 625, five)
    five = tl.where((x & 8) != 0, five * 390625, five)
    den = five.to(tl.float64) * (2.0 ** (EXPONENTS + 1))
    above = (magnitude * den > num.to(tl.float64) * absmax).to(tl.int32)
    return tl.where(u < 0, 1, tl.where(u >= COUNT, 0, above))


@triton.jit
def quantize_rows(x, SIGNED: tl.constexpr):
    """(uint8 codes, fp32 absmax per row) of a ``[rows, QBLOCK]`` fp32 tile; masked-out elements
    must already be 0. A row of zeros gets absmax 0 and the code of zero."""
    EXPONENTS: tl.constexpr = 7 if SIGNED else 8
    ZERO: tl.constexpr = 127 if SIGNED else 0
    magnitude = tl.abs(x)
    absmax = tl.max(magnitude, axis=1)
    inv = tl.div_rn(1.0, tl.where(absmax > 0, absmax, 1.0))  # for the guess only (any rounding would do)
    guess = _guess(magnitude * inv[:, None], EXPONENTS)
    magnitude64 = magnitude.to(tl.float64)
    absmax64 = absmax.to(tl.float64)[:, None]
    j = (guess - 1 + _above_midpoint(guess, magnitude64, absmax64, EXPONENTS)
         + _above_midpoint(guess + 1, magnitude64, absmax64, EXPONENTS))
    if SIGNED:
        codes = tl.where(x < 0, ZERO - (j + 1), ZERO + (j + 1))
    else:
        codes = j + 1
    return codes.to(tl.uint8), absmax
