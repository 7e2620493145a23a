"""Measure the launch configuration of the block kernels on this GPU and cache the best one.

    python -m badam_ext.kernels.tune [--blocks 512,1024,2048,4096] [--warps 2,4,8] [--dtype bf16]
                                     [--layer llama3-8b] [--no-write]

Sweeps every (elements per program, warps) candidate over one transformer layer's tensors (the
Llama-3-8B layer by default: 218.1M parameters in 9 tensors, the shape class BlockAdam launches),
timing the fused AdamW step, the block load and the gradient norm with ``triton.testing.do_bench``,
and the step over 8-bit moments at every block of at least 256 elements, uncapped and at 64 and 72
registers per thread, each with and without an L2 prefetch (``PREFETCH_PER_SM_8BIT``).
The fastest step picks the block size (it sets the chunk tables every kernel shares); the block
load and the norm then get their fastest warps at that block size. The 8-bit step keeps its own
fastest configuration (BlockAdam(states="8bit") builds its tables with it). The result goes to the cache
that :func:`launch_config.launch_config` reads (see :mod:`tuning_cache` for where it lives).

A sweep compiles and times every candidate (six for each 8-bit shape) and takes about 22 bytes per
parameter of device memory: it runs only when asked, never inside training.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..states.spec import QUANT_BLOCK
from . import launch_config as lc
from . import tuning_cache

LAYERS: dict[str, list[tuple[int, ...]]] = {
    # hidden 4096, intermediate 14336, 32 q / 8 kv heads of dim 128
    "llama3-8b": [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096),
                  (14336, 4096), (14336, 4096), (4096, 14336), (4096,), (4096,)],
    # hidden 2048, intermediate 8192, 32 q / 8 kv heads of dim 64
    "llama3.2-1b": [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048),
                    (8192, 2048), (8192, 2048), (2048, 8192), (2048,), (2048,)],
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_BLOCKS = (256, 512, 1024, 2048)  # 4096 never won on an H100 or H200
DEFAULT_WARPS = (1, 2, 4, 8)
#: register caps tried for the 8-bit step (None: the compiler's choice); on an H200 64 won without
#: an L2 prefetch, 72 with one, and 64 again once the streams' loads bypassed L1
REGISTER_CAPS_8BIT = (None, 64, 72)
#: L2 prefetch distances tried for the 8-bit step, in 256-element programs per SM (0: none); 8 to 27
#: per SM ran within 0.3% of each other on an H200, 93 per SM 26% slower (bench/RESULTS.md, round 11),
#: and 8 beat 16 by 0.3% with L2-only loads (round 12)
PREFETCH_PER_SM_8BIT = (0, 8)
BETAS, EPS, LR, WEIGHT_DECAY = (0.9, 0.999), 1e-8, 1e-5, 0.01


def bytes_per_param(kernel: str, dtype: torch.dtype) -> float:
    """The bytes a kernel must move per parameter (weights and grads in ``dtype``, fp32 state; the
    8-bit step: fp32 master, 8-bit m and v with an fp32 absmax per 256)."""
    w = dtype.itemsize
    return {lc.FUSED_STEP: w + 12 + 12 + w,  # read grad, master, m, v; write master, m, v, weight
            lc.BLOCK_LOAD: w + 12,            # read the weight; write master, m, v
            lc.GRAD_SQ_NORM: w,               # read the grad (the per-chunk partials are negligible)
            lc.FUSED_STEP_8BIT: w + 6 + 6 + w + 16 / QUANT_BLOCK}[kernel]  # the same, m / v codes and scales


@dataclass(frozen=True)
class Trial:
    kernel: str
    block_size: int
    num_warps: int
    ms: float
    gbs: float
    frac_copy_bw: float
    max_registers: Optional[int] = None
    prefetch: int = 0


def prefetch_candidates(device: torch.device, block_size: int = QUANT_BLOCK) -> list[int]:
    """The 8-bit step's L2 prefetch distances to try on ``device`` for programs of ``block_size``
    elements, in programs: the same bytes ahead at every block size (L2 must hold them), scaled by
    the SMs. Only 0 where the GPU cannot prefetch (before sm_90)."""
    if not lc.supports_l2_prefetch(device):
        return [0]
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return sorted({max(1, per_sm * sms * QUANT_BLOCK // block_size) if per_sm else 0
                   for per_sm in PREFETCH_PER_SM_8BIT})


def describe(t: Trial) -> str:
    """``kernel (<= N registers, prefetch P)``: a trial's kernel and the options it ran with."""
    options = ([] if t.max_registers is None else [f"<= {t.max_registers} registers"]) + (
        [f"prefetch {t.prefetch}"] if t.prefetch else [])
    return t.kernel + (f" ({', '.join(options)})" if options else "")


