"""Shared pieces of the kernel tests: the device fixture, random blocks in a NaN-poisoned arena, a
float64 AdamW written from the algorithm (independent of both backends), and ulp arithmetic."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import pytest
import torch

from badam_ext import kernels as K
from badam_ext.contract import OFFSET_ALIGN

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)
ALIGN = OFFSET_ALIGN  # arena offsets are multiples of this many elements

DEVICE_PARAMS = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda", id="cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]


def resolve_device(name: str) -> torch.device:
    """The device for a kernel test, skipping where the kernels cannot run in this process."""
    if name == "cpu" and not K.interpreted():
        pytest.skip("the kernels were compiled for the GPU; CPU runs need TRITON_INTERPRET=1 before triton is imported")
    if name == "cuda":
        if K.interpreted():
            pytest.skip("TRITON_INTERPRET=1 runs the kernels on the host")
        return torch.device("cuda", torch.cuda.current_device())  # tensors report an explicit index
    return torch.device(name)


@pytest.fixture(params=DEVICE_PARAMS)
def kdevice(request) -> torch.device:
    return resolve_device(request.param)


# ------------------------------------------------------------------------------------- blocks
@dataclass
class Block:
    """Weights of one dtype and their arena (flat fp32 regions poisoned with NaN)."""

    weights: list[torch.Tensor]
    offsets: list[int]
    decay: list[bool]
    master: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor

    @property
    def regions(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.master, self.exp_avg, self.exp_avg_sq

    def spans(self) -> list[slice]:
        return [slice(o, o + w.numel()) for o, w in zip(self.offsets, self.weights)]

    def padding_mask(self) -> torch.Tensor:
        """True at arena elements no tensor owns (alignment gaps and the tail)."""
        mask = torch.ones(self.master.numel(), dtype=torch.bool, device=self.master.device)
        for sl in self.spans():
            mask[sl] = False
        return mask

    def region_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[sl].view(w.shape) for sl, w in zip(self.spans(), self.weights)]


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def make_block(shapes: Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device, *,
               decay: Optional[Sequence[bool]] = None, seed: int = 0, gap: int = ALIGN) -> Block:
    """Random weights (never zero) laid out like the arena, ``gap`` extra padding elements between them."""
    gen = torch.Generator().manual_seed(seed)
    weights, offsets, end = [], [], 0
    for shape in shapes:
        w = (torch.randn(shape, generator=gen) * 0.5 + 0.01).to(dtype)
        weights.append(w.to(device))
        offsets.append(end)
        end = _align(end + w.numel()) + gap
    size = end + ALIGN
    regions = [torch.full((size,), float("nan"), device=device) for _ in range(3)]
    if decay is None:
        decay = [i % 2 == 0 for i in range(len(shapes))]
    return Block(weights, offsets, list(decay), *regions)


def random_grads(block: Block, dtype: Optional[torch.dtype] = None, seed: int = 1,
                 scale: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for w in block.weights:
        g = torch.randn(w.shape, generator=gen) * scale
        out.append(g.to(dtype or w.dtype).to(w.device))
    return out


def randomize_state(block: Block, seed: int = 2) -> None:
    """Fresh nonzero optimizer state: master = weight + noise (so a step that read the weight instead
    of the master would fail), exp_avg random, exp_avg_sq random positive. Padding stays NaN."""
    gen = torch.Generator().manual_seed(seed)
    for w, sl in zip(block.weights, block.spans()):
        n = w.numel()
        block.master[sl] = (w.reshape(-1).float().cpu() + torch.randn(n, generator=gen) * 1e-2).to(w.device)
        block.exp_avg[sl] = (torch.randn(n, generator=gen) * 1e-2).to(w.device)
        block.exp_avg_sq[sl] = (torch.rand(n, generator=gen) * 1e-3 + 1e-6).to(w.device)


# ---------------------------------------------------------------------------- float64 reference
def adamw_reference(p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *, t: int, lr: float,
                    beta1: float, beta2: float, eps: float, weight_decay: float, decay: bool,
                    grad_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AdamW step (decoupled decay, bias-corrected moments) in float64 from the formulas."""
    p, m, v, g = (x.double() for x in (p, m, v, g))
    g = g * grad_scale
    if decay:
        p = p * (1.0 - lr * weight_decay)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    m_hat = m / (1.0 - beta1**t)
    v_hat = v / (1.0 - beta2**t)
    p = p - lr * m_hat / (v_hat.sqrt() + eps)
    return p, m, v


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm())


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, rtol: float, what: str) -> None:
    """‖out - ref‖ / ‖ref‖ <= rtol, and elementwise |out - ref| <= 4 rtol |ref| + rtol max|ref|."""
    out64, ref64 = out.double().cpu().flatten(), ref.double().cpu().flatten()
    assert torch.isfinite(out64).all(), f"{what}: non-finite values (unwritten or poisoned elements)"
    err = rel_err(out64, ref64)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"
    bound = 4 * rtol * ref64.abs() + rtol * ref64.abs().max()
    bad = (out64 - ref64).abs() > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements off, first at {int(bad.nonzero()[0])}: "
                           f"{out64[bad][0].item()!r} vs {ref64[bad][0].item()!r}")


# ------------------------------------------------------------------------------------------ ulps
def _ordered(x: torch.Tensor) -> torch.Tensor:
    """Map float bit patterns to integers that are ordered like the floats (so ulps subtract)."""
    itype = {2: torch.int16, 4: torch.int32}[x.element_size()]
    i = x.contiguous().view(itype).to(torch.int64)
    top = 1 << (8 * x.element_size() - 1)
    return torch.where(i < 0, -(i + top), i)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    assert a.dtype == b.dtype
    return (_ordered(a.cpu()) - _ordered(b.cpu())).abs()


def bf16_neighbours(x: float) -> tuple[float, float]:
    """The two bf16 values bracketing ``x`` (x not representable)."""
    lo = torch.tensor([x]).view(torch.int32) & ~0xFFFF
    lo_v = lo.view(torch.float32).item()
    hi_v = (lo + 0x10000).view(torch.float32).item()
    return (lo_v, hi_v) if x > 0 else (hi_v, lo_v)


def std_errors(mean: float, target: float, std: float, n: int) -> float:
    return abs(mean - target) / (std / math.sqrt(n))
