"""A test-only Triton kernel that runs the kernels' 8-bit encoder on whole quantization blocks."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from badam_ext.kernels.quant import quantize_rows
from badam_ext.states import QUANT_BLOCK
from badam_ext.states.quant import codebook


@triton.jit
def _encode_rows(x_ptr, codes_ptr, absmax_ptr, codebook_ptr, SIGNED: tl.constexpr, QBLOCK: tl.constexpr):
    row = tl.program_id(0)
    idx = row * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    codes, absmax = quantize_rows(tl.load(x_ptr + idx), codebook_ptr, SIGNED)
    tl.store(codes_ptr + idx, codes)
    tl.store(absmax_ptr + row + tl.arange(0, 1), absmax)


def encode_with_kernel(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax) of 1-D fp32 ``x`` (a multiple of 256 long) from the kernels' encoder; outputs poisoned first."""
    assert x.dtype == torch.float32 and x.numel() % QUANT_BLOCK == 0
    codes = torch.full_like(x, 0xAB, dtype=torch.uint8)
    absmax = torch.full((x.numel() // QUANT_BLOCK,), float("nan"), device=x.device)
    _encode_rows[(absmax.numel(),)](x, codes, absmax, codebook(signed, x.device), SIGNED=signed, QBLOCK=QUANT_BLOCK)
    return codes, absmax
