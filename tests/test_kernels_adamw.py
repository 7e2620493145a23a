"""The fused AdamW step against a float64 reference, and against the torch backend."""
from __future__ import annotations

from typing import Optional

import pytest
import torch

from _kernel_helpers import (  # noqa: F401  (kdevice is a fixture)
    DTYPES,
    LOW_PRECISION,
    Block,
    adamw_reference,
    assert_close_rel,
    kdevice,
    make_block,
    random_grads,
    randomize_state,
    ulp_distance,
)
from badam_ext import kernels as K
from badam_ext import torch_ops

SHAPES = [(1,), (7,), (4097,), (33, 65)]
HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
RTOL = 1e-6


class Float64Block:
    """The float64 twin of a block's master / m / v, stepped with the reference."""

    def __init__(self, block: Block):
        self.p = [r.double().cpu() for r in block.region_views(block.master)]
        self.m = [r.double().cpu() for r in block.region_views(block.exp_avg)]
        self.v = [r.double().cpu() for r in block.region_views(block.exp_avg_sq)]
        self.decay = block.decay

    def step(self, grads, t: int, lr: float, grad_scale: float = 1.0) -> None:
        for i, g in enumerate(grads):
            self.p[i], self.m[i], self.v[i] = adamw_reference(
                self.p[i], self.m[i], self.v[i], g.cpu(), t=t, lr=lr, decay=self.decay[i],
                grad_scale=grad_scale, **HYPER,
            )


def _check_block(block: Block, ref: Float64Block, what: str) -> None:
    for i, (w, p, m, v) in enumerate(zip(block.weights, *(block.region_views(r) for r in block.regions))):
        assert_close_rel(p, ref.p[i], RTOL, f"{what}: master {i}")
        assert_close_rel(m, ref.m[i], RTOL, f"{what}: exp_avg {i}")
        assert_close_rel(v, ref.v[i], RTOL, f"{what}: exp_avg_sq {i}")
        # the weight is exactly the kernel's own master rounded (torch's RNE); a 16-bit weight is
        # within one ulp of the float64 reference rounded (an fp32 one is the master, checked above)
        assert torch.equal(w, p.to(w.dtype)), f"{what}: weight {i} is not master.to({w.dtype})"
        if w.dtype in LOW_PRECISION:
            assert int(ulp_distance(w, ref.p[i].to(w.dtype)).max()) <= 1, f"{what}: weight {i} off by > 1 ulp"
    pad = block.padding_mask()
    for region in block.regions:
        assert region[pad].isnan().all(), f"{what}: padding was written"


def _step(backend, tables, grads, block: Block, state, lr: float, **kw) -> None:
    backend.fused_adamw_step(tables, grads, *block.regions, state, lr=lr, **HYPER, **kw)


