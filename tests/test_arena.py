"""Tests of the C++ block arena (badam_ext._C.BlockArena) and its Python wrapper.

Importing badam_ext.arena raises if the extension is not built: the module then fails to collect,
so a missing ``_C`` fails the suite instead of skipping it.
"""
from __future__ import annotations

import importlib
import re
import sys

import pytest
import torch

from badam_ext import _C
from badam_ext.arena import ArenaLayout, BlockArena, arena_for_blocks, required_capacity

CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
DEVICES = [
    pytest.param(torch.device("cpu"), id="cpu"),
    pytest.param(torch.device("cuda"), id="cuda", marks=gpu),
]
REGIONS = ["master", "exp_avg", "exp_avg_sq", "grad"]


def padded_total(numels: list[int], alignment_bytes: int = 256) -> int:
    """Reference for required_capacity: each parameter starts on an alignment boundary."""
    step = alignment_bytes // 4
    return sum(-(-n // step) * step for n in numels)


def other_device(device: torch.device) -> torch.device:
    """A device that differs from the arena's (meta on a CPU-only machine)."""
    return torch.device("meta") if device.type == "cpu" else torch.device("cpu")


def fill_random(arena: BlockArena, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Fill every region with random values and return clones of them."""
    saved = {}
    for name in REGIONS[: arena.num_regions]:
        region = arena.flat(name)
        values = torch.rand(region.numel(), generator=generator) + 0.5
        region.copy_(values)
        saved[name] = region.clone()
    return saved


def test_extension_is_compiled() -> None:
    assert _C.__file__ is not None and _C.__file__.endswith((".so", ".pyd"))
    assert BlockArena is _C.BlockArena and ArenaLayout is _C.ArenaLayout


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alignment", [4, 64, 256, 1024])
@pytest.mark.parametrize("with_grad", [False, True])
def test_offsets_and_regions_aligned(device: torch.device, alignment: int, with_grad: bool) -> None:
    numels = [7, 129, 1, 64, 300]
    arena = BlockArena(required_capacity(numels, alignment) + 3, device, with_grad, alignment)
    assert arena.alignment_bytes == alignment
    layout = arena.layout(numels)
    assert layout.numels == numels
    assert all(off % (alignment // 4) == 0 for off in layout.offsets)
    assert layout.total_numel == padded_total(numels, alignment)
    for name in REGIONS[: arena.num_regions]:
        assert arena.flat(name).data_ptr() % alignment == 0, name
    views = arena.views(layout, [[n] for n in numels])
    assert len(views) == arena.num_regions
    for region in views:
        assert [v.data_ptr() % alignment for v in region] == [0] * len(numels)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_grad", [False, True])
def test_regions_disjoint_inside_one_buffer(device: torch.device, with_grad: bool) -> None:
    arena = BlockArena(1000, device, with_grad=with_grad)
    assert arena.num_regions == (4 if with_grad else 3)
    buffer = arena.buffer()
    assert buffer.dtype == torch.float32 and buffer.dim() == 1
    assert buffer.numel() * 4 == arena.capacity_bytes
    regions_bytes = arena.num_regions * arena.capacity_padded * 4
    assert regions_bytes <= arena.capacity_bytes < regions_bytes + arena.alignment_bytes
    begin, end = buffer.data_ptr(), buffer.data_ptr() + arena.capacity_bytes
    spans = []
    for name in REGIONS[: arena.num_regions]:
        region = arena.flat(name)
        assert region.numel() == arena.capacity_numel == 1000
        assert region.dtype == torch.float32 and region.is_contiguous()
        assert region.device == arena.device
        assert region.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        lo, hi = region.data_ptr(), region.data_ptr() + region.numel() * 4
        assert begin <= lo and hi <= end
        assert all(hi <= a or lo >= b for a, b in spans), f"{name} overlaps another region"
        spans.append((lo, hi))


@pytest.mark.parametrize("device", DEVICES)
def test_views_alias_the_arena(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(0)
    arena = BlockArena(4096, device, with_grad=True)
    shapes = [[3, 5], [7, 11, 2], [], [1000]]
    numels = [15, 154, 1, 1000]
    layout = arena.layout(numels)
    views = arena.views(layout, shapes)
    assert len(views) == 4
    for r, name in enumerate(REGIONS):
        flat = arena.flat(name)
        for i, view in enumerate(views[r]):
            assert list(view.shape) == shapes[i]
            assert view.dtype == torch.float32 and view.device == arena.device
            # view -> flat
            values = torch.randn(shapes[i], generator=gen).to(device)
            view.copy_(values)
            span = flat[layout.offsets[i] : layout.offsets[i] + numels[i]]
            assert torch.equal(span, values.flatten())
            # flat -> view
            values = torch.randn(numels[i], generator=gen).to(device)
            span.copy_(values)
            assert torch.equal(view.flatten(), values)
    # Each region's last write survives: the regions do not overlap.
    snapshot = [[v.clone() for v in region] for region in views]
    arena.flat("grad").fill_(float("nan"))
    for r in range(3):
        assert all(torch.equal(a, b) for a, b in zip(views[r], snapshot[r]))


@pytest.mark.parametrize("device", DEVICES)
def test_many_switches_never_allocate(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(1)
    blocks = [
        [int(n) for n in torch.randint(1, 3000, (int(k),), generator=gen)]
        for k in torch.randint(1, 6, (12,), generator=gen)
    ]
    arena = BlockArena(max(required_capacity(b) for b in blocks), device)
    buffer_ptr = arena.buffer().data_ptr()
    storage_ptr = arena.buffer().untyped_storage().data_ptr()
    assert arena.used_bytes == 0 and arena.switches == 0
    if device.type == "cuda":
        torch.cuda.synchronize()
        stats_before = torch.cuda.memory_stats()["allocation.all.allocated"]
        allocated_before = torch.cuda.memory_allocated()
    for rnd in range(3):
        for numels in blocks:
            layout = arena.layout(numels)
            views = arena.views(layout, [[n] for n in numels])
            arena.zero_state(layout)
            assert arena.used_bytes == layout.total_numel * 4 * 3
            for region in views:
                assert {v.untyped_storage().data_ptr() for v in region} == {storage_ptr}
            assert arena.buffer().data_ptr() == buffer_ptr
            assert arena.allocations == 1
    assert arena.switches == 3 * len(blocks)
    if device.type == "cuda":
        torch.cuda.synchronize()
        assert torch.cuda.memory_stats()["allocation.all.allocated"] == stats_before
        assert torch.cuda.memory_allocated() == allocated_before


@pytest.mark.parametrize(
    "numels, match",
    [
        ([], "empty block: a block needs at least one parameter"),
        ([4, 5, 6, 0], "parameter 3 has numel 0; every parameter of a block needs numel >= 1"),
        ([-2], "parameter 0 has numel -2"),
        (
            [1234560],
            "block needs 1,234,560 elements (padded) but the arena holds 1,000,000: 234,560 over; "
            "create the arena with capacity_numel >= 1234560",
        ),
        ([999_999, 2], "block needs 1,000,064 elements (padded)"),
        ([2**62, 2**62], "block size overflows int64"),
    ],
)
def test_layout_errors(numels: list[int], match: str) -> None:
    arena = BlockArena(1_000_000, "cpu")
    with pytest.raises(ValueError, match=re.escape(match)):
        arena.layout(numels)


def test_largest_fitting_block_fits() -> None:
    arena = BlockArena(1_000_000, "cpu")
    assert arena.layout([1_000_000]).total_numel == 1_000_000
    assert arena.layout([999_936, 64]).total_numel == 1_000_000


def test_block_fits_when_its_last_parameter_does() -> None:
    """The alignment padding after the last parameter needs no capacity: a 1000-element arena takes
    a 1000-element block (padded to 1024, which the allocation holds), and not one element more."""
    arena = BlockArena(1000, "cpu")
    assert arena.capacity_padded == 1024
    layout = arena.layout([1000])
    assert layout.total_numel == 1024 and layout.offsets == [0]
    master, exp_avg, exp_avg_sq = arena.views(layout, [[10, 100]])
    assert master[0].numel() == arena.flat("master").numel() == 1000
    arena.zero_state(layout)
    assert arena.layout([900, 36]).offsets == [0, 960]  # ends at 996
    with pytest.raises(ValueError, match=re.escape(
            "block needs 1,024 elements (padded), 1,001 up to the end of its last parameter, but the arena "
            "holds 1,000: 1 over; create the arena with capacity_numel >= 1001")):
        arena.layout([1001])
    with pytest.raises(ValueError, match=re.escape("capacity_numel >= 1025")):
        arena.layout([999, 1])
    with pytest.raises(ValueError, match=re.escape(
            "views: the layout spans 1,024 elements but this arena holds 1,000 (its last parameter ends at "
            "element 1,001)")):
        arena.views(BlockArena(2000, "cpu").layout([1001]), [[1001]])


@pytest.mark.parametrize("capacity", [True, False, 10.0, "10", None])
def test_capacity_must_be_an_int(capacity) -> None:
    with pytest.raises(TypeError, match="capacity_numel must be an int, got"):
        BlockArena(capacity, "cpu")


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((0, "cpu"), {}, ValueError, "capacity_numel must be > 0, got 0"),
        ((-5, "cpu"), {}, ValueError, "capacity_numel must be > 0, got -5"),
        ((10, "cpu"), {"alignment_bytes": 2}, ValueError, "power of two >= 4"),
        ((10, "cpu"), {"alignment_bytes": 96}, ValueError, "power of two >= 4"),
        ((10, "cpu"), {"alignment_bytes": 0}, ValueError, "got 0"),
        ((10, "meta"), {}, ValueError, "supports cpu and cuda devices, got meta"),
        ((10, 3), {}, TypeError, "device must be a torch.device or a string"),
        ((10, "gpu7"), {}, RuntimeError, "gpu7"),
    ],
)
def test_constructor_errors(args: tuple, kwargs: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=re.escape(match)):
        BlockArena(*args, **kwargs)


@pytest.mark.skipif(CUDA, reason="checks the error raised without CUDA")
def test_cuda_arena_without_cuda_errors() -> None:
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        BlockArena(10, "cuda:0")


@pytest.mark.parametrize("device", [torch.device("cpu"), "cpu"])
def test_device_accepts_torch_device_and_string(device) -> None:
    arena = BlockArena(10, device)
    assert arena.device == torch.device("cpu")
    assert isinstance(arena.device, torch.device)


@pytest.mark.parametrize(
    "make_layout, shapes, match",
    [
        ("own", [[6]], "views: got 1 shapes for a layout of 2 parameters"),
        ("own", [[2, 3], [3, 3]], "shape [3, 3] of parameter 1 has 9 elements but the layout gives it 10"),
        ("own", [[-2, -3], [10]], "shape [-2, -3] of parameter 0 has a negative size"),
        ("foreign", [[6], [10]], "views: the layout was made by another BlockArena"),
        ("bigger", [[1500]], "views: the layout spans 1,536 elements but this arena holds 1,024"),
    ],
)
def test_views_errors(make_layout: str, shapes: list, match: str) -> None:
    arena = BlockArena(1024, "cpu")
    if make_layout == "own":
        layout = arena.layout([6, 10])
    elif make_layout == "foreign":
        layout = BlockArena(1024, "cpu").layout([6, 10])
    else:
        layout = BlockArena(4096, "cpu").layout([1500])
    with pytest.raises(ValueError, match=re.escape(match)):
        arena.views(layout, shapes)
    assert arena.switches == 0 and arena.used_bytes == 0


def test_foreign_layout_rejected_everywhere() -> None:
    arena = BlockArena(1024, "cpu")
    foreign = BlockArena(1024, "cpu").layout([6])
    with pytest.raises(ValueError, match="zero_state: the layout was made by another BlockArena"):
        arena.zero_state(foreign)
    with pytest.raises(ValueError, match="check_tensors: the layout was made by another BlockArena"):
        arena.check_tensors(foreign, [torch.zeros(6)])


@pytest.mark.parametrize(
    "with_grad, name, match",
    [
        (False, "grad", "flat('grad'): this arena has no grad region (create it with with_grad=True)"),
        (True, "momentum", "flat: unknown region 'momentum'; expected one of master, exp_avg"),
        (False, "", "flat: unknown region ''"),
    ],
)
def test_flat_errors(with_grad: bool, name: str, match: str) -> None:
    arena = BlockArena(100, "cpu", with_grad=with_grad)
    with pytest.raises(ValueError, match=re.escape(match)):
        arena.flat(name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_grad", [False, True])
def test_zero_state_zeros_only_moments_over_the_span(device: torch.device, with_grad: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    arena = BlockArena(2000, device, with_grad=with_grad)
    saved = {k: v.cpu() for k, v in fill_random(arena, gen).items()}
    layout = arena.layout([100, 301])  # offsets 0, 128; span 448
    assert layout.total_numel == 448
    arena.zero_state(layout)
    span = layout.total_numel
    for name in ("exp_avg", "exp_avg_sq"):
        region = arena.flat(name).cpu()
        assert torch.count_nonzero(region[:span]) == 0
        assert torch.equal(region[span:], saved[name][span:])
    assert torch.equal(arena.flat("master").cpu(), saved["master"])
    if with_grad:
        assert torch.equal(arena.flat("grad").cpu(), saved["grad"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "case, exc, match",
    [
        ("count", ValueError, "check_tensors: got 1 tensors for a layout of 2 parameters"),
        ("float64", TypeError, "check_tensors: tensor 1 has dtype float64; supported dtypes are"),
        ("int32", TypeError, "check_tensors: tensor 0 has dtype int32"),
        ("numel", ValueError, "check_tensors: tensor 1 has 11 elements but the layout gives it 10"),
        ("device", ValueError, "check_tensors: tensor 0 is on {other} but the arena is on {arena}"),
    ],
)
def test_check_tensors_errors(device: torch.device, case: str, exc: type, match: str) -> None:
    arena = BlockArena(1024, device)
    layout = arena.layout([6, 10])
    good = [torch.zeros(2, 3, device=device), torch.zeros(10, device=device)]
    tensors = {
        "count": good[:1],
        "float64": [good[0], good[1].double()],
        "int32": [good[0].int(), good[1]],
        "numel": [good[0], torch.zeros(11, device=device)],
        "device": [torch.zeros(6, device=other_device(device)), good[1]],
    }[case]
    match = match.format(other=other_device(device), arena=arena.device)
    with pytest.raises(exc, match=re.escape(match)):
        arena.check_tensors(layout, tensors)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_check_tensors_accepts_supported_dtypes(device: torch.device, dtype: torch.dtype) -> None:
    arena = BlockArena(1024, device)
    layout = arena.layout([6, 10])
    arena.check_tensors(layout, [torch.zeros(3, 2, dtype=dtype, device=device),
                                 torch.zeros(5, 2, dtype=dtype, device=device)])


RELEASED_CALLS = {
    "layout": lambda a, l: a.layout([4]),
    "views": lambda a, l: a.views(l, [[100]]),
    "flat": lambda a, l: a.flat("master"),
    "buffer": lambda a, l: a.buffer(),
    "zero_state": lambda a, l: a.zero_state(l),
    "check_tensors": lambda a, l: a.check_tensors(l, [torch.zeros(100)]),
}


@pytest.mark.parametrize("call", sorted(RELEASED_CALLS))
def test_release_then_use_errors(call: str) -> None:
    arena = BlockArena(512, "cpu", with_grad=True)
    layout = arena.layout([100])
    (master, *_), *_ = arena.views(layout, [[100]])
    master.fill_(3.0)
    arena.release()
    arena.release()  # a second release is a no-op
    assert arena.released and arena.used_bytes == 0
    assert "released" in repr(arena)
    with pytest.raises(RuntimeError, match=re.escape("BlockArena used after release()")):
        RELEASED_CALLS[call](arena, layout)
    # A view handed out before release keeps its storage alive.
    assert torch.all(master == 3.0)


def test_stats_are_read_only() -> None:
    arena = BlockArena(100, "cpu")
    for name in ("capacity_numel", "capacity_bytes", "used_bytes", "allocations", "switches",
                 "device", "alignment_bytes", "with_grad", "released", "num_regions"):
        getattr(arena, name)
        with pytest.raises(AttributeError):
            setattr(arena, name, 1)


def test_stats_and_reprs() -> None:
    arena = BlockArena(1000, "cpu", with_grad=True, alignment_bytes=512)
    assert (arena.capacity_numel, arena.alignment_bytes, arena.with_grad) == (1000, 512, True)
    assert arena.capacity_padded == 1024 and arena.allocations == 1 and not arena.released
    layout = arena.layout([5, 200, 129])
    assert len(layout) == 3
    assert layout.offsets == [0, 128, 384]
    assert layout.numels == [5, 200, 129]
    assert layout.total_numel == 640
    arena.views(layout, [[5], [10, 20], [129]])
    assert arena.switches == 1 and arena.used_bytes == 640 * 4 * 4
    assert repr(layout) == "ArenaLayout(params=3, total_numel=640, offsets=[0, 128, 384], numels=[5, 200, 129])"
    text = repr(arena)
    for part in ("device=cpu", "capacity_numel=1000", "regions=[master, exp_avg, exp_avg_sq, grad]",
                 "alignment_bytes=512", f"capacity_bytes={arena.capacity_bytes}",
                 f"used_bytes={640 * 16}", "switches=1", "allocations=1"):
        assert part in text
    long = BlockArena(1000, "cpu").layout([1] * 12)
    assert "... (4 more)" in repr(long)


@pytest.mark.parametrize("alignment", [4, 8, 64, 256, 4096])
def test_required_capacity_matches_reference(alignment: int) -> None:
    gen = torch.Generator().manual_seed(alignment)
    for _ in range(20):
        numels = [int(n) for n in torch.randint(1, 5000, (int(torch.randint(1, 8, (1,), generator=gen)),), generator=gen)]
        assert required_capacity(numels, alignment) == padded_total(numels, alignment)
    assert required_capacity([1]) == 64


@pytest.mark.parametrize(
    "numels, alignment, match",
    [([], 256, "empty block"), ([3, 0], 256, "parameter 1 has numel 0"), ([3], 24, "power of two")],
)
def test_required_capacity_errors(numels: list[int], alignment: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        required_capacity(numels, alignment)


@pytest.mark.parametrize("device", DEVICES)
def test_arena_for_blocks_sizes_for_the_largest_block(device: torch.device) -> None:
    blocks = [
        [torch.empty(10, 10), torch.empty(7)],
        [torch.empty(65, 3), torch.empty(1), torch.empty(300)],  # the largest: 256 + 64 + 320
        [torch.empty(500, dtype=torch.bfloat16)],
    ]
    arena = arena_for_blocks(blocks, device, with_grad=True)
    assert arena.capacity_numel == 640 == max(padded_total([t.numel() for t in b]) for b in blocks)
    assert arena.with_grad and arena.num_regions == 4
    assert arena.device.type == device.type
    for block in blocks:
        arena.views(arena.layout([t.numel() for t in block]), [list(t.shape) for t in block])
    assert arena.switches == 3
    assert arena_for_blocks(blocks, device, alignment_bytes=4).capacity_numel == 500


@pytest.mark.parametrize(
    "blocks, exc, match",
    [
        ([], ValueError, "arena_for_blocks: no blocks given"),
        ([[torch.empty(3)], []], ValueError, "arena_for_blocks: block 1: empty block"),
        ([[torch.empty(3), torch.empty(0)]], ValueError, "block 0: parameter 1 has numel 0"),
        ([[torch.empty(3), [1.0]]], TypeError, "block 0 item 1 is a list, not a torch.Tensor"),
    ],
)
def test_arena_for_blocks_errors(blocks: list, exc: type, match: str) -> None:
    with pytest.raises(exc, match=re.escape(match)):
        arena_for_blocks(blocks, "cpu")


def test_missing_extension_raises_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "badam_ext._C", None)  # makes `import badam_ext._C` fail
    monkeypatch.delitem(sys.modules, "badam_ext.arena")
    with pytest.raises(ImportError, match=re.escape("pip install --no-build-isolation -e .")):
        importlib.import_module("badam_ext.arena")
