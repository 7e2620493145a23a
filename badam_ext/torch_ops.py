"""The kernel contract in plain torch, one tensor at a time.

The same entry points as :mod:`badam_ext.kernels` (``BlockTables`` here is :class:`TorchTables`),
for every state format, with the same arithmetic in the same order, so on CPU the two agree bit for
bit, 8-bit codes included (stochastic rounding aside, which draws from torch's generator instead of
Triton's Philox stream; and the gradient norm, summed per tensor here and per chunk there, which
can move a clipped step by one fp32 ulp). It serves CPU users and is the oracle the Triton kernels
are tested against. No triton import, no host sync.
"""
from __future__ import annotations

import struct
from typing import Optional, Sequence

import torch

from .contract import (
    check_state,
    check_decay,
    check_device_scalar,
    check_grads,
    check_hyper,
    check_offsets,
    check_partials,
    check_seed,
    check_step_state,
    check_weights,
    new_step_state,
    reset_step_state,
)
from .states.quant import QUANT_BLOCK, dequantize, quantize, signed_map, unsigned_map, zero_code
from .states.spec import check_states

name = "torch"

__all__ = [
    "BlockTables",
    "TorchTables",
    "advance_step",
    "block_load",
    "fused_adamw_step",
    "grad_sq_norm",
    "name",
    "new_step_state",
    "reset_step_state",
]


class TorchTables:
    """Per-switch description of one launch group (same ``build`` API as the Triton tables).

    ``num_chunks`` is the number of tensors: :func:`grad_sq_norm` writes one partial per tensor.
    ``block_size``, ``min_block_size`` and ``states`` are accepted for API parity and ignored
    (``states`` is checked).
    """

    def __init__(self, weights: tuple[torch.Tensor, ...], offsets: tuple[int, ...], decay: tuple[bool, ...]):
        self.weights = weights
        self.offsets = offsets
        self.decay = decay
        self.numels = tuple(w.numel() for w in weights)
        self.shapes = tuple(w.shape for w in weights)
        self.device = weights[0].device
        self.dtype = weights[0].dtype
        self.span = max(o + n for o, n in zip(offsets, self.numels))

    @classmethod
    def build(cls, weights: Sequence[torch.Tensor], offsets: Sequence[int], decay: Sequence[bool],
              block_size: Optional[int] = None, min_block_size: int = 1, states: str = "fp32") -> "TorchTables":
        check_states(states)
        weights = tuple(weights)
        check_weights(weights)
        offs = check_offsets(offsets, [w.numel() for w in weights])
        return cls(weights, offs, check_decay(decay, len(weights)))

    @property
    def num_tensors(self) -> int:
        return len(self.weights)

    @property
    def num_chunks(self) -> int:
        return len(self.weights)

    def grad_pointers(self, grads: Sequence[Optional[torch.Tensor]]) -> tuple[torch.Tensor, torch.dtype]:
        """Same checks as the Triton tables; the addresses as a host int64 tensor (informational)."""
        dtype = check_grads(grads, self.shapes, self.device)
        return torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64), dtype

    def slices(self) -> list[slice]:
        return [slice(o, o + n) for o, n in zip(self.offsets, self.numels)]

    def __repr__(self) -> str:
        return (f"TorchTables(tensors={self.num_tensors}, numel={sum(self.numels)}, dtype={self.dtype}, "
                f"device={self.device})")


BlockTables = TorchTables


