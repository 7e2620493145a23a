"""Compact states in the kernels: the 8-bit codec, the fused step and block load for every format
(against the torch twin and a float64 re-implementation of the scheme), and stochastic rounding
without a master."""
from __future__ import annotations

from dataclasses import dataclass
import bisect
from fractions import Fraction
from typing import Any, Optional

import pytest
import torch

from _kernel_helpers import DTYPES, bf16_neighbours, kdevice, rel_err, std_errors  # noqa: F401
from badam_ext import kernels as K
from badam_ext import torch_ops
from badam_ext.arena import BlockArena, required_capacity
from badam_ext.states import QUANT_BLOCK, StateSpec, state_spec, states_entry
from badam_ext.states.quant import (bucket_layout, codebook, dequantize, encoder_highest_bits, quantize, signed_map,
                                    thresholds, unsigned_map, zero_code)

SHAPES = [(1,), (255,), (257,), (4097,), (3, 129)]  # cross the 256-element quantization blocks
HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
REGIONS = ("master", "exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale")
POISON_CODE = 0xAB


@dataclass
class StateBlock:
    """Weights of one dtype laid out by a real BlockArena for ``spec``, every region poisoned."""

    spec: StateSpec
    arena: BlockArena
    weights: list[torch.Tensor]
    offsets: list[int]
    decay: list[bool]

    def regions(self) -> tuple[Optional[torch.Tensor], ...]:
        return tuple(self.arena.flat(r) if self.spec.has(r) else None for r in REGIONS)

    def tables(self, backend: Any) -> Any:
        return backend.BlockTables.build(self.weights, self.offsets, self.decay, min_block_size=QUANT_BLOCK,
                                         states=states_entry(self.spec)["states"])  # the format's launch config

    def views(self) -> dict[str, list[torch.Tensor]]:
        return self.arena.views(self.arena.layout([w.numel() for w in self.weights]),
                                [list(w.shape) for w in self.weights])

    def load(self, backend: Any, tables: Any) -> None:
        r = self.regions()
        backend.block_load(tables, *r[:3], exp_avg_scale=r[3], exp_avg_sq_scale=r[4])

    def step(self, backend: Any, tables: Any, grads: list[torch.Tensor], state: torch.Tensor, **kw: Any) -> None:
        r = self.regions()
        backend.fused_adamw_step(tables, grads, *r[:3], state, exp_avg_scale=r[3], exp_avg_sq_scale=r[4], **kw)


def make_state_block(spec: StateSpec, dtype: torch.dtype, device: torch.device, shapes=SHAPES,
                     seed: int = 0) -> StateBlock:
    gen = torch.Generator().manual_seed(seed)
    weights = [(torch.randn(s, generator=gen) * 0.5 + 0.01).to(dtype).to(device) for s in shapes]
    numels = [w.numel() for w in weights]
    arena = BlockArena(required_capacity(numels, spec) + 300, device, spec)
    for name in spec.region_names:
        flat = arena.flat(name)
        flat.fill_(POISON_CODE) if flat.dtype == torch.uint8 else flat.fill_(float("nan"))
    offsets = arena.layout(numels).offsets
    return StateBlock(spec, arena, weights, offsets, [i % 2 == 0 for i in range(len(shapes))])


def grads_for(block: StateBlock, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(w.shape, generator=gen) * scale).to(w.dtype).to(w.device) for w in block.weights]


def padding_untouched(block: StateBlock) -> None:
    """Per-element regions outside the tensors' spans still hold their poison."""
    for name in block.spec.region_names:
        if block.spec.block(name) != 1:
            continue
        flat = block.arena.flat(name).cpu()
        owned = torch.zeros(flat.numel(), dtype=torch.bool)
        for off, w in zip(block.offsets, block.weights):
            owned[off:off + w.numel()] = True
        rest = flat[~owned]
        poisoned = rest == POISON_CODE if flat.dtype == torch.uint8 else rest.isnan()
        assert poisoned.all(), f"{name}: padding was written"


# ------------------------------------------------------------------------------------ the maps
def test_dynamic_maps_shape_and_structure():
    s, u = signed_map(), unsigned_map()
    assert s.shape == u.shape == (256,) and s.dtype == u.dtype == torch.float32
    assert bool((s[1:] >= s[:-1]).all()) and bool((u[1:] > u[:-1]).all())
    assert s[0] == -1.0 and s[-1] == 1.0 and u[0] == 0.0 and u[-1] == 1.0
    assert s[zero_code(True)] == 0.0 and u[zero_code(False)] == 0.0 and zero_code(False) == 0
    pos = s[s > 0].unique()
    assert pos.numel() == 127 and torch.equal(pos, -s[s < 0].flip(0))  # symmetric
    assert pos.min() == pytest.approx(1e-6) and u[1] == pytest.approx(1e-7)
    # dense near zero: the step between neighbours grows with the magnitude (one decade per exponent)
    assert (pos[1] - pos[0]) < 1e-5 and (pos[-1] - pos[-2]) > 1e-2


