#!/usr/bin/env python3
"""Where checkpoint offload's time goes: host-link bandwidth, and the step with offload off / on.

1. Pinned host <-> device copy bandwidth (what the offload's copies can reach), 16 MiB (one layer's
   input at 2 x 1024 tokens of the 8B shape) and 512 MiB transfers, CUDA events, median of 20.
2. For each ``batch x seq``: forward + backward with block 0 active (the full backward, every layer's
   input offloaded), offload off then on, ``--steps`` steps after 2 warm-up steps, CUDA-event medians,
   with the copy time of the side stream.
3. ``--profile``: one offloaded step under ``torch.profiler``; the top CUDA kernels and memcpys.

    python bench/bench_offload.py --shapes 2x1024,1x4096 --profile --out results.jsonl
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _measure as M  # noqa: E402
import _report as R  # noqa: E402
from models import MODEL_NAMES, build_model, random_batch  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODEL_NAMES, default="8b")
    p.add_argument("--shapes", default="2x1024,1x4096")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def link_bandwidth(device: torch.device) -> list[dict[str, Any]]:
    """Pinned D2H / H2D copy bandwidth in GB/s."""
    rows = []
    for nbytes in (16 << 20, 512 << 20):
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        for name, dst, src in (("d2h", host, dev), ("h2d", dev, host)):
            times = []
            for _ in range(22):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                dst.copy_(src, non_blocking=True)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            ms = statistics.median(times[2:])
            rows.append({"kind": "host_link", "direction": name, "mib": nbytes >> 20, "ms": ms,
                         "gb_per_s": nbytes / ms / 1e6})
    return rows


def step_times(model: torch.nn.Module, data: dict, opt: Any, steps: int) -> list[float]:
    out = []
    for i in range(steps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        model(**data).loss.backward()
        end.record()
        torch.cuda.synchronize()
        opt.zero_grad()
        if i >= 2:
            out.append(start.elapsed_time(end))
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = torch.device("cuda")
    records: list[dict[str, Any]] = link_bandwidth(device)
    for r in records:
        R.log(f"   {r}")
    built = build_model(args.model, device, torch.bfloat16)
    model = built.model
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from badam_ext import BlockAdam, apply_memory_savings

    env = R.env_info(device)
    for item in args.shapes.split(","):
        batch, seq = (int(v) for v in item.split("x"))
        data = random_batch(model.config.vocab_size, batch, seq, device, seed=seq)
        row: dict[str, Any] = {"kind": "offload_cost", "model": args.model, "bsz": batch, "seq": seq, "env": env}
        for offload in (False, True):
            savings = apply_memory_savings(model, offload_checkpoints=offload, budget_gib=None,
                                           batch_size=batch, seq_len=seq)
            opt = BlockAdam(model, lr=1e-5, switch_mode="fixed", start_block=0)
            times = step_times(model, data, opt, args.steps)
            key = "on" if offload else "off"
            row[f"ms_{key}"] = statistics.median(times)
            row[f"ms_{key}_all"] = times
            if offload:
                stats = savings.stats()
                row.update(offloaded_gib=stats["peak_offloaded_bytes"] / M.GIB,
                           host_allocations=stats["host_allocations"], layer_kernels=stats["layer_kernels"])
                if args.profile and item == args.shapes.split(",")[0]:
                    row["profile"] = profile_step(model, data, opt)
            opt.close()
            savings.remove()
        row["ratio"] = row["ms_on"] / row["ms_off"]
        R.log(f"   {row}")
        records.append(row)
    R.append_jsonl(args.out, records)
    return records


def profile_step(model: torch.nn.Module, data: dict, opt: Any) -> list[dict[str, Any]]:
    """The 25 CUDA activities of one offloaded step with the most device time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model(**data).loss.backward()
        torch.cuda.synchronize()
    opt.zero_grad()
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, "device_time_total", 0.0), reverse=True)
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=25))
    return [{"name": e.key[:80], "count": e.count, "device_ms": getattr(e, "device_time_total", 0.0) / 1e3,
             "cpu_ms": e.cpu_time_total / 1e3} for e in events[:25]]


if __name__ == "__main__":
    main()
