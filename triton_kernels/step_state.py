"""Advancing the per-group step state (float64 ``[t, beta1^t, beta2^t]`` on device) without host sync."""
from __future__ import annotations

import struct
from typing import Optional

import torch
import triton
import triton.language as tl

from ..contract import check_beta, check_device_scalar, check_step_state, new_step_state, reset_step_state
from .launch_config import check_launch_device, device_guard

__all__ = ["advance_step", "new_step_state", "reset_step_state"]


def float64_bits(x: float) -> int:
    """IEEE-754 bit pattern of a double as a signed int64 (exact transport into a kernel).

    Triton passes Python floats to kernels as fp32; the betas must reach the fp64 products exactly.
    """
    return struct.unpack("<q", struct.pack("<d", x))[0]


@triton.jit(do_not_specialize=["beta1_bits", "beta2_bits"])
def _advance_kernel(state_ptr, found_inf_ptr, beta1_bits, beta2_bits, HAS_FOUND_INF: tl.constexpr):
    if HAS_FOUND_INF:
        run = tl.load(found_inf_ptr) == 0
    else:
        run = True
    if run:
        beta1 = beta1_bits.to(tl.int64).to(tl.float64, bitcast=True)
        beta2 = beta2_bits.to(tl.int64).to(tl.float64, bitcast=True)
        tl.store(state_ptr, tl.load(state_ptr) + 1.0)
        tl.store(state_ptr + 1, tl.load(state_ptr + 1) * beta1)
        tl.store(state_ptr + 2, tl.load(state_ptr + 2) * beta2)


def advance_step(step_state: torch.Tensor, beta1: float, beta2: float,
                 found_inf: Optional[torch.Tensor] = None) -> None:
    """``[t, b1^t, b2^t] -> [t + 1, b1^(t+1), b2^(t+1)]`` in one launch, unless ``found_inf != 0``.

    Call it once per group and step, before :func:`fused_adamw_step` (which reads the new ``t``).
    """
    check_step_state(step_state)
    check_launch_device(step_state.device)
    check_device_scalar("found_inf", found_inf, step_state.device)
    b1 = float64_bits(check_beta("beta1", beta1))
    b2 = float64_bits(check_beta("beta2", beta2))
    with device_guard(step_state.device):
        _advance_kernel[(1,)](
            step_state, found_inf if found_inf is not None else step_state, b1, b2,
            HAS_FOUND_INF=found_inf is not None, num_warps=1,
        )