def bench_ms(fn: Callable[[], Any], device: torch.device, warmup_ms: float, rep_ms: float) -> float:
    """Median ms per call: ``triton.testing.do_bench`` on a GPU; one timed call after a warm-up on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def copy_bandwidth_gbs(device: torch.device, nbytes: int, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Device-to-device copy bandwidth, bytes read plus bytes written, in GB/s."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device, warmup_ms, rep_ms)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


class _Layer:
    """One layer's weights and grads in ``dtype`` and an fp32 master / m / v arena for them."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], device: torch.device, dtype: torch.dtype) -> None:
        from ..arena import BlockArena, required_capacity

        gen = torch.Generator(device=device).manual_seed(0)
        self.weights = [(torch.randn(s, device=device, generator=gen) * 0.02).to(dtype) for s in shapes]
        self.grads = [(torch.randn(s, device=device, generator=gen) * 1e-3).to(dtype) for s in shapes]
        self.decay = [w.dim() > 1 for w in self.weights]
        numels = [w.numel() for w in self.weights]
        self.arena = BlockArena(required_capacity(numels), device)  # laid out as BlockAdam lays a block out
        self.offsets = list(self.arena.layout(numels).offsets)
        self.regions = [self.arena.flat(r).zero_() for r in ("master", "exp_avg", "exp_avg_sq")]
        self.numel = sum(w.numel() for w in self.weights)
        self.device = device
        self._numels = numels
        self._arena_8bit: Optional[Any] = None

    def regions_8bit(self) -> tuple[list[int], list[Optional[torch.Tensor]]]:
        """(offsets, master / codes / scales regions) of an 8-bit arena for the same weights, made once."""
        from ..arena import BlockArena, required_capacity
        from ..states import state_spec

        if self._arena_8bit is None:
            spec = state_spec("8bit", True)
            self._arena_8bit = BlockArena(required_capacity(self._numels, spec), self.device, spec)
            for name in spec.region_names:  # padding too: runs compare whole regions
                self._arena_8bit.flat(name).zero_()
        arena = self._arena_8bit
        names = ("master", "exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale")
        return list(arena.layout(self._numels).offsets), [arena.flat(r) for r in names]


def _kernel_fns(layer: _Layer, block_size: int) -> dict[str, Callable[[], None]]:
    """The three launches over ``layer`` with chunk tables of ``block_size`` (warps from the lookup)."""
    from . import BlockTables, advance_step, block_load, fused_adamw_step, grad_sq_norm, new_step_state

    tables = BlockTables.build(layer.weights, layer.offsets, layer.decay, block_size=block_size)
    state = new_step_state(layer.device)
    partials = torch.empty(tables.num_chunks, device=layer.device)
    seed = [0]

    def step() -> None:
        advance_step(state, *BETAS)
        seed[0] += 1
        fused_adamw_step(tables, layer.grads, *layer.regions, state, lr=LR, beta1=BETAS[0], beta2=BETAS[1],
                         eps=EPS, weight_decay=WEIGHT_DECAY, seed=seed[0])

    block_load(tables, *layer.regions)
    return {lc.FUSED_STEP: step,
            lc.BLOCK_LOAD: lambda: block_load(tables, *layer.regions),
            lc.GRAD_SQ_NORM: lambda: grad_sq_norm(tables, layer.grads, partials)}