def _quant_views(tables: TorchTables, sl: slice, codes: torch.Tensor, scales: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A tensor's codes and its absmax items (its offset is a whole number of quantization blocks)."""
    first = sl.start // QUANT_BLOCK
    return codes[sl], scales[first:first + -(-(sl.stop - sl.start) // QUANT_BLOCK)]


def block_load(tables: TorchTables, master_flat: Optional[torch.Tensor], exp_avg_flat: torch.Tensor,
               exp_avg_sq_flat: torch.Tensor, *, exp_avg_scale: Optional[torch.Tensor] = None,
               exp_avg_sq_scale: Optional[torch.Tensor] = None) -> None:
    """``master[off + i] = float(weight[i])`` (with a master); the moments zero over each tensor's range
    (8-bit: the code of zero and absmax 0)."""
    quantized = check_state(tables, master_flat, exp_avg_flat, exp_avg_sq_flat, exp_avg_scale, exp_avg_sq_scale)
    for w, sl in zip(tables.weights, tables.slices()):
        if master_flat is not None:
            master_flat[sl].copy_(w.reshape(-1))
        if not quantized:
            exp_avg_flat[sl].zero_()
            exp_avg_sq_flat[sl].zero_()
            continue
        for codes, scales, signed in ((exp_avg_flat, exp_avg_scale, True), (exp_avg_sq_flat, exp_avg_sq_scale, False)):
            c, a = _quant_views(tables, sl, codes, scales)
            c.fill_(zero_code(signed))
            a.zero_()


def advance_step(step_state: torch.Tensor, beta1: float, beta2: float,
                 found_inf: Optional[torch.Tensor] = None) -> None:
    """``[t, b1^t, b2^t] -> [t + 1, b1^(t+1), b2^(t+1)]`` unless ``found_inf != 0`` (device ops only)."""
    check_step_state(step_state)
    check_device_scalar("found_inf", found_inf, step_state.device)
    _, beta1, beta2, _, _ = check_hyper(0.0, beta1, beta2, 1.0, 0.0)
    new = torch.stack([step_state[0] + 1.0, step_state[1] * beta1, step_state[2] * beta2])
    if found_inf is not None:
        new = torch.where(found_inf.reshape(()) != 0, step_state, new)
    step_state.copy_(new)


def grad_sq_norm(tables: TorchTables, grads: Sequence[torch.Tensor], partials: torch.Tensor) -> None:
    """Per-tensor fp32 sums of squares of the raw gradients into ``partials[:num_chunks]``; the rest is
    zeroed, so ``partials.sum()`` is the group's squared norm."""
    check_grads(grads, tables.shapes, tables.device)
    check_partials(partials, tables.device, tables.num_chunks)
    sums = torch.stack([g.float().square().sum() for g in grads])
    partials[: tables.num_chunks].copy_(sums)
    if partials.numel() > tables.num_chunks:
        partials[tables.num_chunks:].zero_()


def _fp32(x: float) -> float:
    """``x`` rounded to fp32, as a Python float (the kernels receive lr as an fp32 argument)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root (IEEE, as the kernels' ``sqrt_rn``).

    torch's vectorized CPU ``sqrt`` is off by one ulp on ~20% of fp32 inputs; the fp64 square root
    rounded to fp32 is exact (53 >= 2 * 24 + 2 bits). CUDA's fp32 sqrt is already correctly rounded.
    """
    if x.device.type == "cpu":
        return x.double().sqrt_().float()
    return x.sqrt()


def round_bf16_stochastic(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 -> bf16, rounding the magnitude up with probability (dropped bits) / 2^16."""
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, dtype=torch.int32, device=x.device)
    # int32 wraps like the kernel's uint32: adding below the kept bits moves the magnitude away from 0
    rounded = (bits + noise) >> 16
    out = rounded.to(torch.int16).view(torch.bfloat16)
    return torch.where(torch.isnan(x), torch.full_like(out, float("nan")), out)


def fused_adamw_step(
    tables: TorchTables,
    grads: Sequence[torch.Tensor],
    master_flat: Optional[torch.Tensor],
    exp_avg_flat: torch.Tensor,
    exp_avg_sq_flat: torch.Tensor,
    step_state: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    stochastic_rounding: bool = False,
    seed: int = 0,
    exp_avg_scale: Optional[torch.Tensor] = None,
    exp_avg_sq_scale: Optional[torch.Tensor] = None,
) -> None:
    """One AdamW step per tensor, the kernels' arithmetic in the kernels' order (torch AdamW's), for
    every state format (8-bit: dequantize, update, requantize, as the kernels do; the weight's step
    multiplies by ``1 / sqrt(1 - beta2^t)`` there, as the 8-bit kernel does)."""
    lr, beta1, beta2, eps, weight_decay = check_hyper(lr, beta1, beta2, eps, weight_decay)
    quantized = check_state(tables, master_flat, exp_avg_flat, exp_avg_sq_flat, exp_avg_scale, exp_avg_sq_scale)
    check_step_state(step_state)
    if step_state.device != tables.device:
        raise ValueError(f"step_state is on {step_state.device}, the weights on {tables.device}")
    check_device_scalar("grad_scale", grad_scale, tables.device)
    check_device_scalar("found_inf", found_inf, tables.device)
    seed = check_seed(seed)
    check_grads(grads, tables.shapes, tables.device)

    neg_step_size = (-(_fp32(lr) / (1.0 - step_state[1]))).float()
    bc2_sqrt = (1.0 - step_state[2]).sqrt().float()
    inv_bc2_sqrt = 1.0 / bc2_sqrt if quantized else None  # the 8-bit kernel's form of the step
    decay_factor = 1.0 - lr * weight_decay
    keep = None if found_inf is None else found_inf.reshape(()) == 0
    stochastic = bool(stochastic_rounding) and tables.dtype == torch.bfloat16
    generator = None
    if stochastic:
        generator = torch.Generator(device=tables.device)
        generator.manual_seed(seed % (1 << 63))
    for w, g, sl, decay in zip(tables.weights, grads, tables.slices(), tables.decay):
        p_old = master_flat[sl] if master_flat is not None else w.reshape(-1).float()
        if quantized:
            m_codes, m_scale = _quant_views(tables, sl, exp_avg_flat, exp_avg_scale)
            v_codes, v_scale = _quant_views(tables, sl, exp_avg_sq_flat, exp_avg_sq_scale)
            m_old = dequantize(m_codes, m_scale, signed_map(tables.device))
            v_old = dequantize(v_codes, v_scale, unsigned_map(tables.device))
        else:
            m_old, v_old = exp_avg_flat[sl], exp_avg_sq_flat[sl]
        g = g.reshape(-1).float()
        if grad_scale is not None:
            g = g * grad_scale.reshape(())
        p = p_old * decay_factor if decay else p_old
        m = m_old + (1.0 - beta1) * (g - m_old)
        v = v_old * beta2 + ((1.0 - beta2) * g) * g
        # the 8-bit kernel multiplies by the inverse (its square root and division are approximate there)
        denom = (sqrt_rn(v) * inv_bc2_sqrt if quantized else sqrt_rn(v) / bc2_sqrt) + eps
        p = p + (neg_step_size * m) / denom
        if stochastic:
            w_new = round_bf16_stochastic(p, generator)
        else:
            w_new = p.to(w.dtype)
        w_new = w_new.view(w.shape)
        if quantized:
            _store_8bit(m, m_codes, m_scale, signed_map(tables.device), keep)
            _store_8bit(v, v_codes, v_scale, unsigned_map(tables.device), keep)
        else:
            if keep is not None:
                m, v = (torch.where(keep, new, old) for new, old in ((m, m_old), (v, v_old)))
            m_old.copy_(m)
            v_old.copy_(v)
        if master_flat is not None:
            p_old.copy_(p if keep is None else torch.where(keep, p, p_old))
        w.copy_(w_new if keep is None else torch.where(keep, w_new, w))


def _store_8bit(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, qmap: torch.Tensor,
                keep: Optional[torch.Tensor]) -> None:
    """Requantize ``x`` into ``codes`` / ``scales`` (unless ``keep`` is False: a skipped step)."""
    new_codes, new_scales = quantize(x, qmap)
    if keep is not None:
        new_codes, new_scales = torch.where(keep, new_codes, codes), torch.where(keep, new_scales, scales)
    codes.copy_(new_codes)
    scales.copy_(new_scales)
