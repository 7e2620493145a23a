"""fp32 -> weight dtype rounding inside the kernels: bf16 round-to-nearest-even on the bits (special
values, ties, every bit pattern class), fp16, and bf16 stochastic rounding statistics."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from _kernel_helpers import bf16_neighbours, kdevice, std_errors  # noqa: F401  (kdevice is a fixture)
from badam_ext import torch_ops
from badam_ext.kernels.rounding import to_weight_dtype

_BLOCK = 4096


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, seed, OUT_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr,
                  BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    x = tl.load(x_ptr + idx, mask=mask)
    tl.store(out_ptr + idx, to_weight_dtype(x, seed, idx, OUT_DTYPE, STOCHASTIC), mask=mask)


def kernel_round(x: torch.Tensor, dtype: torch.dtype, stochastic: bool = False, seed: int = 0) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    tl_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]
    _round_kernel[(triton.cdiv(x.numel(), _BLOCK),)](x, out, x.numel(), seed, OUT_DTYPE=tl_dtype,
                                                      STOCHASTIC=stochastic, BLOCK=_BLOCK)
    return out


def _bits(values: list[int]) -> torch.Tensor:
    """fp32 tensor from unsigned 32-bit patterns."""
    return torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in values], dtype=torch.int32).view(torch.float32)


SPECIAL_BITS = [
    0x00000000, 0x80000000,              # +-0
    0x3F800000, 0xBF800000,              # +-1
    0x3F808000, 0x3F818000,              # ties: kept lsb 0 (stays), kept lsb 1 (rounds up)
    0xBF808000, 0xBF818000,              # negative ties
    0x3F807FFF, 0x3F808001,              # just below / above a tie
    0x7F7F0000, 0x7F7F7FFF,              # bf16 max finite, and just below its rounding boundary
    0x7F7F8000, 0x7F7FFFFF, 0xFF7FFFFF,  # round up to +-inf
    0x7F800000, 0xFF800000,              # +-inf
    0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF, 0xFFFFFFFF,  # quiet, negative, signalling NaNs
    0x00000001, 0x00008000, 0x00018000, 0x007FFFFF, 0x807FFFFF,  # subnormals and their ties
    0x00800000, 0x0080FFFF,              # smallest normal, rounding into the next binade
]


def test_bf16_rne_special_values(kdevice):
    x = _bits(SPECIAL_BITS)
    out = kernel_round(x.to(kdevice), torch.bfloat16).cpu()
    ref = x.to(torch.bfloat16)
    nan = x.isnan()
    assert out[nan].isnan().all()
    assert torch.equal(out[nan].view(torch.int16), torch.full((int(nan.sum()),), 0x7FC0, dtype=torch.int16))
    assert torch.equal(out[~nan].view(torch.int16), ref[~nan].view(torch.int16)), (
        [hex(b) for b, o, r in zip(SPECIAL_BITS, out.view(torch.int16).tolist(), ref.view(torch.int16).tolist()) if o != r]
    )
    # spot checks independent of torch's conversion
    as_u16 = out.view(torch.int16).tolist()
    assert as_u16[4] == 0x3F80 and as_u16[5] == 0x3F82 and as_u16[8] == 0x3F80 and as_u16[9] == 0x3F81
    assert as_u16[12] == 0x7F80 and as_u16[11] == 0x7F7F


def test_bf16_rne_matches_torch_on_random_bit_patterns(kdevice):
    gen = torch.Generator().manual_seed(50)
    x = torch.randint(-(1 << 31), 1 << 31, (60000,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = x.view(torch.float32)
    out = kernel_round(x.to(kdevice), torch.bfloat16).cpu()
    nan = x.isnan()
    assert out[nan].isnan().all()
    assert torch.equal(out[~nan].view(torch.int16), x[~nan].to(torch.bfloat16).view(torch.int16))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_fp16_and_fp32_conversion(kdevice):
    gen = torch.Generator().manual_seed(51)
    # magnitudes from fp16-subnormal to overflow, both signs
    x = torch.exp2(torch.empty(50000).uniform_(-26, 17, generator=gen)) * torch.sign(torch.randn(50000, generator=gen))
    x[:4] = torch.tensor([65504.0, 65520.0, float("inf"), float("nan")])
    out = kernel_round(x.to(kdevice), torch.float16).cpu()
    ref = x.to(torch.float16)
    assert out[3].isnan()
    assert torch.equal(out[4:].view(torch.int16), ref[4:].view(torch.int16))
    assert out[0].item() == 65504.0 and out[1].item() == float("inf")
    same = kernel_round(x.to(kdevice), torch.float32).cpu()
    assert torch.equal(same[4:], x[4:])


@pytest.mark.parametrize("fraction", [0.5, 0.25, 0.9, 0.01])
def test_bf16_stochastic_rounding_is_unbiased(kdevice, fraction):
    n = 50000
    for base in (1.0, -3.0, 1e-30):
        lo, hi = bf16_neighbours(base * (1 + 1e-6))
        lo_, hi_ = min(lo, hi), max(lo, hi)
        value = lo_ + fraction * (hi_ - lo_)
        x = torch.full((n,), value, dtype=torch.float32)
        value = float(x[0])  # the fp32 value actually rounded
        out = kernel_round(x.to(kdevice), torch.bfloat16, stochastic=True, seed=7).float().cpu()
        assert ((out == lo_) | (out == hi_)).all()
        p = (value - lo_) / (hi_ - lo_)
        std = (hi_ - lo_) * (p * (1 - p)) ** 0.5
        assert std_errors(float(out.double().mean()), value, std, n) < 5.0, (base, fraction)


def test_bf16_stochastic_rounding_keeps_representable_values_and_specials(kdevice):
    gen = torch.Generator().manual_seed(52)
    exact = torch.randn(20000, generator=gen).to(torch.bfloat16)
    x = exact.float()
    out = kernel_round(x.to(kdevice), torch.bfloat16, stochastic=True, seed=3).cpu()
    assert torch.equal(out.view(torch.int16), exact.view(torch.int16))
    specials = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, float("nan")])
    out = kernel_round(specials.to(kdevice), torch.bfloat16, stochastic=True, seed=3).cpu()
    assert torch.equal(out[:4].view(torch.int16), specials[:4].to(torch.bfloat16).view(torch.int16))
    assert out[4].isnan()


def test_stochastic_rounding_seed_changes_the_draws(kdevice):
    x = torch.full((4096,), 1.0 + 2.0**-9, dtype=torch.float32)  # halfway between two bf16 values
    a = kernel_round(x.to(kdevice), torch.bfloat16, stochastic=True, seed=1).cpu()
    b = kernel_round(x.to(kdevice), torch.bfloat16, stochastic=True, seed=1).cpu()
    c = kernel_round(x.to(kdevice), torch.bfloat16, stochastic=True, seed=2).cpu()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_torch_backend_stochastic_rounding_is_unbiased():
    n = 50000
    gen = torch.Generator().manual_seed(0)
    for value in (1.0 + 0.3 * 2.0**-7, -(2.0 + 0.7 * 2.0**-6)):
        lo, hi = bf16_neighbours(value)
        x = torch.full((n,), value, dtype=torch.float32)
        out = torch_ops.round_bf16_stochastic(x, gen).float()
        assert ((out == lo) | (out == hi)).all()
        p = (value - lo) / (hi - lo)
        std = abs(hi - lo) * (p * (1 - p)) ** 0.5
        assert std_errors(float(out.double().mean()), value, std, n) < 5.0
    exact = torch.randn(1000, generator=gen).to(torch.bfloat16)
    assert torch.equal(torch_ops.round_bf16_stochastic(exact.float(), gen), exact)
    nan = torch_ops.round_bf16_stochastic(torch.tensor([float("nan"), float("inf")]), gen)
    assert nan[0].isnan() and nan[1].item() == float("inf")
