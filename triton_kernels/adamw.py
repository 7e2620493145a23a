"""The fused AdamW step: one pass over a launch group, one launch, for every state format.

Reads the gradient (its dtype), the master (fp32, or the weight itself without a master) and the
moments (fp32, or 8-bit codes with an fp32 absmax per block of 256, dequantized in registers);
writes them back (requantizing 8-bit moments from the new fp32 values) and the weight in its own
dtype. The arithmetic follows torch's single-tensor AdamW in order and rounding (IEEE division and
square root, no fused multiply-add):

    p = p * (1 - lr * wd)                     (flagged tensors only)
    m = m + (1 - beta1) * (g - m)             (torch: m.lerp_(g, 1 - beta1))
    v = v * beta2 + ((1 - beta2) * g) * g
    denom = sqrt(v) / sqrt(1 - beta2^t) + eps
    p = p + (-(lr / (1 - beta1^t)) * m) / denom

8-bit moments: m and v exactly so (their codes depend on nothing else); the weight's step is
``sqrt(v) * (1 / sqrt(1 - beta2^t)) + eps`` with the hardware's approximate square root and a
reciprocal-and-multiply division on a GPU, its bias corrections from fp32 ``1 - beta^t`` by the
hardware's reciprocal and reciprocal square root (a few ulps of the step), since that kernel is bound
by instructions and gathers, not bytes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from .chunk_map import as_pointer, program_chunk
from ..contract import check_device_scalar, check_hyper, check_seed, check_state, check_step_state
from ..states.quant import QUANT_BLOCK, codebook
from .launch_config import GPU_BUILD, device_guard
from .prefetch import prefetch_chunk
from .quant import dequantize_rows, quantize_rows
from .rounding import to_weight_dtype
from .tables import TL_DTYPES, BlockTables, align_hint

_SEED_BITS = 31  # each half of the seed stays an int32 argument: no new compilation per seed


@triton.jit
def _adamw_moments(g, m, v, grad_scale, beta2, one_minus_beta1, one_minus_beta2, HAS_SCALE: tl.constexpr):
    """The new m and v of the module docstring on fp32 registers; every format shares them exactly."""
    if HAS_SCALE:
        g = g * grad_scale
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + (one_minus_beta2 * g) * g
    return m, v


@triton.jit
def _adamw_update(g, p, m, v, grad_scale, p_scale, beta2, one_minus_beta1, one_minus_beta2, eps, neg_step_size,
                  bc2_sqrt, HAS_SCALE: tl.constexpr):
    """The AdamW arithmetic of the module docstring on fp32 registers (fp32 moments: IEEE throughout)."""
    m, v = _adamw_moments(g, m, v, grad_scale, beta2, one_minus_beta1, one_minus_beta2, HAS_SCALE)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p * p_scale + tl.div_rn(neg_step_size * m, denom)
    return p, m, v


@triton.jit
def _adamw_update_8bit(g, p, m, v, grad_scale, p_scale, beta2, one_minus_beta1, one_minus_beta2, eps, neg_step_size,
                       inv_bc2_sqrt, HAS_SCALE: tl.constexpr):
    """The 8-bit formats' update: the same moments (their codes depend on nothing else), the weight's
    step by the hardware's approximate square root and a reciprocal-and-multiply division (a few
    ulps of the step; zero where the denominator exceeds 2^126; fewer instructions in a kernel
    bound by instructions, not bytes). The Triton interpreter evaluates both exactly, as the torch
    twin does."""
    m, v = _adamw_moments(g, m, v, grad_scale, beta2, one_minus_beta1, one_minus_beta2, HAS_SCALE)
    denom = tl.sqrt(v) * inv_bc2_sqrt + eps
    if GPU_BUILD:  # the reciprocal-and-multiply division
        step = libdevice.fast_dividef(neg_step_size * m, denom)
    else:
        step = tl.div_rn(neg_step_size * m, denom)  # the interpreter only: IEEE, as the twin
    p = p * p_scale + step
    return p, m, v


@triton.jit
def _bias_corrections(state_ptr, lr):
    """(-(lr / (1 - beta1^t)), sqrt(1 - beta2^t)) in fp32 from the fp64 powers (1 - beta^t, the
    quotient and the square root in fp64, each rounded once), as torch computes its Python-float
    scalars."""
    bc1 = 1.0 - tl.load(state_ptr + 1)
    bc2 = 1.0 - tl.load(state_ptr + 2)
    neg_step_size = (-(tl.cast(lr, tl.float64) / bc1)).to(tl.float32)
    return neg_step_size, tl.sqrt(bc2).to(tl.float32)  # fp64 sqrt is correctly rounded


@triton.jit
def _bias_corrections_8bit(state_ptr, lr):
    """(-(lr / (1 - beta1^t)), 1 / sqrt(1 - beta2^t)) in fp32 for the 8-bit formats' weight step. On a
    GPU from fp32 ``1 - beta^t`` with the hardware's reciprocal and reciprocal square root (a few
    ulps; the fp64 division and square root cost a one-warp program about 40 instructions, a
    twentieth of its work); the interpreter computes the torch twin's exact values."""
    if GPU_BUILD:
        bc1 = (1.0 - tl.load(state_ptr + 1)).to(tl.float32)
        bc2 = (1.0 - tl.load(state_ptr + 2)).to(tl.float32)
        return libdevice.fast_dividef(-lr, bc1), tl.rsqrt(bc2)
    else:
        neg_step_size, bc2_sqrt = _bias_corrections(state_ptr, lr)
        return neg_step_size, tl.div_rn(1.0, bc2_sqrt)


