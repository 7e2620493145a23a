"""Blockwise 8-bit quantization of the Adam moments: dynamic maps and the torch codec.

The scheme is the one of bitsandbytes ``Adam8bit`` (Dettmers et al., "8-bit Optimizers via
Block-wise Quantization", arXiv 2110.02861) and torchao ``AdamW8bit``: each block of
``QUANT_BLOCK`` = 256 consecutive elements is divided by its absolute maximum (kept in fp32), and the
normalized value in [-1, 1] is stored as the index of the nearest entry of a 256-entry *dynamic* map,
whose entries are dense near zero and sparse near one (a decimal exponent and a linear fraction):

- ``exp_avg`` (signed): 0, and for each sign, exponents ``e = 0..6`` with ``2**(6 - e)`` linear
  steps each, ``10**-e * (0.1 + 0.9 * k / 2**(6 - e))`` for ``k = 1..2**(6 - e)``: 127 magnitudes
  from 1e-6 to 1. The 256th code repeats 1.0 (the map is sorted; the codec never needs it).
- ``exp_avg_sq`` (unsigned, v >= 0): 0 and exponents ``e = 0..7`` with ``2**(7 - e)`` steps each:
  255 magnitudes from 1e-7 to 1.

The maps are built here from that description, not taken from either library: magnitude ``j`` (in
decade ``p = E - 1 - e``, ``n = 2**p`` steps) is the exact fraction ``(n + 9 k) / (10**(E - p) n)``,
stored as its nearest fp32.

Encoding follows bitsandbytes' normalization: the fp32 ratio ``r = |x| * (1 / absmax)`` (two IEEE
fp32 operations, in this order), then the code of the map entry nearest to ``r``, ties towards
zero. Nearness is decided against the exact midpoints between the map's fractions
(``midpoint_numerator / midpoint_denominator``): ``r`` lies above the midpoint below magnitude ``j``
exactly when ``r > thresholds[j]``, the largest fp32 not above that midpoint. The magnitude code is
then the number of thresholds below ``r``: a search here; in the kernels one gather from a bucket
table built from the same thresholds (``bucket_layout``), one addition and one shift, so both
backends give the same codes.
"""
from __future__ import annotations

import functools
from fractions import Fraction

import torch

from .spec import QUANT_BLOCK

__all__ = ["QUANT_BLOCK", "bucket_layout", "codebook", "dequantize", "quantize", "signed_map", "thresholds", "unsigned_map",
           "zero_code", "encoder_highest_bits", "magnitude_count", "midpoint_numerator", "midpoint_denominator"]

SIGNED_EXPONENTS = 7
UNSIGNED_EXPONENTS = 8
#: blocks whose absmax is below the smallest normal fp32 (1 / absmax overflows) are stored as zeros
SMALLEST_SCALE = 2.0 ** -126


def _exponents(signed: bool) -> int:
    return SIGNED_EXPONENTS if signed else UNSIGNED_EXPONENTS


def magnitude_count(signed: bool) -> int:
    """Nonzero magnitudes of a map: 127 (signed) or 255 (unsigned)."""
    return 2 ** _exponents(signed) - 1


def _decade(j: int) -> tuple[int, int, int]:
    """(p, n, k) of magnitude ``j``: decade p holds n = 2**p steps, and j is its k-th (1-based)."""
    p = (j + 1).bit_length() - 1
    n = 1 << p
    return p, n, j + 2 - n


def _magnitude(j: int, exponents: int) -> Fraction:
    p, n, k = _decade(j)
    return Fraction(n + 9 * k, 10 ** (exponents - p) * n)


def midpoint_numerator(j: int) -> int:
    """Numerator of the midpoint between magnitude ``j`` and the one below it (zero below j = 0)."""
    p, n, k = _decade(j)
    return 10 if j == 0 else 2 * n + 18 * k - 9


