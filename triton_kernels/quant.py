"""Blockwise 8-bit codes inside the kernels (the scheme and the codec of ``badam_ext.states.quant``).

Values are handled as ``[rows, QBLOCK]`` tiles, one row per quantization block, so a row's absmax is
one ``tl.max`` along the row. The kernels read one 512-entry fp32 codebook per map
(``states.quant.codebook``): the map at ``[0, 256)`` (decoding is one gather; it stays in L1) and the
encoder's thresholds from 256. Encoding makes no search: an index within one of the answer, from the
map's structure (decimal exponent by comparisons, linear fraction), then the two comparisons of the
ratio with the thresholds around it, which decide the code exactly as the torch codec does.
"""
from __future__ import annotations

import triton
import triton.language as tl

_INV_0_9 = tl.constexpr(1.0 / 0.9)
#: where the thresholds start in a codebook
_THRESHOLDS = tl.constexpr(256)


@triton.jit
def dequantize_rows(codes, scales, codebook_ptr):
    """fp32 ``map[codes] * scale`` of a ``[rows, QBLOCK]`` tile of codes and its ``[rows]`` scales."""
    return tl.load(codebook_ptr + codes.to(tl.int32)) * scales[:, None]


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
def quantize_rows(x, codebook_ptr, SIGNED: tl.constexpr):
    """(uint8 codes, fp32 absmax per row) of a ``[rows, QBLOCK]`` fp32 tile; masked-out elements
    must already be 0. A row of zeros gets absmax 0 and the code of zero."""
    EXPONENTS: tl.constexpr = 7 if SIGNED else 8
    ZERO: tl.constexpr = 127 if SIGNED else 0
    magnitude = tl.abs(x)
    absmax = tl.max(magnitude, axis=1)
    inverse = tl.div_rn(1.0, tl.where(absmax > 0, absmax, 1.0))
    ratio = magnitude * inverse[:, None]
    # the answer (how many thresholds lie below the ratio) is guess, guess + 1 or guess + 2
    guess = _guess(ratio, EXPONENTS).to(tl.int32)
    below = codebook_ptr + _THRESHOLDS + guess
    count = guess + (ratio > tl.load(below)).to(tl.int32) + (ratio > tl.load(below + 1)).to(tl.int32)
    if SIGNED:
        codes = tl.where(x < 0, ZERO - count, ZERO + count)
    else:
        codes = count
    return codes.to(tl.uint8), absmax
