#!/usr/bin/env python3
"""The memory planner against measured peaks, and checkpoint offload's cost, in one process.

For each ``batch x seq`` and offload off / on, on the Llama-3-8B shape (bf16, HF gradient
checkpointing, fused loss, BlockAdam from block 0 with K = 3, so the peak run crosses a switch):
4 training steps; peak allocated over them (``torch.cuda.max_memory_allocated``), the peaks of the
first step's forward and backward, the median forward + backward time of steps 1-3, the bytes the
offloader moved; beside the planner's prediction for the same configuration (and its error). No
memory cap: every configuration runs, so the planner is checked past the 24 GB limit too.

    python bench/bench_memory.py --out results.jsonl
    python bench/bench_memory.py --smoke      # CPU, tiny model: the code path only (no peaks)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _harness as H  # noqa: E402
import _measure as M  # noqa: E402
import _report as R  # noqa: E402
from models import MODEL_NAMES, build_model, config_for, random_batch  # noqa: E402

DEFAULT_SHAPES = ("2x1024", "1x4096", "1x8192", "1x16384", "1x24576", "1x32768")
SMOKE_SHAPES = ("2x16", "1x32")


def _shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        try:
            b, s = item.lower().split("x")
            out.append((int(b), int(s)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shapes are BATCHxSEQ, comma-separated; got {item!r}") from None
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU (or GPU), short sequences")
    p.add_argument("--model", choices=MODEL_NAMES, default=None)
    p.add_argument("--shapes", type=_shapes, default=None, help=f"default {','.join(DEFAULT_SHAPES)}")
    p.add_argument("--offload", default="off,on", help="comma-separated of off,on")
    p.add_argument("--layer-kernels", choices=("auto", "on", "off"), default="auto",
                   help="Liger-Kernel's RMSNorm / SwiGLU in the layers (auto: where Liger is installed, on CUDA)")
    p.add_argument("--reentrant", action="store_true", help="reentrant checkpointing (default non-reentrant)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.model = args.model or ("tiny" if args.smoke else "8b")
    args.shapes = args.shapes or _shapes(",".join(SMOKE_SHAPES if args.smoke else DEFAULT_SHAPES))
    args.offload = [o == "on" for o in args.offload.split(",")]
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def measure(model: torch.nn.Module, batch: int, seq: int, offload: bool, args: argparse.Namespace,
            device: torch.device) -> dict[str, Any]:
    """One configuration: a fresh BlockAdam from block 0, ``args.steps`` steps."""
    from badam_ext import BlockAdam
    from badam_ext.memory import apply_memory_savings, plan_memory

    layer_kernels = {"auto": "auto", "on": True, "off": False}[args.layer_kernels]
    savings = apply_memory_savings(model, offload_checkpoints=offload, budget_gib=None, layer_kernels=layer_kernels)
    opt = BlockAdam(model, lr=1e-5, switch_every=3, switch_mode="ascending", start_block=0)
    data = random_batch(model.config.vocab_size, batch, seq, device, seed=seq)
    _sync(device)
    _reset(device)
    times, phase_peaks, losses = [], {}, []
    for step in range(args.steps):
        _sync(device)
        t0 = time.perf_counter()
        loss = model(**data).loss
        _sync(device)
        if step == 0:
            phase_peaks["forward"] = _peak(device)
            _reset(device)
        loss.backward()
        _sync(device)
        if step == 0:
            phase_peaks["backward"] = _peak(device)
        if step > 0:
            times.append((time.perf_counter() - t0) * 1e3)
        losses.append(float(loss.detach().float()))
        opt.step()
        opt.zero_grad()
    peak = max(v for v in (_peak(device), *phase_peaks.values()) if v is not None) if device.type == "cuda" else None
    stats = savings.stats()
    opt.close()
    savings.remove()
    plan = plan_memory(model.config, batch_size=batch, seq_len=seq, fused_loss=True, offload=offload,
                       layer_kernels=stats["layer_kernels"], loss_backend=stats.get("loss_backend", "auto"))
    predicted = plan.peak_bytes
    record = {
        "kind": "memory_plan", "model": args.model, "bsz": batch, "seq": seq, "offload": offload,
        "layer_kernels": stats["layer_kernels"],
        "reentrant": args.reentrant, "steps": args.steps,
        "peak_alloc_gib": None if peak is None else peak / M.GIB,
        "fwd_peak_gib": None if phase_peaks.get("forward") is None else phase_peaks["forward"] / M.GIB,
        "bwd_peak_gib": None if phase_peaks.get("backward") is None else phase_peaks["backward"] / M.GIB,
        "predicted_gib": predicted / M.GIB, "predicted_at": plan.worst.peak_at,
        "predicted_parts_gib": plan.worst.gib(),
        "error_pct": None if peak is None else 100.0 * (predicted - peak) / peak,
        "fwd_bwd_ms": statistics.median(times) if times else None,
        "offloaded_gib": stats.get("peak_offloaded_bytes", 0) / M.GIB,
        "host_allocations": stats.get("host_allocations"), "loss_backend": stats.get("loss_backend"),
        "losses": losses,
    }
    return record


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = H.device_for(args.smoke, None)
    built = build_model(args.model, device, torch.bfloat16)
    model = built.model
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": args.reentrant})
    env = R.env_info(device)
    records = []
    for batch, seq in args.shapes:
        for offload in args.offload:
            R.log(f"== memory {batch}x{seq} offload={'on' if offload else 'off'}")
            try:
                rec = measure(model, batch, seq, offload, args, device)
            except torch.OutOfMemoryError as exc:
                rec = {"kind": "memory_plan", "bsz": batch, "seq": seq, "offload": offload, "error": R.first_line(str(exc))}
            rec["env"] = env
            records.append(rec)
            R.log(f"   {rec}")
    R.append_jsonl(args.out, records)
    R.print_table(f"Planner vs measured peak allocated ({args.model}, block 0 first, K=3, {args.steps} steps)",
                  ["batch x seq", "offload", "measured GiB", "fwd GiB", "bwd GiB", "predicted GiB", "at", "error %",
                   "fwd+bwd ms", "offloaded GiB"],
                  [[f"{r['bsz']}x{r['seq']}", r["offload"], r.get("peak_alloc_gib"), r.get("fwd_peak_gib"),
                    r.get("bwd_peak_gib"), r.get("predicted_gib"), r.get("predicted_at"), r.get("error_pct"),
                    r.get("fwd_bwd_ms"), r.get("offloaded_gib")] for r in records])
    return records


if __name__ == "__main__":
    main()
