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

The maps are built here from that description, not taken from either library. Encoding picks the
nearest entry, ties to the lower code; the Triton kernels do the same with the same fp32 operations,
so both backends produce identical codes.
"""
from __future__ import annotations

import functools

import torch

from .spec import QUANT_BLOCK

__all__ = ["QUANT_BLOCK", "dequantize", "quantize", "signed_map", "unsigned_map", "zero_code"]


def _magnitudes(exponents: int) -> list[float]:
    out = []
    for e in range(exponents):
        steps = 2 ** (exponents - 1 - e)
        out += [10.0 ** -e * (0.1 + 0.9 * k / steps) for k in range(1, steps + 1)]
    return out


@functools.lru_cache(maxsize=None)
def _maps_cpu() -> tuple[torch.Tensor, torch.Tensor]:
    pos = _magnitudes(7)
    signed = sorted([-x for x in pos] + [0.0] + pos + [1.0])
    unsigned = sorted([0.0] + _magnitudes(8))
    out = (torch.tensor(signed, dtype=torch.float32), torch.tensor(unsigned, dtype=torch.float32))
    for m in out:
        assert m.numel() == 256 and bool((m[1:] >= m[:-1]).all())
    return out


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


def quantize(x: torch.Tensor, qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D fp32 ``x`` -> (uint8 codes, fp32 absmax per block of 256): nearest entry, ties to the lower code.

    A block of zeros gets absmax 0 and the code of zero.
    """
    n = x.numel()
    blocks = -(-n // QUANT_BLOCK)
    padded = x.new_zeros(blocks * QUANT_BLOCK)
    padded[:n] = x
    absmax = padded.view(blocks, QUANT_BLOCK).abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normalized = x / _per_element(safe, n)
    lo = (torch.searchsorted(qmap, normalized, right=True) - 1).clamp_(0, qmap.numel() - 2)
    below, above = qmap[lo], qmap[lo + 1]
    codes = torch.where(above - normalized < normalized - below, lo + 1, lo)
    return codes.to(torch.uint8), absmax
