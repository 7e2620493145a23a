"""The backend-independent part of the kernel contract, in plain torch (no triton import).

Argument checks shared by the Triton launchers (``badam_ext.kernels``) and ``badam_ext.torch_ops``,
and the fp64 step state ``[t, beta1^t, beta2^t]`` both backends advance on device.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .states.spec import ALIGNMENT_BYTES, QUANT_BLOCK

#: weight and gradient dtypes both backends accept
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: arena offsets are multiples of this many elements (ALIGNMENT_BYTES of fp32); the kernels rely on it
OFFSET_ALIGN = ALIGNMENT_BYTES // 4


def check_weights(weights: Sequence[torch.Tensor]) -> tuple[torch.device, torch.dtype]:
    """Non-empty, contiguous tensors of one supported dtype on one device; returns both."""
    if len(weights) == 0:
        raise ValueError("BlockTables.build needs at least one weight tensor, got none")
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"weight {i} is a {type(w).__name__}, not a torch.Tensor")
        if w.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"weight {i} has dtype {w.dtype}; supported: float32, float16, bfloat16")
        if not w.is_contiguous():
            raise ValueError(f"weight {i} (shape {tuple(w.shape)}) is not contiguous")
        if w.numel() == 0:
            raise ValueError(f"weight {i} is empty (numel 0)")
    device, dtype = weights[0].device, weights[0].dtype
    for i, w in enumerate(weights):
        if w.device != device:
            raise ValueError(f"weight {i} is on {w.device}, weight 0 on {device}: one device per launch group")
        if w.dtype != dtype:
            raise TypeError(f"weight {i} has dtype {w.dtype}, weight 0 {dtype}: one dtype per launch group")
    return device, dtype


def check_offsets(offsets: Sequence[int], numels: Sequence[int]) -> tuple[int, ...]:
    """Arena offsets (elements): non-negative ints, multiples of 64, ranges not overlapping."""
    offsets = list(offsets)
    if len(offsets) != len(numels):
        raise ValueError(f"got {len(offsets)} offsets for {len(numels)} weights")
    out = []
    for i, off in enumerate(offsets):
        if isinstance(off, bool) or isinstance(off, (float, complex)):
            raise TypeError(f"offset {i} is a {type(off).__name__}, not an int")
        try:
            off = int(off)  # also numpy / 0-dim torch integers
        except (TypeError, ValueError):
            raise TypeError(f"offset {i} is a {type(off).__name__}, not an int") from None
        if off < 0:
            raise ValueError(f"offset {i} is negative ({off})")
        if off % OFFSET_ALIGN:
            raise ValueError(f"offset {i} ({off}) is not a multiple of {OFFSET_ALIGN} elements "
                             f"({ALIGNMENT_BYTES} bytes)")
        out.append(off)
    spans = sorted(zip(out, numels, range(len(out))))
    for (a_off, a_n, a_i), (b_off, _, b_i) in zip(spans, spans[1:]):
        if a_off + a_n > b_off:
            raise ValueError(
                f"arena ranges overlap: weight {a_i} covers [{a_off}, {a_off + a_n}), weight {b_i} starts at {b_off}"
            )
    return tuple(out)


def check_decay(decay: Sequence[bool], count: int) -> tuple[bool, ...]:
    """One bool (or 0/1) per weight."""
    decay = list(decay)
    if len(decay) != count:
        raise ValueError(f"got {len(decay)} decay flags for {count} weights")
    for i, d in enumerate(decay):
        if not (isinstance(d, bool) or (isinstance(d, int) and d in (0, 1))):
            raise TypeError(f"decay flag {i} must be a bool, got {d!r}")
    return tuple(bool(d) for d in decay)


def check_grads(grads: Sequence[Optional[torch.Tensor]], shapes: Sequence[torch.Size],
                device: torch.device) -> torch.dtype:
    """One gradient per weight, of its shape, on its device, contiguous, one supported dtype."""
    grads = list(grads)
    if len(grads) != len(shapes):
        raise ValueError(f"got {len(grads)} gradients for {len(shapes)} weights")
    dtype = None
    for i, (g, shape) in enumerate(zip(grads, shapes)):
        if g is None:
            raise ValueError(f"gradient {i} is None (weight shape {tuple(shape)})")
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"gradient {i} is a {type(g).__name__}, not a torch.Tensor")
        if g.shape != shape:
            raise ValueError(f"gradient {i} has shape {tuple(g.shape)}, its weight {tuple(shape)}")
        if g.device != device:
            raise ValueError(f"gradient {i} is on {g.device}, its weight on {device}")
        if not g.is_contiguous():
            raise ValueError(f"gradient {i} (shape {tuple(g.shape)}) is not contiguous")
        if g.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"gradient {i} has dtype {g.dtype}; supported: float32, float16, bfloat16")
        if dtype is None:
            dtype = g.dtype
        elif g.dtype != dtype:
            raise TypeError(f"gradient {i} has dtype {g.dtype}, gradient 0 {dtype}: one dtype per launch group")
    return dtype


def check_regions(device: torch.device, span: int, dtype: torch.dtype = torch.float32, **regions: torch.Tensor) -> None:
    """Arena regions: contiguous 1-D tensors of ``dtype`` on ``device`` with at least ``span`` elements."""
    for name, t in regions.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise TypeError(f"{name} must be {str(dtype).removeprefix('torch.')} (an arena region), got {t.dtype}")
        if t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 1-D tensor, got shape {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the weights on {device}")
        if t.numel() < span:
            raise ValueError(f"{name} has {t.numel()} elements; the tables reach element {span}")


def check_state(tables: Any, master: Optional[torch.Tensor], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                exp_avg_scale: Optional[torch.Tensor] = None, exp_avg_sq_scale: Optional[torch.Tensor] = None) -> bool:
    """Check the state regions a launch over ``tables`` works on; True for the 8-bit format.

    fp32 moments: two fp32 regions, no scales. 8-bit moments: two uint8 code regions and both fp32
    absmax regions (one item per ``QUANT_BLOCK`` elements), tensors starting on whole blocks.
    ``master`` None: no fp32 master, the weights (bf16 or fp32) are updated directly.
    """
    device, span = tables.device, tables.span
    if master is not None:
        check_regions(device, span, master=master)
    elif tables.dtype == torch.float16:
        raise TypeError("a state without an fp32 master updates the weights directly, which needs bfloat16 "
                        "(stochastic rounding) or float32 weights; these are float16")
    scales = {"exp_avg_scale": exp_avg_scale, "exp_avg_sq_scale": exp_avg_sq_scale}
    if not (isinstance(exp_avg, torch.Tensor) and exp_avg.dtype == torch.uint8):
        check_regions(device, span, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
        for name, t in scales.items():
            if t is not None:
                raise ValueError(f"{name} is given but the moments are float32: absmax scales belong to 8-bit "
                                 "(uint8) moments")
        return False
    check_regions(device, span, torch.uint8, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    for name, t in scales.items():
        if t is None:
            raise ValueError(f"{name} is required with 8-bit (uint8) moments: one float32 absmax per "
                             f"{QUANT_BLOCK} elements")
    check_regions(device, -(-span // QUANT_BLOCK), **scales)
    for i, off in enumerate(tables.offsets):
        if off % QUANT_BLOCK:
            raise ValueError(f"offset {i} ({off}) is not a multiple of {QUANT_BLOCK} elements: 8-bit moments need "
                             "each tensor to start on a quantization block (lay it out with the 8-bit StateSpec)")
    return True


def check_partials(partials: torch.Tensor, device: torch.device, needed: int) -> None:
    if not isinstance(partials, torch.Tensor) or partials.dtype != torch.float32:
        raise TypeError("partials must be a float32 torch.Tensor")
    if partials.dim() != 1 or not partials.is_contiguous() or partials.device != device:
        raise ValueError(f"partials must be a contiguous 1-D tensor on {device}, got shape "
                         f"{tuple(partials.shape)} on {partials.device}")
    if partials.numel() < needed:
        raise ValueError(f"partials has {partials.numel()} elements, needs {needed} (tables.num_chunks)")


def check_device_scalar(name: str, t: Optional[torch.Tensor], device: torch.device) -> None:
    """None, or a one-element fp32 tensor on ``device`` (grad_scale, found_inf)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.numel() != 1 or t.dtype != torch.float32:
        raise ValueError(f"{name} must be a one-element float32 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def check_beta(name: str, beta: float) -> float:
    beta = float(beta)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {beta}")
    return beta


def check_hyper(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> tuple[float, ...]:
    """Validate the AdamW hyper-parameters; return them as Python floats."""
    lr, eps, weight_decay = float(lr), float(eps), float(weight_decay)
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    return lr, check_beta("beta1", beta1), check_beta("beta2", beta2), eps, weight_decay


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return seed


# ----------------------------------------------------------------------------------- step state
def new_step_state(device: torch.device | str) -> torch.Tensor:
    """A fresh state ``[0, 1, 1]`` (no step taken yet) on ``device``."""
    return torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64, device=device)


def check_step_state(step_state: torch.Tensor) -> None:
    if not isinstance(step_state, torch.Tensor):
        raise TypeError(f"step_state must be a torch.Tensor, got {type(step_state).__name__}")
    if step_state.dtype != torch.float64 or step_state.shape != (3,) or not step_state.is_contiguous():
        raise ValueError(
            "step_state must be a contiguous float64 tensor [t, beta1^t, beta2^t] of shape (3,), "
            f"got dtype {step_state.dtype}, shape {tuple(step_state.shape)}"
        )


def reset_step_state(step_state: torch.Tensor) -> None:
    """Back to ``[0, 1, 1]`` in place (at a block switch), without a host sync."""
    check_step_state(step_state)
    step_state[:1].fill_(0.0)
    step_state[1:].fill_(1.0)
