"""Benchmark one optimizer step on an active block (one transformer layer, bf16 weights and grads).

Paths timed per layer:
  fused          our fused AdamW step: advance_step + one fused_adamw_step launch for the block
  fused-sr       the same with stochastic rounding of the bf16 weights
  fused-split    the same kernel launched once per tensor (one launch group per tensor)
  ref-foreach    the reference BAdam update: per tensor hp.grad = lp.grad.float(); torch AdamW
                 (foreach=True).step() on the fp32 masters; lp.data.copy_(hp.to(lp.dtype))
  ref-fused      the same with torch AdamW(fused=True)

GB/s counts the 28 bytes per parameter a step must move at minimum (read bf16 grad and fp32
master/m/v, write fp32 master/m/v and the bf16 weight) for every path, so the columns compare.

    python bench/bench_update.py [--layers llama3-8b,llama3.2-1b] [--out results.jsonl]
    python bench/bench_update.py --smoke          # tiny sizes; on CPU through Triton's interpreter
    python bench/bench_update.py --sweep 2048:4,2048:8,4096:8,4096:16   # block size : warps
"""
from __future__ import annotations

import sys

from _common import enable_interpreter_if_cpu_smoke

enable_interpreter_if_cpu_smoke(sys.argv)  # before anything imports triton

import torch  # noqa: E402

from _common import (  # noqa: E402
    LAYER_SHAPES,
    append_jsonl,
    free_cuda_memory,
    gbs,
    layer_bench_parser,
    layer_bench_setup,
    print_table,
    time_ms,
)
from badam_ext import kernels as K  # noqa: E402

STEP_BYTES_PER_PARAM = 28
from badam_ext.contract import OFFSET_ALIGN as ARENA_ALIGN  # noqa: E402  (the one alignment rule)
BETAS = (0.9, 0.999)
EPS = 1e-8
LR = 1e-5


def arena_offsets(numels: list[int]) -> tuple[list[int], int]:
    offsets, end = [], 0
    for n in numels:
        offsets.append(end)
        end = -(-(end + n) // ARENA_ALIGN) * ARENA_ALIGN
    return offsets, end


class Layer:
    """Random bf16 weights and grads of one layer, plus a fp32 arena holding master / m / v."""

    def __init__(self, shapes: list[tuple[int, ...]], device: torch.device, dtype: torch.dtype = torch.bfloat16):
        gen = torch.Generator(device=device).manual_seed(0)
        self.weights = [(torch.randn(s, device=device, generator=gen) * 0.02).to(dtype) for s in shapes]
        self.grads = [(torch.randn(s, device=device, generator=gen) * 1e-3).to(dtype) for s in shapes]
        self.offsets, capacity = arena_offsets([w.numel() for w in self.weights])
        self.regions = [torch.zeros(capacity, device=device) for _ in range(3)]
        self.numel = sum(w.numel() for w in self.weights)
        self.device = device


def fused_step_fn(layer: Layer, weight_decay: float, block_size=None, num_warps=None, split: bool = False,
                  stochastic: bool = False):
    groups = [[i] for i in range(len(layer.weights))] if split else [list(range(len(layer.weights)))]
    tables = []
    for idx in groups:
        t = K.BlockTables.build([layer.weights[i] for i in idx], [layer.offsets[i] for i in idx],
                                [True] * len(idx), block_size=block_size)
        if num_warps is not None:
            t.num_warps = num_warps
        K.block_load(t, *layer.regions)
        tables.append((t, [layer.grads[i] for i in idx]))
    state = K.new_step_state(layer.device)
    seed = [0]

    def step() -> None:
        K.advance_step(state, *BETAS)
        seed[0] += 1
        for t, grads in tables:
            K.fused_adamw_step(t, grads, *layer.regions, state, lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                               weight_decay=weight_decay, stochastic_rounding=stochastic, seed=seed[0])

    return step


def reference_step_fn(layer: Layer, weight_decay: float, fused: bool):
    masters = [torch.nn.Parameter(w.detach().float()) for w in layer.weights]
    kwargs = {"fused": True} if fused else {"foreach": True}
    opt = torch.optim.AdamW(masters, lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay, **kwargs)

    def step() -> None:
        for hp, g in zip(masters, layer.grads):
            hp.grad = g.float()
        opt.step()
        for lp, hp in zip(layer.weights, masters):
            lp.data.copy_(hp.to(lp.dtype))

    return step


def run_layer(name: str, device: torch.device, args, copy_gbs: float, env: dict) -> list[dict]:
    layer = Layer(LAYER_SHAPES[name], device)
    nbytes = STEP_BYTES_PER_PARAM * layer.numel
    timing = dict(warmup_ms=args.warmup, rep_ms=args.rep, cpu_reps=args.cpu_reps)
    paths = {"fused": fused_step_fn(layer, args.weight_decay)}
    if not args.sweep:
        paths["fused-sr"] = fused_step_fn(layer, args.weight_decay, stochastic=True)
        paths["fused-split"] = fused_step_fn(layer, args.weight_decay, split=True)
        paths["ref-foreach"] = reference_step_fn(layer, args.weight_decay, fused=False)
        if device.type == "cuda":  # torch's fused AdamW has no CPU kernel in every version
            paths["ref-fused"] = reference_step_fn(layer, args.weight_decay, fused=True)
    for spec in args.sweep:
        block, warps = (int(x) for x in spec.split(":"))
        paths[f"fused b{block} w{warps}"] = fused_step_fn(layer, args.weight_decay, block, warps)
    times = {}
    for path, fn in paths.items():
        times[path] = time_ms(fn, device, **timing)
        free_cuda_memory()
    records = []
    for path, ms in times.items():
        bw = gbs(nbytes, ms)
        records.append({
            **env, "bench": "update", "layer": name, "params": layer.numel, "path": path, "ms": ms,
            "gbs": bw, "frac_copy_bw": bw / copy_gbs, "copy_gbs": copy_gbs,
            "speedup_vs": {p: times[p] / ms for p in times if p.startswith("ref")},
            "bytes_per_param": STEP_BYTES_PER_PARAM, "weight_decay": args.weight_decay,
        })
    return records


def main(argv=None) -> None:
    parser = layer_bench_parser(__doc__, LAYER_SHAPES)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--sweep", type=lambda s: [x for x in s.split(",") if x], default=[],
                        help="only our kernel, at these BLOCK:WARPS configurations (e.g. 2048:4,4096:8)")
    args, layers, device, env, copy_gbs = layer_bench_setup(parser, argv, LAYER_SHAPES)
    records = []
    for name in layers:
        records += run_layer(name, device, args, copy_gbs, env)
    rows = []
    for r in records:
        ratios = " ".join(f"{k}:{v:.2f}x" for k, v in r["speedup_vs"].items())
        rows.append([r["layer"], r["path"], f"{r['params'] / 1e6:.1f}M", r["ms"], r["gbs"], r["frac_copy_bw"], ratios])
    print_table(f"optimizer step, {STEP_BYTES_PER_PARAM} B/param floor ({env['device']})",
                ["layer", "path", "params", "ms", "GB/s", "of copy BW", "ref time / this time"], rows)
    append_jsonl(args.out, records)


if __name__ == "__main__":
    main()
