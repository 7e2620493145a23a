"""Blockwise 8-bit codes inside the kernels (the scheme and the codec of ``badam_ext.states.quant``).

Values are handled as ``[rows, QBLOCK]`` tiles, one row per quantization block, so a row's absmax is
one ``tl.max`` along the row. Decoding is one gather from the 1 KiB map (it stays in L1). Encoding
makes no search and no gathers: an approximate magnitude index from the map's structure (decimal
exponent by comparisons, linear fraction; within one of the answer), then the two midpoint tests of
the torch codec, in fp32 products where those decide them for sure, else (a near-tie anywhere in
the tile) in exact fp64 for the tile: both backends produce the same codes.
"""
from __future__ import annotations

import triton
import triton.language as tl

_INV_0_9 = tl.constexpr(1.0 / 0.9)


@triton.jit
def dequantize_rows(codes, scales, qmap_ptr):
    """fp32 ``qmap[codes] * scale`` of a ``[rows, QBLOCK]`` tile of codes and its ``[rows]`` scales."""
    return tl.load(qmap_ptr + codes.to(tl.int32)) * scales[:, None]


@triton.jit
def _decades_down(r, scale, n, DECADES: tl.constexpr):
    """Where ``r * scale`` is below ``10**-DECADES``: ``DECADES`` decades further down (a binary
    search over the decades, one step; rounding of ``r * scale`` only moves the guess by one)."""
    below = r * scale < 10.0 ** -DECADES
    return tl.where(below, scale * 10.0 ** DECADES, scale), tl.where(below, n * 0.5 ** DECADES, n)


@triton.jit
def _guess(r, EXPONENTS: tl.constexpr):
    """Magnitude index (fp32) nearest to the ratio ``r`` in [0, 1], give or take one, clamped to
    ``[0, COUNT - 2]`` (the two midpoints tested are then both of the map): decade ``e`` holds
    ``n = 2**(E - 1 - e)`` values ``10**-e * (0.1 + 0.9 * k / n)``, k = 1..n, and the k-th value of
    decade e is magnitude number ``n + k - 2``. The decade is found by comparisons with powers of ten
    (no log / exp: their library versions cost more than the rest of the encoder)."""
    scale = tl.full(r.shape, 1.0, tl.float32)  # 10**e
    n = tl.full(r.shape, 2.0 ** (EXPONENTS - 1), tl.float32)
    scale, n = _decades_down(r, scale, n, 4)
    scale, n = _decades_down(r, scale, n, 2)
    scale, n = _decades_down(r, scale, n, 1)
    if EXPONENTS < 8:  # seven decades: the search's eighth is the lowest one
        scale = tl.minimum(scale, 10.0 ** (EXPONENTS - 1))
        n = tl.maximum(n, 1.0)
    k = tl.floor((r * scale - 0.1) * (n * _INV_0_9) + 0.5)  # continuous across decades
    return tl.minimum(tl.maximum(n + k - 2.0, 0.0), 2.0 ** EXPONENTS - 3.0)


@triton.jit
def _five_power(x):
    """``5**x`` (fp32, exact) for integer ``0 <= x <= 15`` by its bits."""
    five = tl.where((x & 1) != 0, 5.0, 1.0)
    five = five * tl.where((x & 2) != 0, 25.0, 1.0)
    five = five * tl.where((x & 4) != 0, 625.0, 1.0)
    return five * tl.where((x & 8) != 0, 390625.0, 1.0)


@triton.jit
def _midpoint_terms(g, EXPONENTS: tl.constexpr):
    """The midpoints below magnitudes ``g`` and ``g + 1`` (fp32 indices of the map), as exact fp32
    integers: midpoint = ``num / (five * 2**(E + 1))`` (``states.quant.midpoint_numerator`` /
    ``_denominator``, ``five = 5**(E - p)``). Both share g's decade unless g is the last of it.
    Returns (five_lo, num_lo, five_hi, num_hi)."""
    biased = (g + 1.0).to(tl.int32, bitcast=True) >> 23  # 127 + p, p = floor(log2(g + 1))
    n = (biased << 23).to(tl.float32, bitcast=True)  # 2**p
    up = g + 2.0 == 2.0 * n  # g + 1 opens the next decade
    five_hi = _five_power((EXPONENTS + 127) - biased - up.to(tl.int32))
    five_lo = tl.where(up, five_hi * 5.0, five_hi)
    num_lo = tl.where(g == 0.0, 10.0, 18.0 * g + 27.0 - 16.0 * n)  # 2n + 18k - 9 with k = g + 2 - n
    num_hi = tl.where(up, 9.0 + 4.0 * n, num_lo + 18.0)  # the next decade's k = 1, n' = 2n: 2n' + 9
    return five_lo, num_lo, five_hi, num_hi


@triton.jit
def _count_above(lhs_lo, rhs_lo, lhs_hi, rhs_hi):
    return (lhs_lo > rhs_lo).to(tl.int32) + (lhs_hi > rhs_hi).to(tl.int32)


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
    # magnitude / absmax > num / (five * 2**(E + 1))  <=>  scaled * five > num * absmax, with the
    # power of two moved to this side (exact)
    scaled = magnitude * (2.0 ** (EXPONENTS + 1))
    five_lo, num_lo, five_hi, num_hi = _midpoint_terms(guess, EXPONENTS)
    absmax2 = absmax[:, None]
    # fp32 products, each within half an ulp (2**-24) of the exact one: decided unless a near-tie,
    # or an absmax outside [1e-30, 1e30], where a product could under- or overflow
    lhs_lo, rhs_lo = scaled * five_lo, num_lo * absmax2
    lhs_hi, rhs_hi = scaled * five_hi, num_hi * absmax2
    near = (tl.abs(lhs_lo - rhs_lo) < rhs_lo * 2e-7) | (tl.abs(lhs_hi - rhs_hi) < rhs_hi * 2e-7)
    unsafe_row = ((absmax > 0) & (absmax < 1e-30)) | (absmax > 1e30)
    unsure = tl.maximum(tl.max(near.to(tl.int32), axis=1), unsafe_row.to(tl.int32))
    if tl.max(unsure, axis=0) > 0:
        # rare: the same products in fp64 for the whole tile, where they are exact
        scaled64 = magnitude.to(tl.float64) * (2.0 ** (EXPONENTS + 1))
        absmax64 = absmax2.to(tl.float64)
        above = _count_above(scaled64 * five_lo.to(tl.float64), num_lo.to(tl.float64) * absmax64,
                             scaled64 * five_hi.to(tl.float64), num_hi.to(tl.float64) * absmax64)
    else:
        above = _count_above(lhs_lo, rhs_lo, lhs_hi, rhs_hi)
    j = guess.to(tl.int32) - 1 + above
    if SIGNED:
        codes = tl.where(x < 0, ZERO - (j + 1), ZERO + (j + 1))
    else:
        codes = j + 1
    return codes.to(tl.uint8), absmax
