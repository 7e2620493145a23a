"""Tune the kernels' launch configuration on this GPU, then measure the step and the block load with it,
beside the H100 default and torch's AdamW plus casts, in one run.

1. Sweep (``badam_ext.kernels.tune``): fused step, block load and gradient norm at every BLOCK x warps
   candidate over the first layer given (Llama-3-8B by default); write the best into the launch
   cache, which BlockAdam reads (``--no-write``: leave the cache alone).
2. Per layer, with the kernels' default lookup (what BlockAdam launches after step 1):
     fused                 our fused AdamW step (one launch for the block)
     fused b2048 w8        the same at the H100 default, 2048 elements x 8 warps
     block-load            our switch load (master = fp32(weight), m = v = 0)
     block-load own warps  the load at the block size above and the warps tuned for it (when those differ
                           from the step's: what the load gets once its launcher asks for its own warps)
     block-load b2048 w8   the same at the H100 default
     ref-fused             grad .float(), torch AdamW(fused=True), cast + copy into the bf16 weight (CUDA)
     ref-foreach           the same with AdamW(foreach=True)

GB/s counts the bytes a path must move at least: 28 B/param for a step, 14 for a load (bf16).
Targets: step >= 97% of copy bandwidth, block load >= 93%.

    python bench/bench_launch.py [--layers llama3-8b,llama3.2-1b] [--out results.jsonl] [--no-write]
    python bench/bench_launch.py --blocks 512,1024,2048,4096,8192 --warps 2,4,8,16
    python bench/bench_launch.py --smoke        # tiny layer, CPU through Triton's interpreter; no cache write
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
from bench_update import Layer, fused_step_fn, reference_step_fn  # noqa: E402
from badam_ext import kernels as K  # noqa: E402
from badam_ext.kernels import launch_config as lc  # noqa: E402
from badam_ext.kernels import tune  # noqa: E402

STEP_BYTES, LOAD_BYTES = 28, 14
OWN_WARPS_LOAD = "block-load own warps"
TARGETS = {"fused": 0.97, "block-load": 0.93, OWN_WARPS_LOAD: 0.93}
H100_DEFAULT = (2048, 8)
SMOKE_BLOCKS, SMOKE_WARPS = [1024, 4096], [4]


def block_load_fn(layer: Layer, block_size=None, num_warps=None):
    tables = K.BlockTables.build(layer.weights, layer.offsets, [w.dim() > 1 for w in layer.weights],
                                 block_size=block_size)
    if num_warps is not None:  # the load launches with its own entry of the tables' warps
        tables.kernel_warps[lc.BLOCK_LOAD] = num_warps
    return tables, lambda: K.block_load(tables, *layer.regions)


def run_sweep(args, device: torch.device, copy_gbs: float, env: dict, layer_name: str) -> list[dict]:
    """Step 1: the sweep over ``layer_name``; writes the cache unless --no-write or in the interpreter."""
    blocks, warps = (SMOKE_BLOCKS, SMOKE_WARPS) if args.smoke else (args.blocks, args.warps)
    tune.check_candidates(blocks, warps)
    print(f"sweep over {layer_name}: BLOCK {blocks} x warps {warps}")
    trials = tune.sweep(LAYER_SHAPES[layer_name], device, torch.bfloat16, copy_gbs, blocks, warps,
                        warmup_ms=args.warmup, rep_ms=args.rep, log=print)
    best = tune.choose(trials)
    written = None
    if device.type == "cuda" and not args.no_write:
        path = tune.write_choice(best, device, torch.bfloat16, layer_name, copy_gbs)
        written = None if path is None else str(path)
    records = []
    for t in trials:
        records.append({**env, "bench": "launch-sweep", "layer": layer_name, "kernel": t.kernel,
                        "block_size": t.block_size, "num_warps": t.num_warps, "ms": t.ms, "gbs": t.gbs,
                        "frac_copy_bw": t.frac_copy_bw, "copy_gbs": copy_gbs,
                        "chosen": best.get(t.kernel) == t, "cache_written": written})
    return records


def run_layer(name: str, device: torch.device, args, copy_gbs: float, env: dict) -> list[dict]:
    """Step 2: every path over one layer, our kernels at the default lookup and at the H100 default."""
    layer = Layer(LAYER_SHAPES[name], device)
    timing = dict(warmup_ms=args.warmup, rep_ms=args.rep, cpu_reps=args.cpu_reps)
    tables, load = block_load_fn(layer)  # built by the default lookup, as BlockAdam builds its tables
    tuned = (tables.block_size, tables.num_warps)
    source = lc.launch_config(device).source
    paths = {  # path -> (fn, bytes per param, block, warps)
        "fused": (fused_step_fn(layer, args.weight_decay), STEP_BYTES) + tuned,
        f"fused b{H100_DEFAULT[0]} w{H100_DEFAULT[1]}": (fused_step_fn(layer, args.weight_decay, *H100_DEFAULT),
                                                        STEP_BYTES) + H100_DEFAULT,
    }
    paths["block-load"] = (load, LOAD_BYTES) + tuned
    own_warps = lc.default_num_warps(tables.block_size, device, lc.BLOCK_LOAD)
    if own_warps != tables.num_warps:  # the load's own tuned warps, once its launcher asks for them
        _, own = block_load_fn(layer, tables.block_size, own_warps)
        paths[OWN_WARPS_LOAD] = (own, LOAD_BYTES, tables.block_size, own_warps)
    _, load_h100 = block_load_fn(layer, *H100_DEFAULT)
    paths[f"block-load b{H100_DEFAULT[0]} w{H100_DEFAULT[1]}"] = (load_h100, LOAD_BYTES) + H100_DEFAULT
    if device.type == "cuda":  # torch's fused AdamW has no CPU kernel in every version
        paths["ref-fused"] = (reference_step_fn(layer, args.weight_decay, fused=True), STEP_BYTES, None, None)
    paths["ref-foreach"] = (reference_step_fn(layer, args.weight_decay, fused=False), STEP_BYTES, None, None)
    times = {}
    for path, (fn, *_rest) in paths.items():
        times[path] = time_ms(fn, device, **timing)
        free_cuda_memory()
    records = []
    for path, (_fn, per_param, block, warps) in paths.items():
        ms = times[path]
        bw = gbs(per_param * layer.numel, ms)
        target = TARGETS.get(path)
        records.append({
            **env, "bench": "launch", "layer": name, "params": layer.numel, "path": path, "ms": ms, "gbs": bw,
            "frac_copy_bw": bw / copy_gbs, "copy_gbs": copy_gbs, "bytes_per_param": per_param,
            "block_size": block, "num_warps": warps, "launch_source": source if path in TARGETS else None,
            "target_frac": target, "target_met": None if target is None else bw / copy_gbs >= target,
            "speedup_vs": {p: times[p] / ms for p in times if p.startswith("ref") and per_param == STEP_BYTES},
            "weight_decay": args.weight_decay,
        })
    return records


def main(argv=None) -> None:
    parser = layer_bench_parser(__doc__, LAYER_SHAPES)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--blocks", type=tune._ints, default=list(tune.DEFAULT_BLOCKS), help="elements per program")
    parser.add_argument("--warps", type=tune._ints, default=list(tune.DEFAULT_WARPS), help="warps per program")
    parser.add_argument("--no-write", action="store_true", help="do not write the launch cache")
    parser.add_argument("--no-sweep", action="store_true", help="skip step 1 (measure with the cache as it is)")
    args, layers, device, env, copy_gbs = layer_bench_setup(parser, argv, LAYER_SHAPES)
    env = {**env, "triton_interpret": lc.interpreted()}
    records = [] if args.no_sweep else run_sweep(args, device, copy_gbs, env, layers[0])
    for name in layers:
        records += run_layer(name, device, args, copy_gbs, env)
    rows = []
    for r in records:
        if r["bench"] != "launch":
            continue
        met = "-" if r["target_met"] is None else ("met" if r["target_met"] else "NOT met")
        ratios = " ".join(f"{k}:{v:.2f}x" for k, v in r["speedup_vs"].items())
        config = "-" if r["block_size"] is None else f"{r['block_size']}x{r['num_warps']}"
        rows.append([r["layer"], r["path"], config, r["ms"], r["gbs"], r["frac_copy_bw"], met, ratios])
    print_table(f"launch configuration ({env['device']}, copy bandwidth {copy_gbs:.0f} GB/s)",
                ["layer", "path", "BLOCKxwarps", "ms", "GB/s", "of copy BW", "target", "ref time / this time"], rows)
    append_jsonl(args.out, records)


if __name__ == "__main__":
    main()
