"""Benchmark a block switch's data movement for one transformer layer (bf16 weights).

Paths timed per layer:
  block-load     our switch: one block_load launch (master = fp32(weight), m = v = 0 in the arena)
  tables+load    BlockTables.build (host tables, one small copy to the device) plus block_load,
                 timed on the host clock around a synchronized switch
  ref-switch     the reference BAdam: per tensor p.clone().float() as the new fp32 master and a
                 fresh AdamW state (zeros_like for exp_avg and exp_avg_sq, as torch creates it);
                 its gc.collect() / empty_cache() and param-group rebuild are not included

GB/s counts the 14 bytes per parameter a switch must move at minimum (read the bf16 weight,
write fp32 master / m / v) for every path.

    python bench/bench_switch.py [--layers llama3-8b,llama3.2-1b] [--out results.jsonl]
    python bench/bench_switch.py --smoke
"""
from __future__ import annotations

import statistics
import sys
import time

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

SWITCH_BYTES_PER_PARAM = 14
from badam_ext.contract import OFFSET_ALIGN as ARENA_ALIGN  # noqa: E402  (the one alignment rule)


def arena_offsets(numels: list[int]) -> tuple[list[int], int]:
    offsets, end = [], 0
    for n in numels:
        offsets.append(end)
        end = -(-(end + n) // ARENA_ALIGN) * ARENA_ALIGN
    return offsets, end


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_ms(fn, device: torch.device, reps: int) -> float:
    """Median wall-clock ms of a synchronized call (for work that includes host-side table building)."""
    fn()
    _sync(device)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def run_layer(name: str, device: torch.device, args, copy_gbs: float, env: dict) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    weights = [(torch.randn(s, device=device, generator=gen) * 0.02).to(torch.bfloat16) for s in LAYER_SHAPES[name]]
    numel = sum(w.numel() for w in weights)
    offsets, capacity = arena_offsets([w.numel() for w in weights])
    regions = [torch.empty(capacity, device=device) for _ in range(3)]
    decay = [w.dim() > 1 for w in weights]
    tables = K.BlockTables.build(weights, offsets, decay)

    def ours() -> None:
        K.block_load(tables, *regions)

    def ours_with_tables() -> None:
        K.block_load(K.BlockTables.build(weights, offsets, decay), *regions)

    def reference() -> list:
        state = []
        for p in weights:
            master = p.clone().float()
            state.append((master, torch.zeros_like(master), torch.zeros_like(master)))
        return state

    timing = dict(warmup_ms=args.warmup, rep_ms=args.rep, cpu_reps=args.cpu_reps)
    times = {"block-load": time_ms(ours, device, **timing)}
    times["tables+load"] = host_ms(ours_with_tables, device, reps=max(3, args.cpu_reps))
    free_cuda_memory()
    times["ref-switch"] = time_ms(reference, device, **timing)
    free_cuda_memory()
    nbytes = SWITCH_BYTES_PER_PARAM * numel
    records = []
    for path, ms in times.items():
        bw = gbs(nbytes, ms)
        records.append({
            **env, "bench": "switch", "layer": name, "params": numel, "path": path, "ms": ms, "gbs": bw,
            "frac_copy_bw": bw / copy_gbs, "copy_gbs": copy_gbs, "speedup_vs_ref": times["ref-switch"] / ms,
            "bytes_per_param": SWITCH_BYTES_PER_PARAM, "block_size": tables.block_size, "num_warps": tables.num_warps,
        })
    return records


def main(argv=None) -> None:
    parser = layer_bench_parser(__doc__, LAYER_SHAPES)
    args, layers, device, env, copy_gbs = layer_bench_setup(parser, argv, LAYER_SHAPES)
    records = []
    for name in layers:
        records += run_layer(name, device, args, copy_gbs, env)
    rows = [[r["layer"], r["path"], f"{r['params'] / 1e6:.1f}M", r["ms"], r["gbs"], r["frac_copy_bw"],
             f"{r['speedup_vs_ref']:.2f}x"] for r in records]
    print_table(f"block switch, {SWITCH_BYTES_PER_PARAM} B/param floor ({env['device']})",
                ["layer", "path", "params", "ms", "GB/s", "of copy BW", "ref time / this time"], rows)
    append_jsonl(args.out, records)


if __name__ == "__main__":
    main()
