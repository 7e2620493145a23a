"""BlockTables / TorchTables: table contents, argument errors, and backend selection."""
from __future__ import annotations

import pytest
import torch

from _kernel_helpers import kdevice, make_block, random_grads  # noqa: F401  (kdevice is a fixture)
from badam_ext import kernels as K
from badam_ext import ops, torch_ops

TABLE_CLASSES = [pytest.param("triton", id="triton"), pytest.param("torch", id="torch")]


def _tables_cls(which: str):
    return K.BlockTables if which == "triton" else torch_ops.TorchTables


def test_chunk_table_maps_every_element_once(kdevice):
    block = make_block([(7,), (300,), (64, 3), (1,)], torch.bfloat16, kdevice)
    tables = K.BlockTables.build(block.weights, block.offsets, block.decay, block_size=128)
    assert tables.num_chunks == 1 + 3 + 2 + 1
    chunks = tables.chunks.cpu().tolist()
    assert chunks == [[0, 0], [1, 0], [1, 1], [1, 2], [2, 0], [2, 1], [3, 0]]
    meta = tables.meta.cpu()
    assert meta[:, 0].tolist() == [w.data_ptr() for w in block.weights]
    assert meta[:, 1].tolist() == block.offsets
    assert meta[:, 2].tolist() == [w.numel() for w in block.weights]
    assert meta[:, 3].tolist() == [int(d) for d in block.decay]
    assert tables.meta.dtype == torch.int64 and tables.meta.device == kdevice
    assert tables.span == block.offsets[-1] + 1


def test_default_block_size_is_a_power_of_two(kdevice):
    block = make_block([(5,)], torch.float32, kdevice)
    tables = K.BlockTables.build(block.weights, block.offsets, block.decay)
    assert tables.block_size >= 64 and tables.block_size & (tables.block_size - 1) == 0


def test_grad_pointers_gathers_addresses_and_dtype(kdevice):
    block = make_block([(7,), (33,)], torch.bfloat16, kdevice)
    tables = K.BlockTables.build(block.weights, block.offsets, block.decay)
    grads = random_grads(block, dtype=torch.float16)
    ptrs, dtype = tables.grad_pointers(grads)
    assert dtype == torch.float16
    assert ptrs.device == kdevice and ptrs.dtype == torch.int64
    assert ptrs.cpu().tolist() == [g.data_ptr() for g in grads]
    grads2 = random_grads(block, seed=9)
    assert tables.grad_pointers(grads2)[0].cpu().tolist() == [g.data_ptr() for g in grads2]


@pytest.mark.parametrize("which", TABLE_CLASSES)
def test_build_errors(which):
    cls = _tables_cls(which)
    if which == "triton" and not K.interpreted():
        pytest.skip("CPU tensors need the interpreter for the triton tables")
    w = [torch.randn(8), torch.randn(4)]
    with pytest.raises(ValueError, match="at least one"):
        cls.build([], [], [])
    with pytest.raises(TypeError, match="weight 1 has dtype torch.float64"):
        cls.build([w[0], torch.randn(4, dtype=torch.float64)], [0, 64], [True, True])
    with pytest.raises(TypeError, match="weight 1 has dtype torch.bfloat16, weight 0 torch.float32"):
        cls.build([w[0], w[1].bfloat16()], [0, 64], [True, True])
    with pytest.raises(ValueError, match="weight 0 .* not contiguous"):
        cls.build([torch.randn(4, 4).t(), w[1]], [0, 64], [True, True])
    with pytest.raises(ValueError, match="weight 1 is empty"):
        cls.build([w[0], torch.randn(0)], [0, 64], [True, True])
    with pytest.raises(TypeError, match="weight 0 is a list"):
        cls.build([[1.0, 2.0]], [0], [True])
    with pytest.raises(ValueError, match="offset 1 \\(65\\) is not a multiple of 64"):
        cls.build(w, [0, 65], [True, True])
    with pytest.raises(ValueError, match="offset 0 is negative"):
        cls.build(w, [-64, 64], [True, True])
    with pytest.raises(ValueError, match="got 1 offsets for 2 weights"):
        cls.build(w, [0], [True, True])
    with pytest.raises(ValueError, match="overlap"):
        cls.build([torch.randn(100), torch.randn(4)], [0, 64], [True, True])
    with pytest.raises(ValueError, match="got 1 decay flags for 2 weights"):
        cls.build(w, [0, 64], [True])
    with pytest.raises(TypeError, match="decay flag 1 must be a bool"):
        cls.build(w, [0, 64], [True, "no"])
    with pytest.raises(TypeError, match="offset 0 is a float"):
        cls.build(w, [0.0, 64], [True, True])


