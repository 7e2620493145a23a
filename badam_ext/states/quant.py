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

Encoding is exact: the code of the map entry nearest to the exact ratio ``x / absmax`` (no rounding
of the division), ties towards zero. It needs no search: an approximate index ``j`` (within one of
the answer) is corrected by two exact tests ``|x| > absmax * midpoint`` against the midpoints below
and above it, each an fp64 comparison of products that fp64 holds exactly (``midpoint_numerator /
midpoint_denominator`` below). The Triton kernels make the same tests, so both backends give the
same codes whatever their approximate index.
"""
from __future__ import annotations

import functools
from fractions import Fraction

import torch

from .spec import QUANT_BLOCK

__all__ = ["QUANT_BLOCK", "dequantize", "quantize", "signed_map", "unsigned_map", "zero_code",
           "magnitude_count", "midpoint_numerator", "midpoint_denominator"]

SIGNED_EXPONENTS = 7
UNSIGNED_EXPONENTS = 8


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


@functools.lru_cache(maxsize=None)
def _midpoints(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per magnitude, the midpoint below it as (numerator, denominator), float64 (both exact)."""
    count, exponents = magnitude_count(signed), _exponents(signed)
    num = torch.tensor([midpoint_numerator(j) for j in range(count)], dtype=torch.float64)
    den = torch.tensor([midpoint_denominator(j, exponents) for j in range(count)], dtype=torch.float64)
    return num.to(device), den.to(device)


_DEVICE_MAPS: dict[tuple[torch.device, bool], torch.Tensor] = {}


def _on(device: torch.device | str, signed: bool) -> torch.Tensor:
    device = torch.device(device)
    key = (device, signed)
    if key not in _DEVICE_MAPS:
        _DEVICE_MAPS[key] = _maps_cpu()[0 if signed else 1].to(device)
    return _DEVICE_MAPS[key]


def signed_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry sorted fp32 map of ``exp_avg`` on ``device`` (cached; do not write to it)."""
    return _on(device, True)


def unsigned_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry sorted fp32 map of ``exp_avg_sq`` on ``device`` (cached; do not write to it)."""
    return _on(device, False)


def zero_code(signed: bool) -> int:
    """The code of 0.0 in a map (what a freshly loaded block's moments hold)."""
    return int((_maps_cpu()[0 if signed else 1] == 0).nonzero()[0])


def _per_element(scales: torch.Tensor, numel: int) -> torch.Tensor:
    return scales.repeat_interleave(QUANT_BLOCK)[:numel]


def dequantize(codes: torch.Tensor, scales: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """fp32 values of 1-D uint8 ``codes`` with one fp32 absmax per block of 256 in ``scales``."""
    return qmap[codes.long()] * _per_element(scales, codes.numel())


def _above_midpoint(u: torch.Tensor, magnitude: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """1 where ``magnitude / absmax`` lies strictly above the midpoint below magnitude ``u`` (exact)."""
    num, den = _midpoints(signed, u.device)
    return (magnitude.double() * den[u] > num[u] * absmax.double()).long()


def quantize(x: torch.Tensor, qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D fp32 ``x`` -> (uint8 codes, fp32 absmax per block of 256): the entry nearest to the exact
    ``x / absmax``, ties towards zero. A block of zeros gets absmax 0 and the code of zero."""
    signed = bool(qmap[0] < 0)
    n = x.numel()
    blocks = -(-n // QUANT_BLOCK)
    padded = x.new_zeros(blocks * QUANT_BLOCK)
    padded[:n] = x
    absmax = padded.view(blocks, QUANT_BLOCK).abs().amax(dim=1)
    per_element = _per_element(absmax, n)
    safe = torch.where(per_element > 0, per_element, torch.ones_like(per_element))
    magnitude = x.abs()
    zero = zero_code(signed)
    mags = qmap[zero + 1:zero + 1 + magnitude_count(signed)]
    # an index within one of the answer (the largest magnitude <= the rounded ratio), clamped so that
    # both midpoints tested belong to the map (the answer stays in the window), then exact tests
    guess = torch.searchsorted(mags, (magnitude / safe).contiguous(), right=True) - 1
    guess = guess.clamp_(0, magnitude_count(signed) - 2)
    j = (guess - 1 + _above_midpoint(guess, magnitude, per_element, signed)
         + _above_midpoint(guess + 1, magnitude, per_element, signed))
    codes = torch.where(x < 0, zero - (j + 1), zero + (j + 1)) if signed else j + 1
    return codes.to(torch.uint8), absmax