def _nearest_float64(x: torch.Tensor, qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest map entry in float64 by brute force (ties to the lower index), and the gap between
    the two nearest distances (a near-tie when tiny)."""
    d = (x.double()[:, None] - qmap.double()[None, :]).abs()
    best = d.argmin(dim=1)  # argmin returns the first (lower) index on ties
    two = d.topk(2, dim=1, largest=False).values
    return best, two[:, 1] - two[:, 0]


@pytest.mark.parametrize("n", [1, 255, 257, 4097])
@pytest.mark.parametrize("signed", [True, False])
def test_codec_picks_the_nearest_entry_like_float64(n: int, signed: bool):
    gen = torch.Generator().manual_seed(n)
    qmap = signed_map() if signed else unsigned_map()
    x = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 3)  # many magnitudes
    if not signed:
        x = x.abs()
    codes, absmax = quantize(x, qmap)
    blocks = -(-n // QUANT_BLOCK)
    ref_absmax = torch.zeros(blocks * QUANT_BLOCK).index_copy_(0, torch.arange(n), x.abs()).view(blocks, -1).amax(1)
    assert torch.equal(absmax, ref_absmax)
    normalized = x / absmax.repeat_interleave(QUANT_BLOCK)[:n]
    best, gap = _nearest_float64(normalized, qmap)
    differ = codes.long() != best
    # only where the two candidates are equally near up to fp32 rounding of the distances
    assert not (differ & (gap > 1e-7)).any(), f"{int(differ.sum())} codes differ from the float64 nearest"
    back = dequantize(codes, absmax, qmap)
    err = (back - x).abs() / absmax.repeat_interleave(QUANT_BLOCK)[:n]
    assert float(err.max()) <= 0.9 / 64 / 2 + 1e-7  # half the widest step of the map, relative to absmax


def _exact_nearest_codes(x: torch.Tensor, absmax: torch.Tensor, signed: bool) -> list[int]:
    """Codes of the entries nearest to the fp32 ratio ``|x| * (1 / absmax)``, ties towards zero,
    with the map written in fractions (the ratio itself is two fp32 operations, as defined)."""
    exponents = 7 if signed else 8
    mags = [Fraction(0)]
    for e in reversed(range(exponents)):  # smallest decade first
        n = 2 ** (exponents - 1 - e)
        mags += [Fraction(n + 9 * k, 10 ** (e + 1) * n) for k in range(1, n + 1)]
    inverse = 1.0 / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    ratios = x.abs() * inverse.repeat_interleave(QUANT_BLOCK)[:x.numel()]
    zero = zero_code(signed)
    out = []
    for value, ratio in zip(x.tolist(), ratios.tolist()):
        ratio = Fraction(ratio)
        above = bisect.bisect_left(mags, ratio)  # the nearest is this entry or the one below
        candidates = [j for j in (above - 1, above) if 0 <= j < len(mags)]
        best = min(candidates, key=lambda j: (abs(ratio - mags[j]), j))
        out.append(zero - best if value < 0 else zero + best)
    return out


@pytest.mark.parametrize("signed", [True, False])
def test_codec_is_the_exact_nearest_entry(signed: bool):
    """Against the map written in fractions: the nearest entry to the ratio, ties towards zero, on
    values spread over every decade and on ratios within a few ulps of every midpoint."""
    x = _adversarial(signed, seed=11)
    codes, absmax = quantize(x, signed_map() if signed else unsigned_map())
    assert codes.tolist() == _exact_nearest_codes(x, absmax, signed)


def _ulps_around(values: torch.Tensor, ulps: int = 3) -> torch.Tensor:
    """``values`` and their fp32 neighbours up to ``ulps`` away on either side."""
    out = [values]
    for direction in (0.0, float("inf")):
        v = values
        for _ in range(ulps):
            v = torch.nextafter(v, torch.full_like(v, direction))
            out.append(v)
    return torch.cat(out)


def _rows_with_absmax(values: torch.Tensor, absmax: float) -> torch.Tensor:
    """Blocks of 256: ``absmax`` first, then ``values`` (each at most ``absmax`` in magnitude)."""
    per_row = QUANT_BLOCK - 1
    n = -(-values.numel() // per_row)
    rows = torch.zeros(n, QUANT_BLOCK)
    rows[:, 0] = absmax
    rows[:, 1:] = torch.cat([values, torch.zeros(n * per_row - values.numel())]).view(n, per_row)
    return rows.reshape(-1)


def _adversarial(signed: bool, seed: int) -> torch.Tensor:
    """Blocks of absmax 1 whose ratios sit within 3 ulps of every midpoint and every decade boundary
    of the map; the same values times absmax that are not
    powers of two (ratios next to the boundaries after rounding), including absmax near the ends of
    fp32's range; a block of subnormal absmax; and blocks of values over many magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    qmap = (signed_map() if signed else unsigned_map()).double()
    mags = qmap[qmap > 0].unique()
    mids = torch.cat([mags[:1] / 2, (mags[1:] + mags[:-1]) / 2])
    decades = torch.tensor([10.0 ** -e for e in range(9)], dtype=torch.float64)
    edges = _ulps_around(torch.cat([mids, decades, mags]).float()).clamp(max=1.0)
    parts = [_rows_with_absmax(edges, 1.0)]
    for scale in (0.37, 3.1e-5, 1e-33, 1e33):
        parts.append(_rows_with_absmax((edges.double() * scale).float().clamp(max=scale), scale))
    values = torch.cat(parts)
    spread = torch.randn(4 * QUANT_BLOCK, generator=gen) * torch.exp(torch.randn(4 * QUANT_BLOCK, generator=gen) * 4)
    tiny = spread[:QUANT_BLOCK] * 1e-41  # absmax subnormal: 1 / absmax would overflow (stored as zeros)
    x = torch.cat([values, spread, tiny])
    if signed:
        x = x * torch.where(torch.rand(x.shape, generator=gen) < 0.5, -1.0, 1.0)
    return x.abs() if not signed else x


@pytest.mark.parametrize("signed", [True, False])
def test_codebook_buckets_count_the_thresholds_below(signed: bool):
    """The kernels' bucket rule (``bucket_layout``), applied in torch integers, gives the number of
    thresholds below the ratio for every ratio within 3 ulps of a threshold or of a bucket's edge,
    for ratios spread over [0, 1], and all of them for NaN of either sign, inf and ratios above 1."""
    shift, count = bucket_layout(signed)
    highest = encoder_highest_bits(signed)
    edges = (torch.arange(count + 1) << shift).to(torch.int32).view(torch.float32)
    spread = torch.rand(100_000, generator=torch.Generator().manual_seed(0)) ** 8
    ratios = torch.cat([_ulps_around(torch.cat([thresholds(signed), edges])), spread, torch.tensor([0.0, 1.0])])
    ratios = ratios[(ratios >= 0) & (ratios <= 1.0)]
    specials = torch.tensor([1.0 + 2.0 ** -23, 1.5, float("inf"), float("nan")])
    specials = torch.cat([specials, torch.tensor([-0x400000], dtype=torch.int32).view(torch.float32)])  # 0xffc00000
    assert specials[-1].isnan()
    bits = torch.cat([ratios, specials]).view(torch.int32).long() & 0xFFFFFFFF  # as unsigned, as in the kernels
    bits = bits.clamp(max=highest)
    got = (bits + codebook(signed)[256:].long()[bits >> shift]) >> shift
    want = torch.cat([torch.searchsorted(thresholds(signed), ratios, right=False),
                      torch.full((specials.numel(),), thresholds(signed).numel())])
    assert torch.equal(got, want), f"{int((got != want).sum())} ratios counted wrong"
    assert torch.equal(codebook(signed)[:256].view(torch.float32), signed_map() if signed else unsigned_map())


@pytest.mark.parametrize("signed", [True, False])
def test_kernel_encoder_matches_the_exact_codec(kdevice, signed: bool):
    """The kernels' encoder (one bucket gather, an addition and a shift) gives the torch codec's codes
    on ratios next to every decision boundary, in the interpreter and on the GPU."""
    from _quant_probe import encode_with_kernel

    x = _adversarial(signed, seed=12)
    codes, absmax = encode_with_kernel(x.to(kdevice), signed)
    want_codes, want_absmax = quantize(x, signed_map() if signed else unsigned_map())
    assert torch.equal(absmax.cpu(), want_absmax)
    differ = codes.cpu() != want_codes
    assert not differ.any(), f"{int(differ.sum())} of {x.numel()} codes differ, e.g. at {differ.nonzero()[:5].flatten().tolist()}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or K.interpreted(), reason="needs a CUDA device and compiled kernels")
@pytest.mark.parametrize("signed", [True, False])
def test_kernel_encoder_on_every_ratio(signed: bool):
    """Every fp32 ratio in [0, 1] (2^30 + 1 of them, in blocks led by 1.0, so each ratio reaches the
    encoder as it is) gets the torch codec's code from the compiled encoder; a third of them negative."""
    from _quant_probe import encode_with_kernel

    device = torch.device("cuda", torch.cuda.current_device())
    one = int(torch.tensor(1.0).view(torch.int32))
    per_block = QUANT_BLOCK - 1
    span = per_block << 20  # ratios per launch
    for start in range(0, one + 1, span):
        bits = torch.arange(start, min(start + span, one + 1), device=device, dtype=torch.int32)
        blocks = -(-bits.numel() // per_block)
        padded = torch.ones(blocks * per_block, device=device)
        padded[:bits.numel()] = bits.view(torch.float32)
        x = torch.cat([torch.ones(blocks, 1, device=device), padded.view(blocks, per_block)], dim=1).view(-1)
        if signed:
            x = torch.where(torch.arange(x.numel(), device=device) % 3 == 0, -x, x)
        codes, absmax = encode_with_kernel(x, signed)
        want_codes, want_absmax = quantize(x, signed_map(device) if signed else unsigned_map(device))
        assert torch.equal(absmax, want_absmax)
        differ = codes != want_codes
        assert not differ.any(), f"{int(differ.sum())} codes differ from {start}, e.g. ratio bits " \
                                 f"{x[differ.nonzero()[:3].flatten()].abs().view(torch.int32).tolist()}"


def test_codec_zero_block_and_exact_entries():
    codes, absmax = quantize(torch.zeros(300), signed_map())
    assert torch.all(codes == zero_code(True)) and torch.all(absmax == 0)
    assert torch.all(dequantize(codes, absmax, signed_map()) == 0)
    entries = signed_map()[torch.randperm(256, generator=torch.Generator().manual_seed(3))]
    codes, absmax = quantize(entries, signed_map())
    assert torch.equal(dequantize(codes, absmax, signed_map()), entries)  # absmax 1: exact round trip


# ------------------------------------------------------------------------------ kernel vs twin
FORMATS = [pytest.param("8bit", True, id="8bit"), pytest.param("8bit", False, id="8bit-nomaster"),
           pytest.param("fp32", False, id="fp32-nomaster")]


def _run(backend, block: StateBlock, steps: int, stochastic: bool = False) -> None:
    tables = block.tables(backend)
    block.load(backend, tables)
    state = backend.new_step_state(block.weights[0].device)
    for t in range(steps):
        backend.advance_step(state, HYPER["beta1"], HYPER["beta2"])
        block.step(backend, tables, grads_for(block, seed=10 + t), state, lr=1e-2, **HYPER,
                   stochastic_rounding=stochastic, seed=t)


@pytest.mark.parametrize("states, master", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_matches_torch_twin(kdevice, states: str, master: bool, dtype: torch.dtype):
    """Three steps from a block load: codes, scales, master and weights of the kernel equal the torch
    twin's. In the interpreter bit for bit (the same IEEE fp32 operations, the same exact codes); on a
    GPU a moment may differ in its last bit where the two evaluation orders of the update differ, which
    can move a code by one next to a midpoint, so there at most one code and a tiny fraction."""
    if not master and dtype == torch.float16:
        pytest.skip("no master needs bf16 or fp32 weights (refused, see test_state_errors)")
    spec = state_spec(states, master)
    ours, theirs = (make_state_block(spec, dtype, kdevice) for _ in range(2))
    _run(K, ours, 3)
    _run(torch_ops, theirs, 3)
    exact = kdevice.type == "cpu"
    a, b = ours.views(), theirs.views()
    for name in spec.region_names:
        for i, (x, y) in enumerate(zip(a[name], b[name])):
            if x.dtype == torch.uint8:
                diff = (x.int() - y.int()).abs()
                if exact:
                    assert torch.equal(x, y), f"{name} {i}: {int((diff > 0).sum())} codes differ"
                else:
                    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 1e-3, name
            elif exact:
                assert torch.equal(x, y), f"{name} {i} differs"
            else:
                assert rel_err(x, y) <= 1e-3, f"{name} {i}"
            assert torch.isfinite(x.float()).all(), f"{name} {i}: unwritten (poisoned) elements"
    for i, (w, v) in enumerate(zip(ours.weights, theirs.weights)):
        if exact:
            assert torch.equal(w, v), f"weight {i}"
        else:
            assert rel_err(w, v) <= 1e-2, f"weight {i}"
    padding_untouched(ours)


@pytest.mark.parametrize("states, master", FORMATS)
def test_block_load_fills_the_compact_layout(kdevice, states: str, master: bool):
    spec = state_spec(states, master)
    for backend in (K, torch_ops):
        block = make_state_block(spec, torch.bfloat16, kdevice)
        block.load(backend, block.tables(backend))
        views = block.views()
        for i, w in enumerate(block.weights):
            if master:
                assert torch.equal(views["master"][i], w.float())
            if states == "8bit":
                assert torch.all(views["exp_avg"][i] == zero_code(True))
                assert torch.all(views["exp_avg_sq"][i] == zero_code(False))
                assert torch.all(views["exp_avg_scale"][i] == 0) and torch.all(views["exp_avg_sq_scale"][i] == 0)
            else:
                assert torch.all(views["exp_avg"][i] == 0) and torch.all(views["exp_avg_sq"][i] == 0)
        padding_untouched(block)


@pytest.mark.parametrize("chunks", [None, 2, 4], ids=["default", "2", "4"])
def test_8bit_block_load_programs_of_several_chunks(kdevice, chunks: Optional[int]):
    """256-element chunks (the 8-bit tables of an H200), several per block-load program: spans inside
    a tensor and across tensors fill codes, scales and master exactly as the torch backend."""
    spec = state_spec("8bit", True)
    ours, theirs = (make_state_block(spec, torch.bfloat16, kdevice) for _ in range(2))
    tables = K.BlockTables.build(ours.weights, ours.offsets, ours.decay, block_size=QUANT_BLOCK, states="8bit")
    r = ours.regions()
    K.block_load(tables, *r[:3], exp_avg_scale=r[3], exp_avg_sq_scale=r[4], chunks=chunks)
    theirs.load(torch_ops, theirs.tables(torch_ops))
    for name in spec.region_names:
        assert torch.equal(ours.arena.flat(name).cpu().view(torch.uint8),
                           theirs.arena.flat(name).cpu().view(torch.uint8)), name
    padding_untouched(ours)


# --------------------------------------------------------------------- float64 reference of the scheme
def _quantize64(x: torch.Tensor, qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.numel()
    blocks = -(-n // QUANT_BLOCK)
    absmax = torch.zeros(blocks * QUANT_BLOCK, dtype=torch.float64)
    absmax[:n] = x.abs()
    absmax = absmax.view(blocks, -1).amax(1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes, _ = _nearest_float64(x / safe.repeat_interleave(QUANT_BLOCK)[:n], qmap)
    return codes, absmax


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_8bit_step_matches_float64_scheme(kdevice, dtype: torch.dtype):
    """One step from a random 8-bit state (never zeros): the 8-bit scheme applied exactly in float64
    (dequantize, AdamW, requantize to the nearest entry) gives the same master and codes."""
    spec = state_spec("8bit")
    block = make_state_block(spec, dtype, kdevice, seed=4)
    tables = block.tables(K)
    gen = torch.Generator().manual_seed(5)
    views = block.views()
    for i, w in enumerate(block.weights):
        n = w.numel()
        views["master"][i].copy_((w.float().cpu() + torch.randn(w.shape, generator=gen) * 1e-2).to(kdevice))
        views["exp_avg"][i].copy_(torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8).view(w.shape))
        views["exp_avg_sq"][i].copy_(torch.randint(1, 256, (n,), generator=gen, dtype=torch.uint8).view(w.shape))
        views["exp_avg_scale"][i].copy_(torch.rand(views["exp_avg_scale"][i].shape, generator=gen) * 1e-2 + 1e-4)
        views["exp_avg_sq_scale"][i].copy_(torch.rand(views["exp_avg_sq_scale"][i].shape, generator=gen) * 1e-4 + 1e-6)
    before = {k: [t.clone().cpu() for t in v] for k, v in views.items()}
    grads = grads_for(block, seed=6)
    state = K.new_step_state(kdevice)
    for _ in range(3):  # t = 3: bias corrections away from the first step
        K.advance_step(state, HYPER["beta1"], HYPER["beta2"])
    lr, t = 1e-3, 3
    block.step(K, tables, grads, state, lr=lr, **HYPER)
    s64, u64 = signed_map().double(), unsigned_map().double()
    b1, b2 = HYPER["beta1"], HYPER["beta2"]
    after = block.views()
    for i, (g, decay) in enumerate(zip(grads, block.decay)):
        g = g.double().cpu().reshape(-1)
        p = before["master"][i].double().reshape(-1)
        m = s64[before["exp_avg"][i].reshape(-1).long()] * before["exp_avg_scale"][i].double().repeat_interleave(QUANT_BLOCK)[:g.numel()]
        v = u64[before["exp_avg_sq"][i].reshape(-1).long()] * before["exp_avg_sq_scale"][i].double().repeat_interleave(QUANT_BLOCK)[:g.numel()]
        if decay:
            p = p * (1 - lr * HYPER["weight_decay"])
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + HYPER["eps"])
        assert rel_err(after["master"][i].reshape(-1), p) <= 1e-6, f"master {i}"
        for key, x, qmap in (("exp_avg", m, s64), ("exp_avg_sq", v, u64)):
            codes, absmax = _quantize64(x, qmap)
            assert rel_err(after[key + "_scale"][i], absmax) <= 1e-6, f"{key} absmax {i}"
            got = after[key][i].reshape(-1).long().cpu()
            diff = (got - codes).abs()
            # fp32 vs float64 inputs move a value across a decision boundary only right next to it
            assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 2e-3, f"{key} {i}"
    padding_untouched(block)


def test_8bit_moments_track_fp32_moments_over_many_steps():
    """Quantization error of m and v after N steps against fp32 states on the same gradients (torch
    twin, which the kernels match code for code): bounded, and the weights stay close."""
    steps = 40
    blocks = {fmt: make_state_block(state_spec(fmt), torch.float32, torch.device("cpu"), shapes=[(4097,), (257,)],
                                    seed=7) for fmt in ("fp32", "8bit")}
    tables = {fmt: b.tables(torch_ops) for fmt, b in blocks.items()}
    states = {fmt: torch_ops.new_step_state("cpu") for fmt in blocks}
    for fmt, b in blocks.items():
        b.load(torch_ops, tables[fmt])
    for t in range(steps):
        for fmt, b in blocks.items():
            torch_ops.advance_step(states[fmt], HYPER["beta1"], HYPER["beta2"])
            b.step(torch_ops, tables[fmt], grads_for(b, seed=100 + t, scale=1e-2), states[fmt], lr=1e-4, **HYPER)
    ref, q = blocks["fp32"].views(), blocks["8bit"].views()
    for i in range(2):
        m8 = dequantize(q["exp_avg"][i].reshape(-1), q["exp_avg_scale"][i], signed_map())
        v8 = dequantize(q["exp_avg_sq"][i].reshape(-1), q["exp_avg_sq_scale"][i], unsigned_map())
        # measured 2.5% and 1.4% (m, v), weights 1-2% of the distance moved; bounds with margin
        assert rel_err(m8, ref["exp_avg"][i].reshape(-1)) <= 0.04, "exp_avg"
        assert rel_err(v8, ref["exp_avg_sq"][i].reshape(-1)) <= 0.03, "exp_avg_sq"
        drift = (q["master"][i] - ref["master"][i]).abs().max() / (steps * 1e-4)
        assert float(drift) <= 0.05, "the 8-bit run's weights left the fp32 run's"


# -------------------------------------------------------------------- no master: stochastic rounding
@pytest.mark.parametrize("states", ["8bit", "fp32"])
def test_no_master_rounds_stochastically_and_unbiased(kdevice, states: str):
    """Without a master a bf16 weight moves by updates far below its ulp only through stochastic
    rounding: the mean of many rounded copies is the fp32 result; round to nearest never moves."""
    n, lr, base = 8192, 0.3 * 2.0**-7, 1.5  # the first Adam step moves each weight by about lr
    lo, hi = bf16_neighbours(base - lr)
    for stochastic in (True, False):
        block = make_state_block(state_spec(states, False), torch.bfloat16, kdevice, shapes=[(n,)])
        block.weights[0].fill_(base)
        block.decay = [False]
        tables = block.tables(K)
        block.load(K, tables)
        state = K.new_step_state(kdevice)
        K.advance_step(state, HYPER["beta1"], HYPER["beta2"])
        grad = [torch.full((n,), 0.5, dtype=torch.bfloat16, device=kdevice)]
        block.step(K, tables, grad, state, lr=lr, **HYPER, stochastic_rounding=stochastic, seed=11)
        out = block.weights[0].float().cpu()
        if not stochastic:
            assert torch.all(out == base)
            continue
        assert ((out == lo) | (out == hi)).all()
        target = base - lr * (1 - 1e-8 / (0.5 + 1e-8))  # m_hat / (sqrt(v_hat) + eps) with g = 0.5
        p = (target - lo) / (hi - lo)
        std = abs(hi - lo) * (p * (1 - p)) ** 0.5
        assert std_errors(float(out.double().mean()), target, std, n) < 5.0


# --------------------------------------------------------------------------------------- errors
def test_state_errors():
    spec = state_spec("8bit")
    block = make_state_block(spec, torch.bfloat16, torch.device("cpu"), shapes=[(300,)])
    master, m, v, ms, vs = block.regions()
    tables = torch_ops.TorchTables.build(block.weights, block.offsets, block.decay)
    state = torch_ops.new_step_state("cpu")
    kw = dict(lr=1e-3, **HYPER)
    g = grads_for(block, 1)
    with pytest.raises(ValueError, match="exp_avg_scale is required with 8-bit"):
        torch_ops.fused_adamw_step(tables, g, master, m, v, state, **kw, exp_avg_sq_scale=vs)
    with pytest.raises(ValueError, match="exp_avg_scale is given but the moments are float32"):
        torch_ops.fused_adamw_step(tables, g, master, master, master, state, **kw, exp_avg_scale=ms)
    with pytest.raises(TypeError, match="exp_avg_sq must be uint8"):
        torch_ops.fused_adamw_step(tables, g, master, m, master, state, **kw, exp_avg_scale=ms, exp_avg_sq_scale=vs)
    with pytest.raises(ValueError, match="offset 0 \\(64\\) is not a multiple of 256"):
        shifted = torch_ops.TorchTables.build(block.weights, [64], block.decay)
        torch_ops.fused_adamw_step(shifted, g, master, m, v, state, **kw, exp_avg_scale=ms, exp_avg_sq_scale=vs)
    fp16 = [w.half() for w in block.weights]
    with pytest.raises(TypeError, match="needs bfloat16 .* or float32 weights; these are float16"):
        torch_ops.block_load(torch_ops.TorchTables.build(fp16, block.offsets, block.decay), None, m, v,
                             exp_avg_scale=ms, exp_avg_sq_scale=vs)
    if K.interpreted():
        small = K.BlockTables.build(block.weights, block.offsets, block.decay, block_size=128)
        with pytest.raises(ValueError, match="block size is a multiple of 256; these have 128"):
            K.block_load(small, master, m, v, exp_avg_scale=ms, exp_avg_sq_scale=vs)
        assert K.BlockTables.build(block.weights, block.offsets, block.decay, block_size=128,
                                   min_block_size=256).block_size == 256
    for backend in (K, torch_ops):  # checked before any device check
        with pytest.raises(ValueError, match="unknown states='4bit': choose one of 'fp32', '8bit'"):
            backend.BlockTables.build(block.weights, block.offsets, block.decay, states="4bit")


@pytest.mark.parametrize("master", [True, False], ids=["8bit", "8bit-nomaster"])
def test_8bit_grad_scale_and_found_inf(kdevice, master: bool):
    """A scaled step matches the twin; a step with found_inf set changes nothing (codes, scales,
    master, weights), in both backends."""
    spec = state_spec("8bit", master)
    blocks = {name: make_state_block(spec, torch.bfloat16, kdevice, seed=9) for name in ("triton", "torch")}
    for (name, block), backend in zip(blocks.items(), (K, torch_ops)):
        tables = block.tables(backend)
        block.load(backend, tables)
        state = backend.new_step_state(kdevice)
        scale = torch.full((1,), 0.25, device=kdevice)
        backend.advance_step(state, HYPER["beta1"], HYPER["beta2"])
        block.step(backend, tables, grads_for(block, 1), state, lr=1e-2, **HYPER, grad_scale=scale)
        before = {k: [t.clone() for t in v] for k, v in block.views().items()}
        weights = [w.clone() for w in block.weights]
        found = torch.ones(1, device=kdevice)
        backend.advance_step(state, HYPER["beta1"], HYPER["beta2"], found)
        block.step(backend, tables, grads_for(block, 2), state, lr=1e-2, **HYPER, found_inf=found)
        for k, views in block.views().items():
            assert all(torch.equal(a, b) for a, b in zip(views, before[k])), f"{name}: {k} changed on a skipped step"
        assert all(torch.equal(a, b) for a, b in zip(block.weights, weights)), f"{name}: weights changed"
        assert float(state[0]) == 1.0
    if kdevice.type == "cpu":  # the regions agree bit for bit (the moments do not depend on the weights)
        a, b = blocks["triton"].views(), blocks["torch"].views()
        for k in a:
            assert all(torch.equal(x, y) for x, y in zip(a[k], b[k])), k


@pytest.mark.parametrize("states, master", FORMATS + [pytest.param("fp32", True, id="fp32")])
def test_l2_prefetch_leaves_the_step_bit_identical(kdevice, states: str, master: bool):
    """Prefetching the streams of the chunk ``PREFETCH`` ahead into L2 changes no result: three
    stochastically rounded steps over 256-element chunks with a distance of 0 and of 3 (it fires in
    the tensors of at least 4 chunks), and over the device's own tables and distance, with gradients
    whose base is not 16-byte aligned (the prefetch rounds it down), give the same regions and
    weights bit for bit. On a GPU a 1M-element tensor holds more chunks than the H200's 2048."""
    spec = state_spec(states, master)
    shapes = SHAPES + ([(1031, 1029)] if kdevice.type == "cuda" else [])
    runs = {}
    for prefetch in (0, 3, None):
        block = make_state_block(spec, torch.bfloat16, kdevice, shapes=shapes, seed=5)
        if prefetch is None:
            tables = block.tables(K)
        else:
            tables = K.BlockTables.build(block.weights, block.offsets, block.decay, block_size=QUANT_BLOCK,
                                         states=states)
            tables.step_prefetch = prefetch
        block.load(K, tables)
        state = K.new_step_state(kdevice)
        for t in range(3):
            K.advance_step(state, HYPER["beta1"], HYPER["beta2"])
            # one element into a larger buffer: every gradient's base is 2 bytes past an aligned address
            grads = [torch.cat([g.new_zeros(1), g.flatten()])[1:].view(g.shape) for g in grads_for(block, seed=20 + t)]
            assert all(g.data_ptr() % 16 for g in grads)
            block.step(K, tables, grads, state, lr=1e-2, **HYPER, stochastic_rounding=True, seed=t)
        runs[prefetch] = ({k: [x.clone() for x in v] for k, v in block.views().items()}, block.weights)
    base_views, base_weights = runs[0]
    for prefetch in (3, None):
        views, weights = runs[prefetch]
        for name in spec.region_names:
            assert all(torch.equal(x, y) for x, y in zip(views[name], base_views[name])), f"prefetch {prefetch}: {name}"
        assert all(torch.equal(w, v) for w, v in zip(weights, base_weights)), f"prefetch {prefetch}: weights"


def test_step_launch_passes_the_tables_prefetch_distance(monkeypatch):
    """The tables' prefetch distance reaches the step's compilation as ``PREFETCH``; a new program
    shape drops it (it was measured for the old one); a bad distance is refused."""
    if not K.interpreted():
        pytest.skip("spies on the launch in Triton's interpreter")
    from badam_ext.kernels import adamw

    block = make_state_block(state_spec("8bit"), torch.bfloat16, torch.device("cpu"), shapes=[(300,)])
    tables = block.tables(K)
    assert tables.step_prefetch == 0  # the interpreter never prefetches
    block.load(K, tables)
    state = K.new_step_state("cpu")
    seen = []
    run = adamw._fused_adamw_kernel.run
    monkeypatch.setattr(adamw._fused_adamw_kernel, "run", lambda *a, **kw: seen.append(kw["PREFETCH"]) or run(*a, **kw))
    for prefetch in (0, 7):
        tables.step_prefetch = prefetch
        K.advance_step(state, HYPER["beta1"], HYPER["beta2"])
        block.step(K, tables, grads_for(block, 1), state, lr=1e-3, **HYPER)
    assert seen == [0, 7]
    tables.num_warps = tables.num_warps * 2
    assert tables.step_prefetch == 0
    with pytest.raises(ValueError, match="prefetch must be an int in"):
        K.BlockTables(tables.weights, tables.offsets, tables.decay, tables.block_size, 1, tables.meta,
                      tables.chunks, step_prefetch=-1)


def test_step_launch_passes_the_tables_register_cap(monkeypatch):
    """A cap configured for the tables reaches the step's compilation as ``maxnreg``; no cap, no option."""
    if not K.interpreted():
        pytest.skip("spies on the launch in Triton's interpreter")
    from badam_ext.kernels import adamw

    block = make_state_block(state_spec("8bit"), torch.bfloat16, torch.device("cpu"), shapes=[(300,)])
    tables = block.tables(K)
    block.load(K, tables)
    state = K.new_step_state("cpu")
    seen = []
    run = adamw._fused_adamw_kernel.run
    monkeypatch.setattr(adamw._fused_adamw_kernel, "run",
                        lambda *a, **kw: seen.append(kw.get("maxnreg", "absent")) or run(*a, **kw))
    for cap in (None, 64):
        tables.step_max_registers = cap
        K.advance_step(state, HYPER["beta1"], HYPER["beta2"])
        block.step(K, tables, grads_for(block, 1), state, lr=1e-3, **HYPER)
    assert seen == ["absent", 64]
    tables.num_warps = tables.num_warps * 2  # another program shape: the measured cap no longer holds
    assert tables.step_max_registers is None