def midpoint_denominator(j: int, exponents: int) -> int:
    """Its denominator, ``2 * 10**(E - p) * n`` = ``5**(E - p) * 2**(E + 1)`` (a 19-bit odd part)."""
    p, _, _ = _decade(j)
    return 5 ** (exponents - p) * 2 ** (exponents + 1)


@functools.lru_cache(maxsize=None)
def _maps_cpu() -> tuple[torch.Tensor, torch.Tensor]:
    def mags(signed: bool) -> list[float]:
        return [float(_magnitude(j, _exponents(signed))) for j in range(magnitude_count(signed))]

    pos = mags(True)
    signed = sorted([-x for x in pos] + [0.0] + pos + [1.0])
    unsigned = [0.0] + mags(False)
    out = (torch.tensor(signed, dtype=torch.float32), torch.tensor(unsigned, dtype=torch.float32))
    for m in out:
        assert m.numel() == 256 and bool((m[1:] >= m[:-1]).all())
    return out


def _largest_float32_at_most(value: Fraction) -> float:
    """The largest fp32 number that is not above ``value`` (a positive fraction)."""
    down = torch.tensor(0.0, dtype=torch.float32)
    up = torch.tensor(float("inf"), dtype=torch.float32)
    candidate = torch.tensor(float(value), dtype=torch.float32)
    while Fraction(candidate.item()) > value:
        candidate = torch.nextafter(candidate, down)
    while Fraction(torch.nextafter(candidate, up).item()) <= value:
        candidate = torch.nextafter(candidate, up)
    return candidate.item()


@functools.lru_cache(maxsize=None)
def _thresholds_cpu(signed: bool) -> torch.Tensor:
    exponents = _exponents(signed)
    values = [_largest_float32_at_most(Fraction(midpoint_numerator(j), midpoint_denominator(j, exponents)))
              for j in range(magnitude_count(signed))]
    out = torch.tensor(values, dtype=torch.float32)
    assert bool((out[1:] > out[:-1]).all())
    return out


_DEVICE_TABLES: dict[tuple[str, torch.device, bool], torch.Tensor] = {}


def _cached(kind: str, device: torch.device | str, signed: bool) -> torch.Tensor:
    device = torch.device(device)
    key = (kind, device, signed)
    if key not in _DEVICE_TABLES:
        if kind == "map":
            table = _maps_cpu()[0 if signed else 1]
        elif kind == "thresholds":
            table = _thresholds_cpu(signed)
        else:  # the kernels' table, int32: the map's bits, then the encoder's buckets
            table = torch.cat([_maps_cpu()[0 if signed else 1].view(torch.int32), _buckets_cpu(signed)])
        _DEVICE_TABLES[key] = table.to(device)
    return _DEVICE_TABLES[key]


def signed_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry sorted fp32 map of ``exp_avg`` on ``device`` (cached; do not write to it)."""
    return _cached("map", device, True)


def unsigned_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry sorted fp32 map of ``exp_avg_sq`` on ``device`` (cached; do not write to it)."""
    return _cached("map", device, False)


