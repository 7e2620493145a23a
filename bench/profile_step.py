#!/usr/bin/env python3
"""Where one BAdam training step's GPU time goes: eager layers against regionally compiled ones.

Builds the 8B shape (``--layers`` of them, random weights), trains ``--warmup`` steps with BlockAdam
(K = 1, ascending from ``--start-block``, pruning, non-reentrant checkpointing), then profiles one
step with ``torch.profiler`` and prints the kernels with the most device time, for forward and
backward separately (``record_function`` ranges). It also prints the wall time of the step's forward
and backward (median of ``--timed`` steps at the same active block, CUDA events), can write the
profile as a Chrome trace (``--trace``), and can report every host-device synchronisation of one step
with its stack (``--sync-debug``: ``torch.cuda.set_sync_debug_mode``).

    python bench/profile_step.py --layers 8 [--compiled] [--top 15] [--trace t.json.gz] [--sync-debug]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import traceback
import warnings

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from models import build_model, config_for


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the 8B shape")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5, help="steps before the profiled one (block switches)")
    p.add_argument("--compiled", action="store_true", help="badam_ext.compile_layers (inductor)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--start-block", type=int, default=0, help="the first active block (the warm-up switches on)")
    p.add_argument("--timed", type=int, default=5, help="steps timed at the profiled step's block (K = that many)")
    p.add_argument("--no-preserve-rng", action="store_true",
                   help="checkpointing with preserve_rng_state=False (no RNG in the layers: dropout 0)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode of --compiled")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --compiled (aot_eager: "
                   "AOTAutograd's graphs run eagerly, no Inductor)")
    p.add_argument("--trace", default=None, help="write the profiled step as a Chrome trace (.json or .json.gz)")
    p.add_argument("--sync-debug", action="store_true", help="print each host-device sync of one step with its stack")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_step.py needs a CUDA device", file=sys.stderr)
        return 2
    from badam_ext import BlockAdam, compile_layers

    config = config_for("8b")
    config.num_hidden_layers = args.layers
    model = build_model("8b", torch.device("cuda"), torch.bfloat16, config=config).model
    model.train()
    checkpointing = {"use_reentrant": False}
    if args.no_preserve_rng:
        checkpointing["preserve_rng_state"] = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    if args.compiled:
        compile_layers(model, backend=args.compile_backend, **({"mode": args.compile_mode} if args.compile_mode else {}))
    # K = 1 through the warm-up, then the profiled block stays active for the timed steps
    opt = BlockAdam(model, lr=1e-5, switch_every=1, switch_mode="ascending", start_block=args.start_block)
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device="cuda", generator=gen)

    events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]

    def step() -> tuple[float, float]:
        events[0].record()
        with record_function("forward"):
            loss = model(input_ids=ids, labels=ids).loss
        events[1].record()
        with record_function("backward"):
            loss.backward()
        events[2].record()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        return events[0].elapsed_time(events[1]), events[1].elapsed_time(events[2])

    for _ in range(args.warmup):
        step()
    opt.schedule.switch_every = args.timed + 3  # stay on this block: the timed steps, sync debug, profile
    block = opt.active_block
    times = [step() for _ in range(args.timed)]
    if opt.active_block != block:
        raise RuntimeError(f"the active block moved during the timed steps ({block} -> {opt.active_block})")
    retries = torch.cuda.memory_stats()["num_alloc_retries"]
    label = (f"{'compiled (' + args.compile_backend + ')' if args.compiled else 'eager'} layers"
             f"{' (' + args.compile_mode + ')' if args.compile_mode else ''}")
    print(f"# {label}, {args.layers} of the 8B shape, {args.batch} x {args.seq}, active block {opt.active_block}, "
          f"checkpointing {checkpointing}")
    print(f"step wall time (median of {len(times)}): forward {statistics.median(t[0] for t in times):.2f} ms, "
          f"backward {statistics.median(t[1] for t in times):.2f} ms; allocator retries {retries} after the warm-up, "
          f"{torch.cuda.memory_stats()['num_alloc_retries'] - retries} in the timed steps")
    if args.compiled:
        from torch._dynamo.utils import counters

        print(f"compiled graphs: {counters['stats']['unique_graphs']}")
    if args.sync_debug:
        print_syncs(step)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70))
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"trace: {args.trace}")
    return 0


def print_syncs(step) -> None:
    """Run one step with CUDA sync debugging on and print each synchronising call's stack (once each)."""
    seen: dict[str, int] = {}

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        where = "".join(traceback.format_stack(limit=14)[:-2])
        key = f"{message}\n{where}"
        seen[key] = seen.get(key, 0) + 1

    previous = warnings.showwarning
    warnings.showwarning = show
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = previous
    print(f"host-device synchronisations in one step: {sum(seen.values())} ({len(seen)} distinct)")
    for key, count in seen.items():
        print(f"--- x{count}\n{key}")


if __name__ == "__main__":
    sys.exit(main())
