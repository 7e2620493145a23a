"""fp32 -> weight dtype conversion inside the kernels: explicit bf16 rounding on the fp32 bits.

The Triton interpreter truncates on ``.to(tl.bfloat16)``; doing round-to-nearest-even in integer
arithmetic makes the GPU and the interpreter agree bit for bit with torch's ``.to(torch.bfloat16)``
(NaN becomes the quiet NaN 0x7FC0, as on torch's CPU path).
"""
from __future__ import annotations

import triton
import triton.language as tl

BF16_QUIET_NAN = tl.constexpr(0x7FC0)


@triton.jit
def bf16_bits_rne(x):
    """uint32 tensor whose low 16 bits are ``x`` (fp32) rounded to bf16, nearest even."""
    bits = x.to(tl.uint32, bitcast=True)
    lsb = (bits >> 16) & 1
    rounded = (bits + 0x7FFF + lsb) >> 16
    return tl.where(x != x, BF16_QUIET_NAN, rounded)


@triton.jit
def bf16_bits_stochastic(x, rand):
    """uint32 tensor whose low 16 bits are ``x`` rounded to bf16 up with probability of its remainder.

    ``rand`` holds random 32-bit integers; their low 16 bits are added below the kept bits, so the
    magnitude rounds away from zero with probability (dropped bits) / 2^16: unbiased in expectation.
    """
    bits = x.to(tl.uint32, bitcast=True)
    noise = rand.to(tl.uint32, bitcast=True) & 0xFFFF
    rounded = (bits + noise) >> 16
    return tl.where(x != x, BF16_QUIET_NAN, rounded)


@triton.jit
def to_weight_dtype(x, rng_seed, rng_offsets, W_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Round fp32 ``x`` to ``W_DTYPE``: bf16 by nearest even (or stochastically), fp16 by the
    hardware's nearest-even conversion, fp32 unchanged."""
    if W_DTYPE == tl.bfloat16:
        if STOCHASTIC:
            bits = bf16_bits_stochastic(x, tl.randint(rng_seed, rng_offsets))
        else:
            bits = bf16_bits_rne(x)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif W_DTYPE == tl.float16:
        return x.to(tl.float16)
    else:
        return x