def thresholds(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per magnitude ``j`` (``magnitude_count`` of them, increasing): the largest fp32 not above the
    exact midpoint between magnitude ``j`` and the one below it (cached; do not write to it)."""
    return _cached("thresholds", device, signed)


def codebook(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """What the kernels read (int32, cached): the map's fp32 bits at ``[0, 256)``, then the encoder's
    buckets (:func:`bucket_layout`)."""
    return _cached("codebook", device, signed)


#: ratio bits below this many low bits select an encoder bucket, per map (signed, unsigned)
BUCKET_SHIFT = {True: 17, False: 16}


@functools.lru_cache(maxsize=None)
def bucket_layout(signed: bool) -> tuple[int, int]:
    """(shift, count) of the encoder's buckets. Buckets split every binade from ratio 0 up to 1.0 into
    equal parts, each holding at most one threshold: a non-negative fp32 ratio whose bits ``b`` are
    clamped to at most :func:`encoder_highest_bits` falls in bucket ``b >> shift``. Its int32 entry
    ``e`` makes the magnitude code one addition and one shift, ``(b + e) >> shift`` (see
    :func:`_buckets_cpu`): one gather, no search, no comparison. The binades below the smallest
    threshold (their entries all give code 0) make the table longer but spare the kernels a lower
    clamp: the gathers of real moments touch the same cache lines."""
    shift = BUCKET_SHIFT[signed]
    one = int(torch.tensor(1.0).view(torch.int32)) >> shift
    return shift, one + 1


@functools.lru_cache(maxsize=None)
def _buckets_cpu(signed: bool) -> torch.Tensor:
    """Entry of bucket ``k``: ``(below - k) << shift`` plus ``low - t``, where ``below`` counts the
    thresholds in lower buckets and ``t`` is the low bits of the bucket's own threshold (``low``
    where it has none). Adding it to a ratio's bits ``b = k << shift | r`` gives ``below << shift``
    plus ``r + low - t``, which carries into the next code exactly when ``r > t``."""
    shift, count = bucket_layout(signed)
    low = (1 << shift) - 1
    bits = thresholds(signed).view(torch.int32).long()
    bucket_of = bits >> shift
    assert bucket_of.unique().numel() == bits.numel(), "two thresholds share a bucket"
    below = torch.searchsorted(bucket_of, torch.arange(count), right=False)  # thresholds in lower buckets
    own_low = torch.full((count,), low, dtype=torch.long)
    own_low[bucket_of] = bits & low
    entries = ((below - torch.arange(count)) << shift) + (low - own_low)
    return entries.to(torch.int32)


def encoder_highest_bits(signed: bool) -> int:
    """The largest ratio bits the encoder's buckets take: the kernels clamp a ratio's bits, as
    unsigned, to it, so NaN (of either sign), inf and ratios rounded above 1.0 get the top code."""
    shift, count = bucket_layout(signed)
    return (count << shift) - 1


def zero_code(signed: bool) -> int:
    """The code of 0.0 in a map (what a freshly loaded block's moments hold)."""
    return int((_maps_cpu()[0 if signed else 1] == 0).nonzero()[0])


def _per_element(scales: torch.Tensor, numel: int) -> torch.Tensor:
    return scales.repeat_interleave(QUANT_BLOCK)[:numel]


def dequantize(codes: torch.Tensor, scales: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """fp32 values of 1-D uint8 ``codes`` with one fp32 absmax per block of 256 in ``scales``."""
    return qmap[codes.long()] * _per_element(scales, codes.numel())


def quantize(x: torch.Tensor, qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D fp32 ``x`` -> (uint8 codes, fp32 absmax per block of 256): the entry nearest to the fp32
    ``|x| * (1 / absmax)``, ties towards zero. A block of zeros, or one whose absmax is below
    ``SMALLEST_SCALE``, gets absmax 0 and the code of zero."""
    signed = bool(qmap[0] < 0)
    n = x.numel()
    blocks = -(-n // QUANT_BLOCK)
    padded = x.new_zeros(blocks * QUANT_BLOCK)
    padded[:n] = x
    absmax = padded.view(blocks, QUANT_BLOCK).abs().amax(dim=1)
    absmax = torch.where(absmax < SMALLEST_SCALE, torch.zeros_like(absmax), absmax)  # 1 / absmax would overflow
    inverse = 1.0 / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    ratio = x.abs() * _per_element(inverse, n)
    # magnitude code = how many thresholds lie strictly below the ratio (0: the code of zero)
    j = torch.searchsorted(thresholds(signed, x.device), ratio.contiguous(), right=False)
    zero = zero_code(signed)
    codes = torch.where(x < 0, zero - j, zero + j) if signed else j
    return codes.to(torch.uint8), absmax