def _step_8bit_fn(layer: _Layer, block_size: int) -> Callable[[], None]:
    """The 8-bit step over ``layer`` with tables of ``block_size`` (warps, register cap and prefetch from
    the lookup)."""
    from . import BlockTables, advance_step, block_load, fused_adamw_step, new_step_state

    offsets, r = layer.regions_8bit()
    tables = BlockTables.build(layer.weights, offsets, layer.decay, block_size=block_size, states="8bit")
    state = new_step_state(layer.device)
    block_load(tables, *r[:3], exp_avg_scale=r[3], exp_avg_sq_scale=r[4])

    def step() -> None:
        advance_step(state, *BETAS)
        fused_adamw_step(tables, layer.grads, *r[:3], state, lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                         weight_decay=WEIGHT_DECAY, exp_avg_scale=r[3], exp_avg_sq_scale=r[4])

    return step


def sweep(shapes: Sequence[tuple[int, ...]], device: torch.device, dtype: torch.dtype, copy_gbs: float,
          blocks: Sequence[int] = DEFAULT_BLOCKS, warps: Sequence[int] = DEFAULT_WARPS, *,
          warmup_ms: float = 25, rep_ms: float = 100, log: Callable[[str], None] = lambda _: None) -> list[Trial]:
    """Time every kernel at every (block, warps) candidate over one layer of ``shapes``."""
    layer = _Layer(shapes, device, dtype)
    trials = []

    def trial(kernel: str, fn: Callable[[], None], block: int, nw: int, cap: Optional[int] = None,
              prefetch: int = 0) -> None:
        ms = bench_ms(fn, device, warmup_ms, rep_ms)
        bw = bytes_per_param(kernel, dtype) * layer.numel / (ms * 1e-3) / 1e9
        trials.append(Trial(kernel, block, nw, ms, bw, bw / copy_gbs, cap, prefetch))

    for block in blocks:
        for nw in warps:
            first = len(trials)
            with lc.override(block, nw):
                for kernel, fn in _kernel_fns(layer, block).items():
                    trial(kernel, fn, block, nw)
            if block >= QUANT_BLOCK:  # 8-bit programs cover whole quantization blocks
                for cap in REGISTER_CAPS_8BIT:
                    for prefetch in prefetch_candidates(device, block):
                        with lc.override(block, nw, cap, prefetch):
                            trial(lc.FUSED_STEP_8BIT, _step_8bit_fn(layer, block), block, nw, cap, prefetch)
            log(f"  BLOCK {block:5d} x {nw:2d} warps: " + ", ".join(
                f"{describe(t)} {t.ms:.3f} ms ({100 * t.frac_copy_bw:.1f}%)" for t in trials[first:]))
    return trials


def choose(trials: Sequence[Trial]) -> dict[str, Trial]:
    """The fastest step; for the other kernels the fastest warps at the step's block size; the 8-bit
    step its own fastest configuration (its tables are built for it)."""
    steps = [t for t in trials if t.kernel == lc.FUSED_STEP]
    if not steps:
        raise ValueError("no fused-step trials to choose from")
    best = {lc.FUSED_STEP: min(steps, key=lambda t: t.ms)}
    steps_8bit = [t for t in trials if t.kernel == lc.FUSED_STEP_8BIT]
    if steps_8bit:
        best[lc.FUSED_STEP_8BIT] = min(steps_8bit, key=lambda t: t.ms)
    for kernel in (lc.BLOCK_LOAD, lc.GRAD_SQ_NORM):
        same_block = [t for t in trials if t.kernel == kernel and t.block_size == best[lc.FUSED_STEP].block_size]
        if same_block:
            best[kernel] = min(same_block, key=lambda t: t.ms)
    return best


def cache_entries(best: dict[str, Trial], key: tuning_cache.DeviceKey, dtype: torch.dtype, layer: str,
                  copy_gbs: float) -> dict[str, dict[str, Any]]:
    """Cache entries (key -> fields) for the chosen trials, with how they were measured."""
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return {key.entry_key(kernel, lc.dtype_class(dtype)): {
        "block_size": t.block_size, "num_warps": t.num_warps, "ms": round(t.ms, 4),
        "frac_copy_bw": round(t.frac_copy_bw, 4), "copy_gbs": round(copy_gbs, 1), "layer": layer,
        "torch": torch.__version__, "date": date,
        **({} if t.max_registers is None else {"max_registers": t.max_registers}),
        **({"prefetch": t.prefetch} if t.prefetch else {})} for kernel, t in best.items()}


