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
from badam_ext.arena import ArenaLayout, BlockArena, StateSpec, required_capacity
from badam_ext.states import ALIGNMENT_BYTES, FP32, QUANT_BLOCK, STATE_FORMATS, is_quantized, state_spec

CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
DEVICES = [
    pytest.param(torch.device("cpu"), id="cpu"),
    pytest.param(torch.device("cuda"), id="cuda", marks=gpu),
]
REGIONS = ["master", "exp_avg", "exp_avg_sq"]
SPECS = {f"{states}-{'master' if master else 'nomaster'}": state_spec(states, master)
         for states in STATE_FORMATS for master in (True, False)}


def padded_total(numels: list[int], align_elems: int = ALIGNMENT_BYTES // 4) -> int:
    """Reference for required_capacity: each parameter starts on an alignment boundary."""
    return sum(-(-n // align_elems) * align_elems for n in numels)


def other_device(device: torch.device) -> torch.device:
    """A device that differs from the arena's (meta on a CPU-only machine)."""
    return torch.device("meta") if device.type == "cpu" else torch.device("cpu")


def fill_random(arena: BlockArena, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Fill every region with random bytes and return clones of them."""
    saved = {}
    for name in arena.spec.region_names:
        region = arena.flat(name).view(torch.uint8)
        region.copy_(torch.randint(0, 256, (region.numel(),), generator=generator, dtype=torch.uint8))
        saved[name] = region.clone()
    return saved


def test_extension_is_compiled() -> None:
    assert _C.__file__ is not None and _C.__file__.endswith((".so", ".pyd"))
    assert BlockArena is _C.BlockArena and ArenaLayout is _C.ArenaLayout
    assert ALIGNMENT_BYTES == _C.ALIGNMENT_BYTES == 256


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_offsets_and_regions_aligned(device: torch.device, spec_name: str) -> None:
    spec = SPECS[spec_name]
    numels = [7, 129, 1, 64, 300, 257]
    arena = BlockArena(required_capacity(numels, spec) + 3, device, spec)
    align = spec.element_alignment
    assert align == (QUANT_BLOCK if is_quantized(spec) else ALIGNMENT_BYTES // 4)
    layout = arena.layout(numels)
    assert layout.numels == numels
    assert all(off % align == 0 for off in layout.offsets)
    assert layout.total_numel == padded_total(numels, align)
    for name in spec.region_names:
        assert arena.flat(name).data_ptr() % ALIGNMENT_BYTES == 0, name
        assert arena.flat(name).dtype == spec.dtype(name)
    views = arena.views(layout, [[n] for n in numels])
    assert list(views) == spec.region_names
    for name, region in views.items():
        block = spec.block(name)
        for view, n in zip(region, numels):
            assert view.dtype == spec.dtype(name)
            assert view.numel() == -(-n // block)
            if block == 1:
                assert view.data_ptr() % ALIGNMENT_BYTES == 0, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_regions_disjoint_inside_one_buffer(device: torch.device, spec_name: str) -> None:
    spec = SPECS[spec_name]
    arena = BlockArena(1000, device, spec)
    assert arena.num_regions == len(spec.region_names)
    buffer = arena.buffer()
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1
    assert buffer.numel() == arena.capacity_bytes == spec.bytes(1000) + ALIGNMENT_BYTES - 1
    begin, end = buffer.data_ptr(), buffer.data_ptr() + arena.capacity_bytes
    spans = []
    for name in spec.region_names:
        region = arena.flat(name)
        assert region.numel() == spec.items(name, 1000)
        assert region.is_contiguous() and region.device == arena.device
        assert region.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        lo, hi = region.data_ptr(), region.data_ptr() + region.numel() * region.element_size()
        assert begin <= lo and hi <= end
        assert all(hi <= a or lo >= b for a, b in spans), f"{name} overlaps another region"
        spans.append((lo, hi))


def test_spec_bytes_per_format() -> None:
    """What the optimizer asks the arena for: bytes per format, each region padded to the alignment."""
    n = 4096
    assert SPECS["fp32-master"].bytes(n) == 12 * n
    assert SPECS["fp32-nomaster"].bytes(n) == 8 * n
    assert SPECS["8bit-master"].bytes(n) == 6 * n + 2 * ALIGNMENT_BYTES  # 16 scales each, padded
    assert SPECS["8bit-nomaster"].bytes(n) == 2 * n + 2 * ALIGNMENT_BYTES
    assert SPECS["8bit-master"].bytes(2**20) == 6 * 2**20 + 2 * 4 * 2**20 // QUANT_BLOCK
    assert SPECS["fp32-master"].bytes(1) == 3 * ALIGNMENT_BYTES
    assert SPECS["fp32-master"] == FP32 == StateSpec.fp32() and SPECS["8bit-master"] != FP32
    assert repr(SPECS["8bit-master"]).startswith("StateSpec('8bit', [master: float32, exp_avg: uint8, "
                                                  "exp_avg_scale: float32 per 256")


@pytest.mark.parametrize(
    "name, regions, exc, match",
    [
        ("x", [], ValueError, "a state needs at least one region"),
        ("", [("a", torch.float32, 1)], ValueError, "the name must not be empty"),
        ("x", [("a", torch.float32, 1), ("a", torch.uint8, 1)], ValueError, "region 'a' appears twice"),
        ("x", [("a", torch.float64, 1)], TypeError, "region 'a' has dtype float64"),
        ("x", [("a", torch.float32, 3)], ValueError, "region 'a' has block 3"),
        ("x", [("a", torch.float32, 0)], ValueError, "has block 0"),
        ("x", [("a", torch.float32)], ValueError, "each region is (name, dtype, block)"),
    ],
)
def test_spec_errors(name: str, regions: list, exc: type, match: str) -> None:
    with pytest.raises(exc, match=re.escape(match)):
        StateSpec(name, regions)


@pytest.mark.parametrize("device", DEVICES)
def test_views_alias_the_arena(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(0)
    arena = BlockArena(4096, device)
    shapes = [[3, 5], [7, 11, 2], [], [1000]]
    numels = [15, 154, 1, 1000]
    layout = arena.layout(numels)
    views = arena.views(layout, shapes)
    assert list(views) == REGIONS
    for name in REGIONS:
        flat = arena.flat(name)
        for i, view in enumerate(views[name]):
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
    snapshot = {name: [v.clone() for v in views[name]] for name in REGIONS}
    arena.flat("exp_avg_sq").fill_(float("nan"))
    for name in REGIONS[:2]:
        assert all(torch.equal(a, b) for a, b in zip(views[name], snapshot[name]))


@pytest.mark.parametrize("device", DEVICES)
def test_quantized_views_own_their_blocks(device: torch.device) -> None:
    """8-bit: each parameter's codes and scales are its own (offsets are whole quantization blocks)."""
    spec = SPECS["8bit-master"]
    numels = [1, 255, 257, 512]
    arena = BlockArena(required_capacity(numels, spec), device, spec)
    layout = arena.layout(numels)
    assert layout.offsets == [0, 256, 512, 1024]
    views = arena.views(layout, [[n] for n in numels])
    for i, view in enumerate(views["exp_avg_scale"]):
        view.fill_(float(i + 1))
    scales = arena.flat("exp_avg_scale").cpu()
    assert scales[:6].tolist() == [1.0, 2.0, 3.0, 3.0, 4.0, 4.0]
    for i, view in enumerate(views["exp_avg"]):
        view.fill_(i + 10)
    codes = arena.flat("exp_avg").cpu()
    for i, (off, n) in enumerate(zip(layout.offsets, numels)):
        assert torch.all(codes[off:off + n] == i + 10)


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
            assert arena.used_bytes == layout.total_numel * 4 * 3
            for region in views.values():
                assert {v.untyped_storage().data_ptr() for v in region} == {storage_ptr}
            assert arena.buffer().data_ptr() == buffer_ptr
            assert arena.allocations == 1
    assert arena.switches == 3 * len(blocks)
    if device.type == "cuda":
        torch.cuda.synchronize()
        assert torch.cuda.memory_stats()["allocation.all.allocated"] == stats_before
        assert torch.cuda.memory_allocated() == allocated_before


@pytest.mark.parametrize("device", DEVICES)
def test_growth_is_counted_as_an_allocation(device: torch.device) -> None:
    """The counter counts real allocations: a grown arena reports two, and the device agrees."""
    arena = BlockArena(1000, device)
    small = arena.layout([1000])
    old = arena.views(small, [[1000]])["master"][0]
    old.fill_(2.0)
    if device.type == "cuda":
        torch.cuda.synchronize()
        allocs_before = torch.cuda.memory_stats()["allocation.all.allocated"]
    assert arena.reserve(1000) is False and arena.allocations == 1
    assert arena.reserve(5000) is True
    assert arena.allocations == 2 and arena.capacity_numel == 5000 and arena.used_bytes == 0
    assert arena.capacity_bytes == FP32.bytes(5000) + ALIGNMENT_BYTES - 1
    if device.type == "cuda":
        assert torch.cuda.memory_stats()["allocation.all.allocated"] == allocs_before + 1
    with pytest.raises(ValueError, match="views: the layout was made by another BlockArena, or by this one "
                                         "before it grew"):
        arena.views(small, [[1000]])
    arena.views(arena.layout([5000]), [[5000]])
    assert torch.all(old == 2.0)  # a view handed out before the growth keeps the old memory alive
    assert "allocations=2" in repr(arena)
    with pytest.raises(ValueError, match="reserve: capacity_numel must be > 0"):
        arena.reserve(0)


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
    master = arena.views(layout, [[10, 100]])["master"]
    assert master[0].numel() == arena.flat("master").numel() == 1000
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
        ((10, "cpu"), {"spec": "fp32"}, TypeError, "spec must be a StateSpec (badam_ext.states.state_spec()) or None, got <class 'str'>"),
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
    with pytest.raises(ValueError, match="check_tensors: the layout was made by another BlockArena"):
        arena.check_tensors(foreign, [torch.zeros(6)])


@pytest.mark.parametrize(
    "spec, name, match",
    [
        (None, "grad", "flat: unknown region 'grad'; the 'fp32' state has master, exp_avg, exp_avg_sq"),
        ("8bit-nomaster", "master", "flat: unknown region 'master'; the '8bit-nomaster' state has exp_avg, "
                                    "exp_avg_scale, exp_avg_sq, exp_avg_sq_scale"),
        (None, "", "flat: unknown region ''"),
    ],
)
def test_flat_errors(spec, name: str, match: str) -> None:
    arena = BlockArena(100, "cpu", SPECS[spec] if spec else None)
    with pytest.raises(ValueError, match=re.escape(match)):
        arena.flat(name)


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
    "reserve": lambda a, l: a.reserve(10_000),
    "check_tensors": lambda a, l: a.check_tensors(l, [torch.zeros(100)]),
}


@pytest.mark.parametrize("call", sorted(RELEASED_CALLS))
def test_release_then_use_errors(call: str) -> None:
    arena = BlockArena(512, "cpu")
    layout = arena.layout([100])
    (master,) = arena.views(layout, [[100]])["master"]
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
                 "device", "spec", "released", "num_regions"):
        getattr(arena, name)
        with pytest.raises(AttributeError):
            setattr(arena, name, 1)


def test_stats_and_reprs() -> None:
    spec = SPECS["8bit-master"]
    arena = BlockArena(1000, "cpu", spec)
    assert arena.capacity_numel == 1000 and arena.spec == spec
    assert arena.capacity_padded == 1024 and arena.allocations == 1 and not arena.released
    layout = arena.layout([5, 200, 257])
    assert len(layout) == 3
    assert layout.offsets == [0, 256, 512]
    assert layout.numels == [5, 200, 257]
    assert layout.total_numel == 1024
    arena.views(layout, [[5], [10, 20], [257]])
    assert arena.switches == 1 and arena.used_bytes == spec.bytes(1024) == 4096 + 2 * 1024 + 2 * 256
    assert repr(layout) == "ArenaLayout(params=3, total_numel=1024, offsets=[0, 256, 512], numels=[5, 200, 257])"
    text = repr(arena)
    for part in ("device=cpu", "state=8bit", "capacity_numel=1000",
                 "regions=[master, exp_avg, exp_avg_scale, exp_avg_sq, exp_avg_sq_scale]",
                 f"capacity_bytes={arena.capacity_bytes}", f"used_bytes={arena.used_bytes}", "switches=1",
                 "allocations=1"):
        assert part in text
    long = BlockArena(1000, "cpu").layout([1] * 12)
    assert "... (4 more)" in repr(long)


@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_required_capacity_matches_reference(spec_name: str) -> None:
    spec = SPECS[spec_name]
    gen = torch.Generator().manual_seed(len(spec_name))
    for _ in range(20):
        numels = [int(n) for n in torch.randint(1, 5000, (int(torch.randint(1, 8, (1,), generator=gen)),), generator=gen)]
        assert required_capacity(numels, spec) == padded_total(numels, spec.element_alignment)
    assert required_capacity([1]) == 64
    assert required_capacity([1], SPECS["8bit-master"]) == 256


@pytest.mark.parametrize(
    "numels, match",
    [([], "empty block"), ([3, 0], "parameter 1 has numel 0")],
)
def test_required_capacity_errors(numels: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        required_capacity(numels)


def test_missing_extension_raises_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "badam_ext._C", None)  # makes `import badam_ext._C` fail
    monkeypatch.delitem(sys.modules, "badam_ext.arena")
    with pytest.raises(ImportError, match=re.escape("pip install --no-build-isolation -e .")):
        importlib.import_module("badam_ext.arena")


def test_spec_items_refuses_a_negative_count():
    from badam_ext.states import state_spec

    spec = state_spec("8bit")
    assert spec.items("exp_avg_scale", 257) == 2 and spec.items("exp_avg", 257) == 257
    with pytest.raises(ValueError, match="numel must be >= 0"):
        spec.items("exp_avg", -5)