@pytest.mark.parametrize("bad", [0, 3, 100, 32, 1 << 17])
def test_block_size_errors(bad):
    if not K.interpreted():
        pytest.skip("CPU tensors need the interpreter for the triton tables")
    with pytest.raises(ValueError, match="power of two"):
        K.BlockTables.build([torch.randn(8)], [0], [True], block_size=bad)


@pytest.mark.parametrize("which", TABLE_CLASSES)
def test_grad_pointer_errors(which):
    cls = _tables_cls(which)
    if which == "triton" and not K.interpreted():
        pytest.skip("CPU tensors need the interpreter for the triton tables")
    w = [torch.randn(8), torch.randn(2, 3)]
    tables = cls.build(w, [0, 64], [True, False])
    good = [torch.randn(8), torch.randn(2, 3)]
    with pytest.raises(ValueError, match="got 1 gradients for 2 weights"):
        tables.grad_pointers(good[:1])
    with pytest.raises(ValueError, match="gradient 1 is None"):
        tables.grad_pointers([good[0], None])
    with pytest.raises(ValueError, match=r"gradient 1 has shape \(3, 2\), its weight \(2, 3\)"):
        tables.grad_pointers([good[0], torch.randn(3, 2)])
    with pytest.raises(ValueError, match="gradient 1 .* not contiguous"):
        tables.grad_pointers([good[0], torch.randn(3, 2).t()])
    with pytest.raises(TypeError, match="gradient 0 has dtype torch.int32"):
        tables.grad_pointers([torch.zeros(8, dtype=torch.int32), good[1]])
    with pytest.raises(TypeError, match="gradient 1 has dtype torch.float16, gradient 0 torch.float32"):
        tables.grad_pointers([good[0], good[1].half()])
    with pytest.raises(TypeError, match="gradient 0 is a ndarray"):
        tables.grad_pointers([good[0].numpy(), good[1]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grad_on_wrong_device_is_named():
    if K.interpreted():
        pytest.skip("TRITON_INTERPRET=1")
    w = [torch.randn(8, device="cuda")]
    tables = K.BlockTables.build(w, [0], [True])
    with pytest.raises(ValueError, match="gradient 0 is on cpu, its weight on cuda"):
        tables.grad_pointers([torch.randn(8)])
    with pytest.raises(ValueError, match="weight 1 is on cpu"):
        K.BlockTables.build([w[0], torch.randn(8)], [0, 64], [True, True])


def test_arena_region_errors():
    if not K.interpreted():
        pytest.skip("CPU tensors need the interpreter for the triton tables")
    tables = K.BlockTables.build([torch.randn(100)], [64], [True])
    good = torch.zeros(256)
    with pytest.raises(ValueError, match="master has 100 elements; the tables reach element 164"):
        K.block_load(tables, torch.zeros(100), good, good)
    with pytest.raises(TypeError, match="exp_avg must be float32"):
        K.block_load(tables, good, good.double(), good)
    with pytest.raises(ValueError, match="exp_avg_sq must be a contiguous 1-D tensor"):
        K.block_load(tables, good, good, torch.zeros(2, 128))
    with pytest.raises(ValueError, match="needs 1 \\(tables.num_chunks\\)"):
        K.grad_sq_norm(tables, [torch.randn(100)], torch.zeros(0))


def test_get_backend_selection(monkeypatch):
    assert ops.get_backend("torch", "cpu").name == "torch"
    assert ops.get_backend("auto", "cpu").name == "torch"
    assert ops.get_backend("torch", "cpu").BlockTables is torch_ops.TorchTables
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ops.get_backend("cuda", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1"):
        ops.get_backend("triton", "cpu")
    with pytest.raises(RuntimeError, match="not meta"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        ops.get_backend("triton", "meta")


def test_get_backend_triton_on_cpu_in_interpreter():
    if not K.interpreted():
        pytest.skip("needs TRITON_INTERPRET=1")
    backend = ops.get_backend("triton", "cpu")
    assert backend.name == "triton"
    assert backend.BlockTables is K.BlockTables
    assert backend.fused_adamw_step is K.fused_adamw_step


def test_triton_tables_refuse_cpu_without_interpreter(monkeypatch):
    from badam_ext.kernels import launch_config

    monkeypatch.setattr(launch_config, "interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="need a CUDA device; for CPU tensors set TRITON_INTERPRET=1"):
        K.BlockTables.build([torch.randn(8)], [0], [True])