@triton.jit
def _adamw_chunk(w_ptr, g_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, start, numel, arena_offset,
                 grad_scale, p_scale, beta2, one_minus_beta1, one_minus_beta2, eps, neg_step_size, bc2_sqrt,
                 seed, BLOCK: tl.constexpr, MASKED: tl.constexpr, HAS_SCALE: tl.constexpr,
                 W_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, HAS_MASTER: tl.constexpr):
    idx = start + tl.arange(0, BLOCK)
    mask = idx < numel if MASKED else None
    # Every byte is read once: cached in L2 only (".cg"), which the H200 runs at 97.7% of its copy
    # bandwidth against 96.6% with evict-first loads through L1 (bench/RESULTS.md, round 8).
    g = tl.load(g_ptr + idx, mask=mask, cache_modifier=".cg").to(tl.float32)
    if HAS_MASTER:
        p = tl.load(master_ptr + idx, mask=mask, cache_modifier=".cg")
    else:
        p = tl.load(w_ptr + idx, mask=mask).to(tl.float32)
    m = tl.load(exp_avg_ptr + idx, mask=mask, cache_modifier=".cg")
    v = tl.load(exp_avg_sq_ptr + idx, mask=mask, cache_modifier=".cg")
    p, m, v = _adamw_update(g, p, m, v, grad_scale, p_scale, beta2, one_minus_beta1, one_minus_beta2, eps,
                            neg_step_size, bc2_sqrt, HAS_SCALE)
    if HAS_MASTER:
        tl.store(master_ptr + idx, p, mask=mask)
    tl.store(exp_avg_ptr + idx, m, mask=mask)
    tl.store(exp_avg_sq_ptr + idx, v, mask=mask)
    # The random stream is indexed by arena position: unique per element of the block, per seed.
    w = to_weight_dtype(p, seed, arena_offset + idx, W_DTYPE, STOCHASTIC)
    tl.store(w_ptr + idx, w, mask=mask)