@pytest.mark.parametrize("grad_dtype", [None, torch.float32], ids=["grad=weight", "grad=fp32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_steps_match_float64(kdevice, dtype, grad_dtype):
    block = make_block(SHAPES, dtype, kdevice, decay=[True, False, True, False], seed=11)
    tables = K.BlockTables.build(block.weights, block.offsets, block.decay, block_size=1024)
    randomize_state(block, seed=12)
    ref = Float64Block(block)
    state = K.new_step_state(kdevice)
    lrs = [1e-3, 3e-3, 5e-4]  # lr changes between steps
    for t, lr in enumerate(lrs, start=1):
        grads = random_grads(block, dtype=grad_dtype, seed=100 + t)
        for w in block.weights:
            w.fill_(float("nan"))  # poison: every weight element must be written by the step
        K.advance_step(state, HYPER["beta1"], HYPER["beta2"])
        _step(K, tables, grads, block, state, lr)
        ref.step(grads, t, lr)
        _check_block(block, ref, f"step {t}")


def test_default_block_size_and_one_big_chunk(kdevice):
    block = make_block([(4097,), (1,), (2, 300)], torch.bfloat16, kdevice, seed=13)
    tables = K.BlockTables.build(block.weights, block.offsets, block.decay)
    randomize_state(block, seed=14)
    ref = Float64Block(block)
    state = K.new_step_state(kdevice)
    grads = random_grads(block, seed=15)
    K.advance_step(state, HYPER["beta1"], HYPER["beta2"])
    _step(K, tables, grads, block, state, 2e-3)
    ref.step(grads, 1, 2e-3)
    _check_block(block, ref, "default block size")


def test_grad_scale_and_found_inf(kdevice):
    block = make_block(SHAPES, torch.bfloat16, kdevice, seed=16)
    tables = K.BlockTables.build(block.weights, block.offsets, block.decay, block_size=512)
    randomize_state(block, seed=17)
    ref = Float64Block(block)
    state = K.new_step_state(kdevice)
    scale = torch.tensor([0.125], device=kdevice)
    found = torch.zeros((), device=kdevice)
    grads = random_grads(block, seed=18, scale=8.0)
    K.advance_step(state, HYPER["beta1"], HYPER["beta2"], found)
    _step(K, tables, grads, block, state, 1e-3, grad_scale=scale, found_inf=found)
    ref.step(grads, 1, 1e-3, grad_scale=0.125)
    _check_block(block, ref, "grad_scale")

    # found_inf != 0: nothing is written, the step state does not advance
    found.fill_(1.0)
    snapshot = [r.clone() for r in block.regions] + [w.clone() for w in block.weights]
    state_before = state.clone()
    K.advance_step(state, HYPER["beta1"], HYPER["beta2"], found)
    _step(K, tables, random_grads(block, seed=19), block, state, 1e-3, grad_scale=scale, found_inf=found)
    assert torch.equal(state, state_before)
    for before, after in zip(snapshot, list(block.regions) + block.weights):
        assert torch.equal(before.nan_to_num(7.0), after.nan_to_num(7.0)), "found_inf must skip every write"

    # and the next clean step continues from t = 2
    found.fill_(0.0)
    grads = random_grads(block, seed=20)
    K.advance_step(state, HYPER["beta1"], HYPER["beta2"], found)
    _step(K, tables, grads, block, state, 1e-3, found_inf=found)
    ref.step(grads, 2, 1e-3)
    _check_block(block, ref, "after skip")


def test_unaligned_weights_and_grads(kdevice):
    """Weights and grads that are views at odd element offsets: no vector-width promise, same results."""
    block = make_block([(4097,), (300,)], torch.bfloat16, kdevice, seed=37)
    storage = [torch.empty(w.numel() + 1, dtype=w.dtype, device=kdevice) for w in block.weights]
    for i, (buf, w) in enumerate(zip(storage, block.weights)):
        buf[1:].copy_(w.flatten())
        block.weights[i] = buf[1:].view(w.shape)
    tables = K.BlockTables.build(block.weights, block.offsets, block.decay, block_size=1024)
    assert not tables.weights_aligned
    K.block_load(tables, *block.regions)
    for w, master in zip(block.weights, block.region_views(block.master)):
        assert torch.equal(master, w.float())
    randomize_state(block, seed=38)
    ref = Float64Block(block)
    grads = [torch.empty(g.numel() + 3, dtype=g.dtype, device=kdevice)[3:].view(g.shape).copy_(g)
             for g in random_grads(block, seed=39)]
    assert tables.gather_grads(grads)[2] is False
    partials = torch.empty(tables.num_chunks, device=kdevice)
    K.grad_sq_norm(tables, grads, partials)
    ref_sq = sum(float(g.double().square().sum()) for g in grads)
    assert abs(float(partials.double().sum()) - ref_sq) <= 1e-6 * ref_sq
    state = K.new_step_state(kdevice)
    K.advance_step(state, HYPER["beta1"], HYPER["beta2"])
    _step(K, tables, grads, block, state, 1e-3)
    ref.step(grads, 1, 1e-3)
    _check_block(block, ref, "unaligned")


def test_weight_decay_flags_are_per_tensor(kdevice):
    """Zero gradients and zero moments: only the decay moves a master, and only where flagged."""
    block = make_block([(7,), (7,)], torch.float32, kdevice, decay=[True, False], seed=21)
    tables = K.BlockTables.build(block.weights, block.offsets, block.decay)
    randomize_state(block, seed=22)
    for region in (block.exp_avg, block.exp_avg_sq):
        for sl in block.spans():
            region[sl] = 0.0
    before = [p.clone() for p in block.region_views(block.master)]
    state = K.new_step_state(kdevice)
    K.advance_step(state, HYPER["beta1"], HYPER["beta2"])
    grads = [torch.zeros_like(w) for w in block.weights]
    _step(K, tables, grads, block, state, 0.5)
    p0, p1 = block.region_views(block.master)
    assert torch.equal(p0, before[0] * (1.0 - 0.5 * HYPER["weight_decay"]))
    assert torch.equal(p1, before[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_torch_backend(kdevice, dtype):
    """Same inputs through both backends: fp32 state bit-exact, weights within one ulp (bit-exact on CPU)."""
    blocks = [make_block(SHAPES, dtype, kdevice, seed=23) for _ in range(2)]
    for b in blocks:
        randomize_state(b, seed=24)
    tables = K.BlockTables.build(blocks[0].weights, blocks[0].offsets, blocks[0].decay, block_size=1024)
    ttables = torch_ops.TorchTables.build(blocks[1].weights, blocks[1].offsets, blocks[1].decay)
    states = [K.new_step_state(kdevice), torch_ops.new_step_state(kdevice)]
    scale = torch.tensor(0.5, device=kdevice)
    for t in range(1, 4):
        grads = random_grads(blocks[0], seed=30 + t)
        K.advance_step(states[0], HYPER["beta1"], HYPER["beta2"])
        torch_ops.advance_step(states[1], HYPER["beta1"], HYPER["beta2"])
        _step(K, tables, grads, blocks[0], states[0], 1e-3 * t, grad_scale=scale)
        _step(torch_ops, ttables, grads, blocks[1], states[1], 1e-3 * t, grad_scale=scale)
    assert torch.equal(states[0], states[1])
    for a, b in zip(blocks[0].regions, blocks[1].regions):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), "fp32 state differs between backends"
    for wa, wb in zip(blocks[0].weights, blocks[1].weights):
        assert int(ulp_distance(wa, wb).max()) <= (0 if kdevice.type == "cpu" else 1)


def test_torch_backend_matches_float64():
    """The oracle itself against the float64 reference (CPU, no triton involved)."""
    block = make_block(SHAPES, torch.bfloat16, torch.device("cpu"), decay=[False, True, True, False], seed=25)
    tables = torch_ops.TorchTables.build(block.weights, block.offsets, block.decay)
    randomize_state(block, seed=26)
    ref = Float64Block(block)
    state = torch_ops.new_step_state("cpu")
    found = torch.zeros(1)
    for t in range(1, 4):
        grads = random_grads(block, seed=40 + t)
        torch_ops.advance_step(state, HYPER["beta1"], HYPER["beta2"], found)
        _step(torch_ops, tables, grads, block, state, 1e-3, found_inf=found)
        ref.step(grads, t, 1e-3)
        _check_block(block, ref, f"torch backend step {t}")


@pytest.mark.parametrize("backend", [K, torch_ops], ids=["triton", "torch"])
def test_stochastic_rounding_in_step_brackets_master_and_is_unbiased(kdevice, backend):
    block = make_block([(40000,)], torch.bfloat16, kdevice, seed=27)
    tables = backend.BlockTables.build(block.weights, block.offsets, block.decay)
    randomize_state(block, seed=28)
    state = backend.new_step_state(kdevice)
    backend.advance_step(state, HYPER["beta1"], HYPER["beta2"])
    grads = random_grads(block, seed=29)
    _step(backend, tables, grads, block, state, 1e-3, stochastic_rounding=True, seed=123)
    w = block.weights[0].float().cpu()
    p = block.region_views(block.master)[0].cpu()
    down = p.view(torch.int32).bitwise_and(~0xFFFF).view(torch.float32)  # truncation toward zero
    up = (down.view(torch.int32) + 0x10000).view(torch.float32)
    assert ((w == down) | (w == up)).all(), "stochastic rounding must pick one of the two bf16 neighbours"
    frac = ((p - down) / (up - down)).double()  # probability of rounding away from zero
    rounded_up = (w == up).double()
    inexact = frac > 0
    n = int(inexact.sum())
    # sum of (indicator - probability) over independent draws: mean 0, variance sum p(1-p)
    z = float((rounded_up - frac)[inexact].sum()) / float((frac * (1 - frac))[inexact].sum().sqrt())
    assert abs(z) < 5.0, f"stochastic rounding biased: z = {z:.2f} over {n} elements"
    assert 0.05 < float(rounded_up[inexact].mean()) < 0.95
    # deterministic for a seed, different for another
    again = make_block([(40000,)], torch.bfloat16, kdevice, seed=27)
    randomize_state(again, seed=28)
    state2 = backend.new_step_state(kdevice)
    backend.advance_step(state2, HYPER["beta1"], HYPER["beta2"])
    tables2 = backend.BlockTables.build(again.weights, again.offsets, again.decay)
    _step(backend, tables2, grads, again, state2, 1e-3, stochastic_rounding=True, seed=123)
    assert torch.equal(again.weights[0], block.weights[0])
    _step(backend, tables2, grads, again, state2, 0.0, stochastic_rounding=True, seed=124)
    assert not torch.equal(again.weights[0], block.weights[0])


def test_stochastic_flag_is_ignored_for_fp16(kdevice):
    block = make_block([(300,)], torch.float16, kdevice, seed=31)
    tables = K.BlockTables.build(block.weights, block.offsets, block.decay)
    randomize_state(block, seed=32)
    state = K.new_step_state(kdevice)
    K.advance_step(state, HYPER["beta1"], HYPER["beta2"])
    _step(K, tables, random_grads(block, seed=33), block, state, 1e-3, stochastic_rounding=True, seed=5)
    assert torch.equal(block.weights[0], block.region_views(block.master)[0].half())


def test_step_argument_errors(kdevice):
    block = make_block([(7,)], torch.bfloat16, kdevice)
    tables = K.BlockTables.build(block.weights, block.offsets, block.decay)
    state = K.new_step_state(kdevice)
    grads = random_grads(block)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        _step(K, tables, grads, block, state, -1.0)
    with pytest.raises(ValueError, match="grad_scale must be a one-element float32"):
        _step(K, tables, grads, block, state, 1e-3, grad_scale=torch.ones(1, dtype=torch.float64, device=kdevice))
    with pytest.raises(TypeError, match="seed must be an int"):
        _step(K, tables, grads, block, state, 1e-3, seed=1.5)
    with pytest.raises(ValueError, match="step_state must be a contiguous float64"):
        _step(K, tables, grads, block, torch.zeros(3, device=kdevice), 1e-3)
    with pytest.raises(ValueError, match="gradient 0 is None"):
        _step(K, tables, [None], block, state, 1e-3)


def _jit_cache_size(kernel) -> Optional[int]:
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        return None
    return sum(len(entry[0]) for entry in caches.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_changing_lr_and_seed_does_not_recompile():
    if K.interpreted():
        pytest.skip("TRITON_INTERPRET=1: nothing is compiled")
    from badam_ext.kernels import adamw, step_state

    device = torch.device("cuda")
    block = make_block(SHAPES, torch.bfloat16, device, seed=34)
    tables = K.BlockTables.build(block.weights, block.offsets, block.decay)
    randomize_state(block, seed=35)
    state = K.new_step_state(device)
    grads = random_grads(block, seed=36)
    K.advance_step(state, 0.9, 0.999)
    _step(K, tables, grads, block, state, 1e-3, stochastic_rounding=True, seed=1)
    size, adv = _jit_cache_size(adamw._fused_adamw_kernel), _jit_cache_size(step_state._advance_kernel)
    assert size is not None and size >= 1, "cannot read the jit cache of this triton version"
    for i, lr in enumerate([2e-3, 1.0, 0.0, 5e-5, 1e-3]):
        K.advance_step(state, 0.9 - 0.1 * i, 0.999 - 0.001 * i)
        _step(K, tables, grads, block, state, lr, stochastic_rounding=True, seed=[16, 2**40, 17, 0, 2**31 - 1][i])
    torch.cuda.synchronize()
    assert _jit_cache_size(adamw._fused_adamw_kernel) == size
    assert _jit_cache_size(step_state._advance_kernel) == adv
