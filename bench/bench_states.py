"""Optimizer-state formats on one Llama-3-8B layer: step and block-load time against the bytes each
moves, and the quantization error of the 8-bit moments.

Speed (default): per format, ``advance_step`` + one ``fused_adamw_step`` launch over the layer's 9
tensors (q 4096x4096, k/v 1024x4096, o 4096x4096, gate/up 14336x4096, down 4096x14336, two 4096
norms; bf16 weights and grads), and one ``block_load``, timed with ``triton.testing.do_bench``
(median), as a fraction of the copy bandwidth measured in the same run (a 4 GiB fp32 copy). Beside
them: torch ``AdamW(fused=True)`` on fp32 masters plus the two casts (bf16 grad -> fp32, master ->
bf16 weight), and, when importable, torchao ``AdamW8bit`` and bitsandbytes ``Adam8bit`` on the bf16
weights (their own formats; skipped with the reason printed otherwise).

Bytes per parameter each path must move (its own format's floor):

    fp32            28   read g(2) master/m/v(12), write master/m/v(12) w(2)
    8bit            16 + 16/256   read g(2) master(4) codes(2) absmax, write master(4) codes(2) absmax w(2)
    8bit-nomaster   10 + 16/256   read g(2) w(2) codes(2) absmax, write w(2) codes(2) absmax
    fp32-nomaster   22   read g(2) w(2) m/v(8), write m/v(8) w(2)
    torch AdamW     40   cast g (2+4), AdamW (16 read + 12 write), cast back (4+2)
    torchao / bnb   10 + 16/256   bf16 weights, 8-bit m/v with absmax (their formats, no master)

Finetune (``--finetune``): the embedded model of ``badam-ext train`` (preset "tiny" on CPU, "small"
on a GPU; bf16) on its arithmetic data, the same seed, batches and schedule for every format: the
training loss (mean of the last 20 steps) and the eval loss at the end, against the fp32 format.

Accuracy (``--accuracy``): N steps on the same gradients (fixed, so the moments are the same EMAs of
g for every optimizer); the relative error of each implementation's dequantized m and v against the
float64 EMAs, for our fp32 and 8-bit states and, when importable, bitsandbytes and torchao.

    python bench/bench_states.py [--out results.jsonl] [--formats fp32,8bit,8bit-nomaster] [--no-baselines]
    python bench/bench_states.py --formats 8bit --no-baselines --launch 256x2,512x4,1024x8   # a sweep
    python bench/bench_states.py --formats fp32 --no-baselines --layer flat   # one tensor of the layer's size
    python bench/bench_states.py --accuracy [--steps 100] [--out results.jsonl]
    python bench/bench_states.py --finetune [--steps 300] [--out results.jsonl]   # CPU or GPU
    python bench/bench_states.py --smoke      # tiny sizes on CPU in Triton's interpreter (a CI check)
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

if "--smoke" in sys.argv and not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch

LLAMA3_8B_LAYER = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096),
                   (14336, 4096), (14336, 4096), (4096, 14336), (4096,), (4096,)]
SMOKE_LAYER = [(3, 129), (257,), (1,), (40, 64)]
#: ``--layer``: the 8B layer's 9 tensors, or one flat tensor of the same size (the same bytes without
#: the tables' tensor lookup: what the multi-tensor launch costs)
LAYERS = {"llama3-8b": LLAMA3_8B_LAYER, "flat": [(sum(math.prod(s) for s in LLAMA3_8B_LAYER),)]}
FORMATS = {"fp32": ("fp32", True), "8bit": ("8bit", True), "8bit-nomaster": ("8bit", False),
           "fp32-nomaster": ("fp32", False)}
STEP_BYTES = {"fp32": 28.0, "8bit": 16 + 16 / 256, "8bit-nomaster": 10 + 16 / 256, "fp32-nomaster": 22.0}
LOAD_BYTES = {"fp32": 14.0, "8bit": 8 + 8 / 256, "8bit-nomaster": 2 + 8 / 256, "fp32-nomaster": 8.0}
TORCH_ADAMW_BYTES = 40.0
EIGHT_BIT_LIB_BYTES = 10 + 16 / 256
HYPER = dict(lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


# ------------------------------------------------------------------------------------- records
def env_record(device: torch.device) -> dict[str, Any]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"bench": "states", "device": name, "torch": torch.__version__, "triton": triton_version,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}


def write(out: Optional[str], records: list[dict[str, Any]]) -> None:
    for r in records:
        print(json.dumps(r, sort_keys=True))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            for r in records:
                f.write(json.dumps(r, sort_keys=True) + "\n")


def timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """Median milliseconds of a call: ``triton.testing.do_bench`` on CUDA, a wall clock otherwise."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=25, rep=200, return_mode="median"))

    def host(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[1]

    return host


def copy_bandwidth(device: torch.device, bench: Callable, gib: float) -> float:
    """GB/s of a ``gib`` GiB fp32 copy (bytes read + written)."""
    n = int(gib * 2**30) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    del src, dst
    return 2 * n * 4 / ms / 1e6


# --------------------------------------------------------------------------------------- setups
class Layer:
    """bf16 weights and grads of one layer, and an arena of one format laid out for them."""

    def __init__(self, shapes, device: torch.device, fmt: str, seed: int = 0) -> None:
        from badam_ext import kernels as K
        from badam_ext.arena import BlockArena, required_capacity
        from badam_ext.states import QUANT_BLOCK, is_quantized, state_spec

        gen = torch.Generator(device=device).manual_seed(seed)
        self.weights = [(torch.randn(s, device=device, generator=gen) * 0.02).bfloat16() for s in shapes]
        self.grads = [(torch.randn(s, device=device, generator=gen) * 1e-3).bfloat16() for s in shapes]
        self.numel = sum(w.numel() for w in self.weights)
        self.spec = state_spec(*FORMATS[fmt])
        self.quantized = is_quantized(self.spec)
        numels = [w.numel() for w in self.weights]
        self.arena = BlockArena(required_capacity(numels, self.spec), device, self.spec)
        offsets = self.arena.layout(numels).offsets
        self.tables = K.BlockTables.build(self.weights, offsets, [w.dim() > 1 for w in self.weights],
                                          min_block_size=QUANT_BLOCK if self.quantized else 1,
                                          states=FORMATS[fmt][0])
        names = ("master", "exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale")
        self.regions = [self.arena.flat(r) if self.spec.has(r) else None for r in names]
        self.state = K.new_step_state(device)
        self.K = K
        self.load()

    def load(self, chunks: Optional[int] = None, warps: Optional[int] = None) -> None:
        r = self.regions
        self.K.block_load(self.tables, *r[:3], exp_avg_scale=r[3], exp_avg_sq_scale=r[4], chunks=chunks,
                          num_warps=warps)

    def step(self) -> None:
        r = self.regions
        self.K.advance_step(self.state, HYPER["beta1"], HYPER["beta2"])
        self.K.fused_adamw_step(self.tables, self.grads, *r[:3], self.state, **HYPER,
                                stochastic_rounding=not self.spec.has("master"), seed=1,
                                exp_avg_scale=r[3], exp_avg_sq_scale=r[4])


def torch_adamw_fn(shapes, device: torch.device) -> Callable[[], None]:
    """torch fused AdamW on fp32 masters, with the grad upcast and the weight downcast."""
    gen = torch.Generator(device=device).manual_seed(0)
    weights = [(torch.randn(s, device=device, generator=gen) * 0.02).bfloat16() for s in shapes]
    grads = [(torch.randn(s, device=device, generator=gen) * 1e-3).bfloat16() for s in shapes]
    masters = [torch.nn.Parameter(w.float()) for w in weights]
    opt = torch.optim.AdamW(masters, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                            weight_decay=HYPER["weight_decay"], fused=device.type == "cuda")

    def run() -> None:
        for m, g in zip(masters, grads):
            m.grad = g.float()
        opt.step()
        for w, m in zip(weights, masters):
            w.copy_(m.detach())

    return run


def library_8bit_fns(shapes, device: torch.device) -> dict[str, Callable[[], None]]:
    """torchao AdamW8bit and bitsandbytes Adam8bit on bf16 weights, where they import and run."""
    out: dict[str, Callable[[], None]] = {}
    for name, make in (("torchao-AdamW8bit", _torchao_adamw8bit), ("bnb-Adam8bit", _bnb_adam8bit)):
        try:
            cls = make()
        except Exception as exc:  # an optional package: report why and go on
            print(f"# {name}: skipped ({type(exc).__name__}: {exc})")
            continue
        gen = torch.Generator(device=device).manual_seed(0)
        params = [torch.nn.Parameter((torch.randn(s, device=device, generator=gen) * 0.02).bfloat16())
                  for s in shapes]
        grads = [(torch.randn(s, device=device, generator=gen) * 1e-3).bfloat16() for s in shapes]
        try:
            opt = cls(params, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                      weight_decay=HYPER["weight_decay"])

            def run(opt=opt, params=params, grads=grads) -> None:
                for p, g in zip(params, grads):
                    p.grad = g
                opt.step()

            run()
        except Exception as exc:
            print(f"# {name}: skipped, its step failed ({type(exc).__name__}: {exc})")
            continue
        out[name] = run
    return out


def _torchao_adamw8bit():
    try:
        from torchao.optim import AdamW8bit
    except ImportError:
        from torchao.prototype.low_bit_optim import AdamW8bit  # older torchao
    return AdamW8bit


def _bnb_adam8bit():
    import bitsandbytes as bnb

    return bnb.optim.Adam8bit


# ---------------------------------------------------------------------------------------- speed
def run_speed(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    from badam_ext.kernels.launch_config import BLOCK_LOAD
    from badam_ext.kernels.switch_load import chunks_per_program

    bench = timer(device)
    shapes = SMOKE_LAYER if args.smoke else LAYERS[args.layer]
    copy_gbs = copy_bandwidth(device, bench, 0.001 if args.smoke else args.copy_gib)
    print(f"# copy bandwidth: {copy_gbs:.0f} GB/s ({'smoke' if args.smoke else f'{args.copy_gib} GiB fp32 copy'})")
    base = env_record(device)
    base.update(layer="smoke" if args.smoke else args.layer, copy_gbs=round(copy_gbs, 1))
    records = []

    def record(path: str, kind: str, ms: float, numel: int, bytes_per_param: float,
               extra: Optional[dict[str, Any]] = None) -> None:
        gbs = numel * bytes_per_param / ms / 1e6
        rec = dict(base, path=path, kind=kind, ms=round(ms, 4), numel=numel, bytes_per_param=round(bytes_per_param, 4),
                   gbs=round(gbs, 1), frac_copy_bw=round(gbs / copy_gbs, 4), **(extra or {}))
        records.append(rec)
        options = f"c{rec['load_chunks']}" if "load_chunks" in rec else ""
        options += f"w{rec['load_warps']}" if "load_warps" in rec else ""
        options += f"p{rec['prefetch']}" if kind == "step" and rec.get("prefetch") else ""
        print(f"{path:28s} {kind:10s} {rec.get('launch', ''):>9s} {options:>6s} {ms:8.3f} ms  {100 * rec['frac_copy_bw']:5.1f}% of copy BW")

    for launch in args.launch or [None]:
        for maxnreg in args.maxnreg or [None]:
            with launch_override(launch), step_register_cap(maxnreg):
                for fmt in args.formats:
                    layer = Layer(shapes, device, fmt)
                    config = {"launch": f"{layer.tables.block_size}x{layer.tables.num_warps}",
                              "max_registers": layer.tables.step_max_registers}
                    if maxnreg is not None:
                        config["maxnreg"] = maxnreg
                    own_prefetch = layer.tables.step_prefetch
                    for prefetch in [own_prefetch] + [d for d in args.prefetch if d != own_prefetch]:
                        layer.tables.step_prefetch = prefetch
                        record(fmt, "step", bench(layer.step), layer.numel, STEP_BYTES[fmt],
                               dict(config, prefetch=prefetch))
                    layer.tables.step_prefetch = own_prefetch
                    default_chunks = chunks_per_program(layer.tables.block_size, layer.quantized)
                    default_warps = layer.tables.warps_for(BLOCK_LOAD)
                    for chunks in [default_chunks] + [c for c in args.load_chunks if c != default_chunks]:
                        for warps in [default_warps] + [w for w in args.load_warps if w != default_warps]:
                            record(fmt, "block_load", bench(lambda: layer.load(chunks, warps)), layer.numel,
                                   LOAD_BYTES[fmt], dict(config, load_chunks=chunks, load_warps=warps))
                    del layer
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    numel = sum(torch.Size(s).numel() for s in shapes)
    if not args.no_baselines:
        record("torch-AdamW-fused+casts", "step", bench(torch_adamw_fn(shapes, device)), numel, TORCH_ADAMW_BYTES)
        if device.type == "cuda":
            for name, fn in library_8bit_fns(shapes, device).items():
                record(name, "step", bench(fn), numel, EIGHT_BIT_LIB_BYTES)
                del fn
                torch.cuda.empty_cache()
        else:
            print("# torchao / bitsandbytes: skipped (CUDA only)")
    return records


@contextlib.contextmanager
def step_register_cap(maxnreg: Optional[int]):
    """Compile the fused step with at most ``maxnreg`` registers per thread inside the block, whatever
    the launch configuration says (a probe of occupancy against spills)."""
    if maxnreg is None:
        yield
        return
    from badam_ext.kernels import adamw

    kernel = adamw._fused_adamw_kernel
    run = kernel.run
    kernel.run = lambda *a, **kw: run(*a, **{**kw, "maxnreg": maxnreg})
    try:
        yield
    finally:
        kernel.run = run


def launch_override(text: Optional[str]):
    """``launch_config.override`` for a ``BLOCKxWARPS`` text (every kernel); the device's own choice for None."""
    if text is None:
        return contextlib.nullcontext()
    from badam_ext.kernels.launch_config import override, parse_launch_env

    config = parse_launch_env(text)
    return contextlib.nullcontext() if config is None else override(config.block_size, config.num_warps)


# ------------------------------------------------------------------------------------- accuracy
def _ema_float64(grads: list[torch.Tensor], beta1: float, beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.zeros_like(grads[0], dtype=torch.float64)
    v = torch.zeros_like(m)
    for g in grads:
        g = g.double()
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
    return m, v


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


def _grads(shape, steps: int, device: torch.device) -> list[torch.Tensor]:
    """Fixed bf16 gradients with per-row scales spread over two decades (heterogeneous blocks)."""
    gen = torch.Generator(device=device).manual_seed(1)
    rows = torch.exp(torch.randn(shape[0], 1, device=device, generator=gen) * 1.2) * 1e-3
    return [(torch.randn(shape, device=device, generator=gen) * rows).bfloat16() for _ in range(steps)]


def _ours_moments(shape, grads, device: torch.device, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    from badam_ext.states.quant import dequantize, signed_map, unsigned_map

    layer = Layer([shape], device, fmt)
    for g in grads:
        layer.grads = [g]
        layer.step()
    views = layer.arena.views(layer.arena.layout([layer.numel]), [[layer.numel]])
    if fmt.startswith("fp32"):
        return views["exp_avg"][0], views["exp_avg_sq"][0]
    m = dequantize(views["exp_avg"][0], views["exp_avg_scale"][0], signed_map(device))
    v = dequantize(views["exp_avg_sq"][0], views["exp_avg_sq_scale"][0], unsigned_map(device))
    return m, v


def _library_moments(name: str, shape, grads, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """m and v of torchao AdamW8bit / bitsandbytes Adam8bit after the same gradients, dequantized."""
    cls = _torchao_adamw8bit() if name.startswith("torchao") else _bnb_adam8bit()
    p = torch.nn.Parameter(torch.zeros(shape, device=device, dtype=torch.bfloat16))
    opt = cls([p], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"], weight_decay=0.0)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    state = opt.state[p]
    if name.startswith("torchao"):
        return state["exp_avg"].dequantize().flatten(), state["exp_avg_sq"].dequantize().flatten()
    import bitsandbytes.functional as F

    def deq(codes, absmax, qmap):
        block = 1 << round(math.log2(codes.numel() / absmax.numel()))  # their block size, from the state
        return F.dequantize_blockwise(codes, absmax=absmax, code=qmap, blocksize=block).flatten()

    return deq(state["state1"], state["absmax1"], state["qmap1"]), deq(state["state2"], state["absmax2"], state["qmap2"])


def run_accuracy(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    shape = (64, 300) if args.smoke else (4096, 4096)
    steps = 3 if args.smoke else args.steps
    grads = _grads(shape, steps, device)
    m_ref, v_ref = _ema_float64([g.flatten() for g in grads], HYPER["beta1"], HYPER["beta2"])
    base = env_record(device)
    base.update(kind="accuracy", shape=list(shape), steps=steps)
    records = []
    paths: list[tuple[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]]] = [
        (fmt, lambda fmt=fmt: _ours_moments(shape, grads, device, fmt)) for fmt in ("fp32", "8bit")]
    if device.type == "cuda":
        paths += [(name, lambda name=name: _library_moments(name, shape, grads, device))
                  for name in ("torchao-AdamW8bit", "bnb-Adam8bit")]
    for name, fn in paths:
        try:
            m, v = fn()
        except Exception as exc:  # optional packages, or a version whose state layout differs
            print(f"# {name}: skipped ({type(exc).__name__}: {exc})")
            continue
        records.append(dict(base, path=name, exp_avg_rel_err=_rel(m.flatten(), m_ref),
                            exp_avg_sq_rel_err=_rel(v.flatten(), v_ref)))
    return records


def run_finetune(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Each seed, each format: the finetune of :func:`_finetune_one`, its loss against fp32's of that seed."""
    from badam_ext.train import TrainConfig

    steps = 4 if args.smoke else args.steps
    records = []
    for seed in args.seeds:
        cfg = TrainConfig(preset="tiny" if device.type == "cpu" else "small", seq_len=32 if args.smoke else 128,
                          batch_size=2 if args.smoke else 8, seed=seed)
        base = env_record(device)
        base.update(kind="finetune", preset=cfg.preset, steps=steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                    seed=seed)
        for fmt in args.formats:
            records.append(_finetune_one(cfg, fmt, steps, seed, device, base))
    by_seed = {(r["seed"], r["path"]): r for r in records}
    for r in records:
        ref = by_seed.get((r["seed"], "fp32"))
        if ref is not None:
            r["eval_loss_vs_fp32"] = r["eval_loss"] - ref["eval_loss"]
    return records


def print_finetune_summary(records: list[dict[str, Any]]) -> None:
    """Per format over the seeds: mean and spread of the eval loss, and of its difference to fp32's."""
    import statistics

    for fmt in dict.fromkeys(r["path"] for r in records):
        evals = [r["eval_loss"] for r in records if r["path"] == fmt]
        deltas = [r["eval_loss_vs_fp32"] for r in records if r["path"] == fmt and "eval_loss_vs_fp32" in r]
        spread = statistics.stdev(evals) if len(evals) > 1 else 0.0
        line = f"# {fmt:14s} eval loss {statistics.mean(evals):.4f} (sd {spread:.4f}, {len(evals)} seeds)"
        if deltas:
            line += f", vs fp32 {statistics.mean(deltas):+.4f} (per seed: {', '.join(f'{d:+.4f}' for d in deltas)})"
        print(line)


def _finetune_one(cfg: Any, fmt: str, steps: int, seed: int, device: torch.device, base: dict[str, Any]
                  ) -> dict[str, Any]:
    """One finetune of the embedded model with state format ``fmt`` (seed: model, data order, schedule)."""
    from badam_ext import BlockAdam
    from badam_ext.train import build_datasets, build_model, evaluate

    states, master = FORMATS[fmt]
    built = build_model(cfg, device, torch.bfloat16)
    train, evaluation = build_datasets(cfg, built)
    opt = BlockAdam(built.model, lr=1e-3, weight_decay=0.01, switch_every=max(1, steps // 20),
                    switch_mode="random", include_embedding=True, include_lm_head=True, max_grad_norm=1.0,
                    seed=seed, states=states, master=master)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(train), (cfg.batch_size,), generator=gen)
        batch = {k: v.to(device) for k, v in train.batch(idx).items()}
        loss = built.model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    tail = losses[-20:]
    record = dict(base, path=fmt, train_loss=sum(tail) / len(tail), first_loss=losses[0],
                  eval_loss=evaluate(built.model, evaluation, cfg.batch_size, device),
                  arena_bytes=opt.arena.capacity_bytes, seconds=round(time.perf_counter() - t0, 1))
    opt.close()
    return record


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="append JSON lines to this file")
    parser.add_argument("--formats", default="fp32,8bit,8bit-nomaster,fp32-nomaster",
                        help=f"comma-separated, from {', '.join(FORMATS)}")
    parser.add_argument("--no-baselines", action="store_true", help="only our formats")
    parser.add_argument("--launch", default="", help="comma-separated BLOCKxWARPS configurations to sweep "
                        "(default: the device's own); 8-bit formats raise BLOCK to at least 256")
    parser.add_argument("--accuracy", action="store_true", help="quantization error of m and v instead of speed")
    parser.add_argument("--finetune", action="store_true", help="train the embedded model with each format")
    parser.add_argument("--maxnreg", default="", help="comma-separated register caps of the fused step to sweep "
                        "(a probe: occupancy against spills)")
    parser.add_argument("--prefetch", default="", help="comma-separated L2 prefetch distances of the fused step to "
                        "sweep, in programs ahead (0: none; default: the device's own)")
    parser.add_argument("--load-chunks", default="", help="comma-separated chunks per block-load program to "
                        "sweep besides the default (powers of two)")
    parser.add_argument("--load-warps", default="", help="comma-separated warps per block-load program to sweep "
                        "besides the default, at every chunk count")
    parser.add_argument("--layer", default="llama3-8b", choices=sorted(LAYERS),
                        help="the shapes timed: the 8B layer, or one flat tensor of its size")
    parser.add_argument("--seeds", default="0", help="--finetune: comma-separated seeds (model, data order, schedule)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (--accuracy 100, --finetune 300)")
    parser.add_argument("--copy-gib", type=float, default=4.0, help="size of the copy-bandwidth probe")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU: in Triton's interpreter)")
    args = parser.parse_args(argv)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    try:
        args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    args.launch = [c.strip() for c in args.launch.split(",") if c.strip()]
    try:
        args.maxnreg = [int(x) for x in args.maxnreg.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--maxnreg: expected comma-separated integers, got {args.maxnreg!r}")
    try:
        args.prefetch = [int(x) for x in args.prefetch.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--prefetch: expected comma-separated integers, got {args.prefetch!r}")
    from badam_ext.kernels import tuning_cache
    if not all(tuning_cache.valid_prefetch(d) for d in args.prefetch):
        parser.error(f"--prefetch: distances are programs ahead, 0 to {tuning_cache.MAX_PREFETCH}; got {args.prefetch}")
    try:
        args.load_chunks = [int(x) for x in args.load_chunks.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--load-chunks: expected comma-separated integers, got {args.load_chunks!r}")
    try:
        args.load_warps = [int(x) for x in args.load_warps.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--load-warps: expected comma-separated integers, got {args.load_warps!r}")
    unknown = [f for f in args.formats if f not in FORMATS]
    if unknown:
        parser.error(f"unknown format(s) {unknown}; choose from {', '.join(FORMATS)}")
    if args.steps is None:
        args.steps = 300 if args.finetune else 100
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    elif args.smoke or args.finetune:
        device = torch.device("cpu")
    else:
        print("bench_states.py needs a CUDA device (or --smoke for a tiny CPU run in Triton's interpreter, "
              "or --finetune, which also runs on CPU)", file=sys.stderr)
        return 2
    if args.finetune:
        records = run_finetune(args, device)
        print_finetune_summary(records)
    else:
        records = run_accuracy(args, device) if args.accuracy else run_speed(args, device)
    write(args.out, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