def write_choice(best: dict[str, Trial], device: torch.device, dtype: torch.dtype, layer: str, copy_gbs: float,
                 log: Callable[[str], None] = print) -> Optional[Path]:
    """Merge the chosen trials into the cache and make this process read it again; the path, or None
    (with the reason logged) when the cache cannot be written."""
    path = tuning_cache.cache_path()
    try:
        tuning_cache.write(path, cache_entries(best, lc.device_key(device), dtype, layer, copy_gbs))
    except OSError as exc:
        log(f"could not write the launch cache {path} ({exc}); set {tuning_cache.CACHE_ENV} to a writable directory")
        return None
    lc.reload_cache()
    log(f"wrote the launch cache {path}")
    return path


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one value")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m badam_ext.kernels.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", choices=sorted(LAYERS), default="llama3-8b")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight and grad dtype")
    p.add_argument("--blocks", type=_ints, default=list(DEFAULT_BLOCKS), help="elements per program")
    p.add_argument("--warps", type=_ints, default=list(DEFAULT_WARPS), help="warps per program")
    p.add_argument("--warmup", type=float, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=float, default=100, help="do_bench repetition time, ms")
    p.add_argument("--copy-gib", type=float, default=2.0, help="size of the copy that measures bandwidth")
    p.add_argument("--no-write", action="store_true", help="print the result, leave the cache alone")
    return p


def check_candidates(blocks: Sequence[int], warps: Sequence[int]) -> None:
    for b in blocks:
        lc.check_block_size(b)
    bad = [w for w in warps if w not in tuning_cache.VALID_WARPS]
    if bad:
        raise ValueError(f"warps {bad} not in {tuning_cache.VALID_WARPS}")


def tune(device: torch.device, layer: str, dtype: torch.dtype, blocks: Sequence[int], warps: Sequence[int], *,
         copy_gib: float = 2.0, warmup_ms: float = 25, rep_ms: float = 100, write: bool = True,
         log: Callable[[str], None] = print) -> tuple[float, list[Trial], dict[str, Trial]]:
    """Sweep on ``device``, choose, and (``write``) merge the choice into the cache.

    Returns (copy bandwidth GB/s, every trial, the chosen trial per kernel).
    """
    check_candidates(blocks, warps)
    copy_gbs = copy_bandwidth_gbs(device, int(copy_gib * 2**30), warmup_ms, rep_ms)
    log(f"{torch.cuda.get_device_name(device)}: copy bandwidth {copy_gbs:.0f} GB/s (read + write); "
        f"sweeping {len(blocks) * len(warps)} configurations over the {layer} layer ({dtype})")
    trials = sweep(LAYERS[layer], device, dtype, copy_gbs, blocks, warps, warmup_ms=warmup_ms, rep_ms=rep_ms,
                   log=log)
    best = choose(trials)
    for kernel, t in best.items():
        log(f"best {describe(t)}: BLOCK {t.block_size} x {t.num_warps} warps, {t.ms:.3f} ms, "
            f"{t.gbs:.0f} GB/s = {100 * t.frac_copy_bw:.1f}% of copy bandwidth")
    if write:
        write_choice(best, device, dtype, layer, copy_gbs, log)
    return copy_gbs, trials, best


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    if lc.interpreted() or not torch.cuda.is_available():
        print("badam_ext.kernels.tune needs a CUDA device (without one the kernels run in Triton's "
              "interpreter, whose launch configuration is fixed: nothing to tune)", file=sys.stderr)
        return 2
    try:
        check_candidates(args.blocks, args.warps)
    except ValueError as exc:
        print(f"badam_ext.kernels.tune: {exc}", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    tune(device, args.layer, DTYPES[args.dtype], args.blocks, args.warps, copy_gib=args.copy_gib,
         warmup_ms=args.warmup, rep_ms=args.rep, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
