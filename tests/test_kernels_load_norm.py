"""block_load, the step state and the gradient norm, against exact / float64 expectations."""
from __future__ import annotations

import math

import pytest
import torch

from _kernel_helpers import DTYPES, kdevice, make_block, random_grads, rel_err  # noqa: F401  (kdevice is a fixture)
from badam_ext import kernels as K
from badam_ext import ops, torch_ops
from badam_ext.kernels import norm

SHAPES = [(1,), (7,), (4097,), (33, 65)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_load_upcasts_exactly_and_zeroes_state(kdevice, dtype):
    block = make_block(SHAPES, dtype, kdevice, seed=3)
    tables = K.BlockTables.build(block.weights, block.offsets, block.decay, block_size=1024)
    K.block_load(tables, *block.regions)
    for w, master, m, v in zip(block.weights, *(block.region_views(r) for r in block.regions)):
        assert torch.equal(master, w.float()), "master must be the exact fp32 upcast of the weight"
        assert torch.equal(m, torch.zeros_like(m)) and torch.equal(v, torch.zeros_like(v))
    pad = block.padding_mask()
    for region in block.regions:
        assert region[pad].isnan().all(), "padding between tensors must stay untouched"


@pytest.mark.parametrize("chunks, warps", [(1, None), (2, None), (4, 1), (8, None), (8, 2)])
def test_block_load_programs_of_several_chunks(kdevice, chunks, warps):
    """Programs of several chunks (at the tables' warps or others): spans inside one tensor, spans
    across tensors, a last partial program; every element written once, padding untouched."""
    shapes = [(1,), (64,), (65,), (300,), (7, 19), (129,)]  # 1, 1, 2, 5, 3, 3 chunks of 64
    block = make_block(shapes, torch.bfloat16, kdevice, seed=5)
    tables = K.BlockTables.build(block.weights, block.offsets, block.decay, block_size=64)
    K.block_load(tables, *block.regions, chunks=chunks, num_warps=warps)
    for w, master, m, v in zip(block.weights, *(block.region_views(r) for r in block.regions)):
        assert torch.equal(master, w.float())
        assert torch.equal(m, torch.zeros_like(m)) and torch.equal(v, torch.zeros_like(v))
    pad = block.padding_mask()
    for region in block.regions:
        assert region[pad].isnan().all(), "padding between tensors must stay untouched"


def test_block_load_programs_cover_the_measured_elements():
    from badam_ext.kernels.switch_load import chunks_per_program

    assert chunks_per_program(512) == 1 and chunks_per_program(256) == 2 and chunks_per_program(4096) == 1
    assert chunks_per_program(256, quantized=True) == 8 and chunks_per_program(2048, quantized=True) == 1


@pytest.mark.parametrize("chunks", [0, 3, -2, 2.0, True])
def test_block_load_refuses_bad_chunks_per_program(chunks):
    block = make_block([(5,)], torch.bfloat16, torch.device("cpu"), seed=6)
    tables = K.BlockTables.build(block.weights, block.offsets, block.decay, block_size=64)
    with pytest.raises(ValueError, match="chunks per block-load program"):
        K.block_load(tables, *block.regions, chunks=chunks)


@pytest.mark.parametrize("warps", [0, 3, 64, 2.0, True])
def test_block_load_refuses_bad_warps_per_program(warps):
    block = make_block([(5,)], torch.bfloat16, torch.device("cpu"), seed=6)
    tables = K.BlockTables.build(block.weights, block.offsets, block.decay, block_size=64)
    with pytest.raises(ValueError, match="warps per block-load program"):
        K.block_load(tables, *block.regions, num_warps=warps)


def test_block_load_matches_torch_backend(kdevice):
    block = make_block([(4097,), (5,)], torch.bfloat16, kdevice, seed=4)
    ref = make_block([(4097,), (5,)], torch.bfloat16, kdevice, seed=4)
    K.block_load(K.BlockTables.build(block.weights, block.offsets, block.decay), *block.regions)
    torch_ops.block_load(torch_ops.TorchTables.build(ref.weights, ref.offsets, ref.decay), *ref.regions)
    for a, b in zip(block.regions, ref.regions):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


@pytest.mark.parametrize("backend", [K, torch_ops], ids=["triton", "torch"])
def test_advance_step_exact_powers_and_skip(kdevice, backend):
    beta1, beta2 = 0.9, 0.999
    state = backend.new_step_state(kdevice)
    assert state.dtype == torch.float64 and state.cpu().tolist() == [0.0, 1.0, 1.0]
    b1p, b2p = 1.0, 1.0
    found = torch.zeros(1, device=kdevice)
    for t in range(1, 6):
        backend.advance_step(state, beta1, beta2, found if t % 2 else None)
        b1p, b2p = b1p * beta1, b2p * beta2  # the same fp64 products, in the same order
        assert state.cpu().tolist() == [float(t), b1p, b2p]
    found.fill_(1.0)
    before = state.clone()
    backend.advance_step(state, beta1, beta2, found)
    assert torch.equal(state, before), "found_inf != 0 must leave the step state unchanged"
    backend.reset_step_state(state)
    assert state.cpu().tolist() == [0.0, 1.0, 1.0]


def test_advance_step_errors(kdevice):
    state = K.new_step_state(kdevice)
    with pytest.raises(ValueError, match="beta1 must be in \\[0, 1\\)"):
        K.advance_step(state, 1.0, 0.999)
    with pytest.raises(ValueError, match="float64 tensor"):
        K.advance_step(state.float(), 0.9, 0.999)
    with pytest.raises(ValueError, match="found_inf must be a one-element float32"):
        K.advance_step(state, 0.9, 0.999, torch.zeros(2, device=kdevice))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_sq_norm_matches_float64(kdevice, dtype):
    block = make_block(SHAPES, torch.bfloat16, kdevice, seed=5)
    tables = K.BlockTables.build(block.weights, block.offsets, block.decay, block_size=512)
    grads = random_grads(block, dtype=dtype, seed=6)
    partials = torch.full((tables.num_chunks + 3,), float("nan"), device=kdevice)
    K.grad_sq_norm(tables, grads, partials)
    programs = norm.num_partials(tables)
    assert torch.isfinite(partials).all()
    assert torch.equal(partials[programs:], torch.zeros(tables.num_chunks + 3 - programs, device=kdevice))
    ref = sum(float(g.double().square().sum()) for g in grads)
    assert abs(float(partials.double().sum()) - ref) <= 1e-6 * ref
    # each partial is the sum over exactly the elements of its program's consecutive chunks
    chunk_sums = [float(c.square().sum()) for g in grads for c in g.double().flatten().split(512)]
    per = norm.chunks_per_program(512)
    assert per == 4 and programs == -(-len(chunk_sums) // per)
    want = torch.tensor([sum(chunk_sums[i:i + per]) for i in range(0, len(chunk_sums), per)], dtype=torch.float64)
    assert rel_err(partials[:programs].double().cpu(), want) <= 1e-6


def test_grad_norm_over_groups_matches_float64_and_torch_backend(kdevice):
    a = make_block([(4097,), (3, 5)], torch.bfloat16, kdevice, seed=7)
    b = make_block([(100,)], torch.float32, kdevice, seed=8)
    ga, gb = random_grads(a, seed=9), random_grads(b, seed=10)
    ta = K.BlockTables.build(a.weights, a.offsets, a.decay)
    tb = K.BlockTables.build(b.weights, b.offsets, b.decay)
    norm = ops.grad_norm(K, [ta, tb], [ga, gb])
    assert norm.dim() == 0 and norm.dtype == torch.float32 and norm.device == kdevice
    ref = math.sqrt(sum(float(g.double().square().sum()) for g in ga + gb))
    assert abs(float(norm) - ref) <= 1e-6 * ref
    tnorm = ops.grad_norm(
        torch_ops, [torch_ops.TorchTables.build(a.weights, a.offsets, a.decay), torch_ops.TorchTables.build(b.weights, b.offsets, b.decay)],
        [ga, gb],
    )
    assert abs(float(tnorm) - ref) <= 1e-6 * ref
    with pytest.raises(ValueError, match="got 2 tables for 1 gradient lists"):
        ops.grad_norm(K, [ta, tb], [ga])