@triton.jit
def _load(ptr, mask, MASKED: tl.constexpr):
    """A stream's load, cached in L2 only (".cg"), that yields 0 outside ``mask`` (masked chunks only).
    L1 is left to the codebook gathers: with the L2 prefetch the step runs 0.919 ms against 0.935 with
    evict-first loads through L1 (bench/RESULTS.md, round 12)."""
    if MASKED:
        return tl.load(ptr, mask=mask, other=0, cache_modifier=".cg")
    else:
        return tl.load(ptr, cache_modifier=".cg")


@triton.jit
def _adamw_chunk_8bit(w_ptr, g_ptr, master_ptr, m_codes_ptr, m_scale_ptr, v_codes_ptr, v_scale_ptr,
                      m_map_ptr, v_map_ptr, start, numel, arena_offset,
                      grad_scale, p_scale, beta2, one_minus_beta1, one_minus_beta2, eps, neg_step_size,
                      inv_bc2_sqrt, seed, BLOCK: tl.constexpr, MASKED: tl.constexpr, HAS_SCALE: tl.constexpr,
                      W_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, HAS_MASTER: tl.constexpr,
                      QBLOCK: tl.constexpr):
    # One row per quantization block: chunks start on whole blocks (BLOCK is a multiple of QBLOCK).
    rows = tl.arange(0, BLOCK // QBLOCK)
    idx = start + rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    qrow = start // QBLOCK + rows
    mask = idx < numel
    row_mask = start + rows * QBLOCK < numel
    g = _load(g_ptr + idx, mask, MASKED).to(tl.float32)
    if HAS_MASTER:
        p = _load(master_ptr + idx, mask, MASKED)
    else:
        p = _load(w_ptr + idx, mask, MASKED).to(tl.float32)
    m = dequantize_rows(_load(m_codes_ptr + idx, mask, MASKED), _load(m_scale_ptr + qrow, row_mask, MASKED),
                        m_map_ptr)
    v = dequantize_rows(_load(v_codes_ptr + idx, mask, MASKED), _load(v_scale_ptr + qrow, row_mask, MASKED),
                        v_map_ptr)
    p, m, v = _adamw_update_8bit(g, p, m, v, grad_scale, p_scale, beta2, one_minus_beta1, one_minus_beta2, eps,
                                 neg_step_size, inv_bc2_sqrt, HAS_SCALE)
    store_mask = mask if MASKED else None
    store_row_mask = row_mask if MASKED else None
    # The weight first: its registers are free again before the encoders need theirs
    if HAS_MASTER:
        tl.store(master_ptr + idx, p, mask=store_mask)
    w = to_weight_dtype(p, seed, arena_offset + idx, W_DTYPE, STOCHASTIC)
    tl.store(w_ptr + idx, w, mask=store_mask)
    if MASKED:  # elements past the tensor must not count in their block's absmax
        m = tl.where(mask, m, 0.0)
        v = tl.where(mask, v, 0.0)
    m_codes, m_absmax = quantize_rows(m, m_map_ptr, True)
    v_codes, v_absmax = quantize_rows(v, v_map_ptr, False)
    tl.store(m_codes_ptr + idx, m_codes, mask=store_mask)
    tl.store(v_codes_ptr + idx, v_codes, mask=store_mask)
    tl.store(m_scale_ptr + qrow, m_absmax, mask=store_row_mask)
    tl.store(v_scale_ptr + qrow, v_absmax, mask=store_row_mask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _fused_adamw_kernel(meta_ptr, chunk_ptr, grad_table_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr,
                        exp_avg_scale_ptr, exp_avg_sq_scale_ptr, m_map_ptr, v_map_ptr,
                        state_ptr, grad_scale_ptr, found_inf_ptr,
                        lr, decay_factor, beta2, one_minus_beta1, one_minus_beta2, eps, seed_lo, seed_hi,
                        W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, W_ALIGN: tl.constexpr,
                        G_ALIGN: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                        STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr,
                        # the state format: one specialization each, no runtime branches in the loop
                        HAS_MASTER: tl.constexpr, QUANT: tl.constexpr, QBLOCK: tl.constexpr,
                        PREFETCH: tl.constexpr):
    if HAS_FOUND_INF:
        run = tl.load(found_inf_ptr) == 0
    else:
        run = True
    if run:
        tid, start, w_addr, offset, numel, decay = program_chunk(meta_ptr, chunk_ptr, BLOCK)
        w_ptr = as_pointer(w_addr, W_DTYPE, W_ALIGN)
        g_ptr = as_pointer(tl.load(grad_table_ptr + tid), G_DTYPE, G_ALIGN)
        if HAS_SCALE:
            grad_scale = tl.load(grad_scale_ptr)
        else:
            grad_scale = 1.0
        # multiplying by 1.0 leaves non-decayed tensors exact
        p_scale = tl.where(decay != 0, decay_factor, 1.0)
        seed = (seed_hi.to(tl.int64) << 31) | seed_lo.to(tl.int64)
        p_base = master_ptr + offset
        m_base = exp_avg_ptr + offset
        v_base = exp_avg_sq_ptr + offset
        # Before this program's own loads: the program PREFETCH chunks ahead then finds its streams in
        # L2 (the 8-bit step's one-warp programs hold too few loads in flight to hide DRAM latency)
        prefetch_chunk((g_ptr, p_base if HAS_MASTER else w_ptr, m_base, v_base), start, numel, BLOCK, PREFETCH)
        if QUANT:
            # 4-byte accesses to the codes: 4 per thread, the fp32 streams' register layout (16-byte
            # code vectors would give the tile a second layout, converted through shared memory)
            m_base = tl.multiple_of(m_base, 4)
            v_base = tl.multiple_of(v_base, 4)
            ms_base = exp_avg_scale_ptr + offset // QBLOCK
            vs_base = exp_avg_sq_scale_ptr + offset // QBLOCK
            neg_step_size, inv_bc2_sqrt = _bias_corrections_8bit(state_ptr, lr)
            if start + BLOCK <= numel:
                _adamw_chunk_8bit(w_ptr, g_ptr, p_base, m_base, ms_base, v_base, vs_base, m_map_ptr, v_map_ptr,
                                  start, numel, offset, grad_scale, p_scale, beta2, one_minus_beta1,
                                  one_minus_beta2, eps, neg_step_size, inv_bc2_sqrt, seed,
                                  BLOCK, False, HAS_SCALE, W_DTYPE, STOCHASTIC, HAS_MASTER, QBLOCK)
            else:
                _adamw_chunk_8bit(w_ptr, g_ptr, p_base, m_base, ms_base, v_base, vs_base, m_map_ptr, v_map_ptr,
                                  start, numel, offset, grad_scale, p_scale, beta2, one_minus_beta1,
                                  one_minus_beta2, eps, neg_step_size, inv_bc2_sqrt, seed,
                                  BLOCK, True, HAS_SCALE, W_DTYPE, STOCHASTIC, HAS_MASTER, QBLOCK)
        else:
            neg_step_size, bc2_sqrt = _bias_corrections(state_ptr, lr)
            if start + BLOCK <= numel:
                _adamw_chunk(w_ptr, g_ptr, p_base, m_base, v_base, start, numel, offset, grad_scale, p_scale,
                             beta2, one_minus_beta1, one_minus_beta2, eps, neg_step_size, bc2_sqrt, seed,
                             BLOCK, False, HAS_SCALE, W_DTYPE, STOCHASTIC, HAS_MASTER)
            else:
                _adamw_chunk(w_ptr, g_ptr, p_base, m_base, v_base, start, numel, offset, grad_scale, p_scale,
                             beta2, one_minus_beta1, one_minus_beta2, eps, neg_step_size, bc2_sqrt, seed,
                             BLOCK, True, HAS_SCALE, W_DTYPE, STOCHASTIC, HAS_MASTER)


def split_seed(seed: int) -> tuple[int, int]:
    """Seed reduced to 62 bits, as two non-negative 31-bit halves (each an int32 kernel argument)."""
    seed = check_seed(seed) % (1 << (2 * _SEED_BITS))
    return seed & ((1 << _SEED_BITS) - 1), seed >> _SEED_BITS


def fused_adamw_step(
    tables: BlockTables,
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
    """One AdamW step over the launch group in one launch (see the module docstring for the math).

    The state format follows from the regions: fp32 ``exp_avg`` / ``exp_avg_sq``, or uint8 codes
    with their fp32 absmax regions ``exp_avg_scale`` / ``exp_avg_sq_scale`` (8-bit; tables built
    with a block size that is a multiple of 256); ``master_flat`` None updates the weights directly.
    ``step_state`` must already hold this step's ``t`` (call :func:`advance_step` first).
    ``grad_scale`` (fp32 device scalar) multiplies the gradients; ``found_inf`` (fp32 device scalar)
    nonzero skips the whole step on device. ``stochastic_rounding`` applies to bf16 weights only;
    ``seed`` (reduced to 62 bits) should change every step.
    """
    lr, beta1, beta2, eps, weight_decay = check_hyper(lr, beta1, beta2, eps, weight_decay)
    quantized = check_state(tables, master_flat, exp_avg_flat, exp_avg_sq_flat, exp_avg_scale, exp_avg_sq_scale)
    if quantized:
        check_quant_block(tables)
    check_step_state(step_state)
    if step_state.device != tables.device:
        raise ValueError(f"step_state is on {step_state.device}, the weights on {tables.device}")
    check_device_scalar("grad_scale", grad_scale, tables.device)
    check_device_scalar("found_inf", found_inf, tables.device)
    seed_lo, seed_hi = split_seed(seed)
    table, g_dtype, g_aligned = tables.gather_grads(grads)
    stochastic = bool(stochastic_rounding) and tables.dtype == torch.bfloat16
    # unused pointers (no master, no scales, no maps) get a region of the right device as placeholder
    master = master_flat if master_flat is not None else exp_avg_flat
    # a register cap is a compile option: pass it only when configured (one compilation per cap)
    options = {} if tables.step_max_registers is None else {"maxnreg": tables.step_max_registers}
    m_map = codebook(True, tables.device) if quantized else exp_avg_flat
    v_map = codebook(False, tables.device) if quantized else exp_avg_flat
    with device_guard(tables.device):
        _fused_adamw_kernel[(tables.num_chunks,)](
            tables.meta, tables.chunks, table, master, exp_avg_flat, exp_avg_sq_flat,
            exp_avg_scale if quantized else exp_avg_flat, exp_avg_sq_scale if quantized else exp_avg_flat,
            m_map, v_map, step_state,
            grad_scale if grad_scale is not None else master,
            found_inf if found_inf is not None else master,
            lr, 1.0 - lr * weight_decay, beta2, 1.0 - beta1, 1.0 - beta2, eps, seed_lo, seed_hi,
            W_DTYPE=TL_DTYPES[tables.dtype], G_DTYPE=TL_DTYPES[g_dtype], W_ALIGN=align_hint(tables.weights_aligned, tables.dtype),
            G_ALIGN=align_hint(g_aligned, g_dtype), HAS_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
            STOCHASTIC=stochastic, BLOCK=tables.block_size, HAS_MASTER=master_flat is not None, QUANT=quantized,
            QBLOCK=QUANT_BLOCK, PREFETCH=tables.step_prefetch, num_warps=tables.num_warps, enable_fp_fusion=False,
            **options,
        )


def check_quant_block(tables: BlockTables) -> None:
    """8-bit moments: every program must cover whole quantization blocks."""
    if tables.block_size % QUANT_BLOCK:
        raise ValueError(f"8-bit moments need tables whose block size is a multiple of {QUANT_BLOCK}; these "
                         f"have {tables.block_size} (build them with min_block_size={QUANT_BLOCK})")
