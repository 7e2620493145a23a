#!/usr/bin/env python3
"""The 24 GB-card mode: the longest sequence that trains within a memory budget.

torch's caching allocator is capped at ``--budget-gib`` (23 GiB by default, what a 24 GB card leaves
after the CUDA context) with ``torch.cuda.set_per_process_memory_fraction``. For each optimizer
(``ours``: BlockAdam; ``ref``: the reference BAdam with HF checkpointing) on the Llama-3-8B shape,
batch 2, sequence lengths are tried in ascending order, each attempt in a fresh process (an OOM
leaves allocator state behind; forked by default, ``--isolation subprocess`` re-invokes the script)
running ``--steps`` training steps that include a block switch. The search stops at the first OOM
and then tries one length half-way back (``--no-bisect`` to skip).

``--chunked-loss`` adds a second search per optimizer with the chunked cross-entropy (no full fp32
logits), reported apart from the like-for-like Hugging Face loss.

    python bench/bench_budget.py --out results.jsonl
    python bench/bench_budget.py --smoke        # CPU: OOMs simulated above --simulate-oom-above
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

_START = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import enable_interpreter_if_cpu_smoke  # noqa: E402

enable_interpreter_if_cpu_smoke(sys.argv)  # before anything imports triton

import torch  # noqa: E402

import _harness as H  # noqa: E402
import _measure as M  # noqa: E402
import _report as R  # noqa: E402
from bench_e2e import (SETUPS, add_common_args, common_child_argv, finish_common_args,  # noqa: E402
                       reference_missing, summarize, train_steps)
from _memory_setups import liger_missing  # noqa: E402
from models import MODEL_NAMES, build_model, random_batch  # noqa: E402

SCRIPT = os.path.abspath(__file__)
BUDGET_SETUPS = SETUPS  # bench_e2e registers the memory variants (bench/_memory_setups.py)
OPTIMIZERS = ("ours", "ref", "ours_saved", "ours_saved_8bit", "ours_offload", "ours_liger", "ref_liger")
DEFAULT_OPTIMIZERS = ("ours_saved", "ref", "ref_liger")
DEFAULT_LENGTHS = (1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768)
SMOKE_LENGTHS = (16, 24, 32, 48)


def _lengths(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"lengths must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 2 for v in values) or values != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"lengths must be distinct, ascending and >= 2, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--model", choices=MODEL_NAMES, default=None, help="model shape (default 8b; smoke: tiny)")
    p.add_argument("--budget-gib", type=float, default=23.0, help="cap on torch's allocator, GiB")
    p.add_argument("--lengths", type=_lengths, default=None,
                   help=f"ascending sequence lengths (default {','.join(map(str, DEFAULT_LENGTHS))})")
    p.add_argument("--steps", type=int, default=3, help="training steps per attempt (a switch must happen)")
    p.add_argument("--optimizers", type=H.csv_choices(OPTIMIZERS), default=list(DEFAULT_OPTIMIZERS),
                   help=f"of {','.join(OPTIMIZERS)} (default {','.join(DEFAULT_OPTIMIZERS)}); ours_saved is "
                        "BlockAdam with apply_memory_savings, *_liger add Liger-Kernel's patches by hand")
    p.add_argument("--lengths-for", action="append", default=[], metavar="VARIANT=L1,L2,...",
                   help="per-variant lengths, overriding --lengths for that variant (repeatable)")
    p.add_argument("--chunked-loss", action="store_true",
                   help="also search with the chunked cross-entropy (reported separately)")
    p.add_argument("--no-bisect", dest="bisect", action="store_false",
                   help="do not try a length between the last fit and the first OOM")
    p.add_argument("--bisect-granularity", type=int, default=None, help="round the bisected length (default 256)")
    p.add_argument("--simulate-oom-above", type=int, default=None,
                   help="testing aid: raise an OOM before the forward when seq exceeds this (smoke default 24)")
    p.add_argument("--seq", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    H.add_child_arg(p, OPTIMIZERS)
    args = p.parse_args(argv)
    finish_common_args(p, args)
    if args.variant is not None and args.seq is None:
        p.error("child mode needs --seq")
    args.model = args.model or ("tiny" if args.smoke else "8b")
    args.lengths = args.lengths or list(SMOKE_LENGTHS if args.smoke else DEFAULT_LENGTHS)
    args.bisect_granularity = args.bisect_granularity or (4 if args.smoke else 256)
    if args.simulate_oom_above is None and args.smoke:
        args.simulate_oom_above = 24
    if args.steps < 1 or args.budget_gib <= 0 or args.bisect_granularity < 1:
        p.error("need --steps >= 1, --budget-gib > 0, --bisect-granularity >= 1")
    for item in args.lengths_for:
        name, sep, values = item.partition("=")
        if not sep or name not in OPTIMIZERS:
            p.error(f"--lengths-for wants VARIANT=L1,L2 with VARIANT of {OPTIMIZERS}, got {item!r}")
        _lengths(values)
    if args.steps < args.switch_every:
        p.error(f"--steps {args.steps} < --switch-every {args.switch_every}: no block switch would happen")
    return args


def child_argv(args: argparse.Namespace, variant: str, seq: int, loss: str) -> list[str]:
    argv = common_child_argv(args)
    argv[argv.index("--loss") + 1] = loss
    argv += ["--model", args.model, "--budget-gib", repr(args.budget_gib), "--steps", str(args.steps),
             "--seq", str(seq), "--variant", variant]
    if args.simulate_oom_above is not None:
        argv += ["--simulate-oom-above", str(args.simulate_oom_above)]
    return argv


# ------------------------------------------------------------------------------------- the child
def apply_budget(device: torch.device, budget_gib: float) -> dict[str, Any]:
    """Cap torch's allocator on ``device`` at ``budget_gib`` (CUDA only); must run before allocations."""
    if device.type != "cuda":
        return {"budget_applied": False}
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = budget_gib * M.GIB / total
    if fraction >= 1.0:
        raise ValueError(f"--budget-gib {budget_gib} is not below the device's {total / M.GIB:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return {"budget_applied": True, "memory_fraction": fraction}


def run_attempt(args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    phases = M.ScriptPhases(f"budget/{args.variant}/{args.loss}/{args.seq}")
    phases.seconds["import"] = H.import_seconds(_START)
    record: dict[str, Any] = {"phases_s": phases.seconds}
    if args.variant.startswith("ref") and (why := reference_missing()):
        record.update(status="not_installed", error=why)
        return record
    if args.variant.endswith("liger") and (why := liger_missing()):
        record.update(status="not_installed", error=why)
        return record
    device = H.device_for(args.smoke, args.device)
    record.update(apply_budget(device, args.budget_gib))
    record["env"] = R.env_info(device)
    with phases.phase("device_init"):
        H.init_device(device)
    ctx["phase"] = "build"
    with phases.phase("build"):
        built = build_model(args.model, device, torch.bfloat16, seed=args.seed)
    record.update(built.describe())
    watch = M.MemoryWatch(device)
    ctx["watch"] = watch
    watch.reset()
    ctx["phase"] = "setup"
    with phases.phase("setup"):
        harness = BUDGET_SETUPS[args.variant](built.model, args)
    batch = random_batch(built.model.config.vocab_size, args.batch, args.seq, device, seed=args.seed)

    def simulate() -> None:
        if args.simulate_oom_above is not None and args.seq > args.simulate_oom_above:
            raise torch.OutOfMemoryError(
                f"simulated OOM: seq {args.seq} > --simulate-oom-above {args.simulate_oom_above}")

    with phases.phase("train"):
        timings = train_steps(built.model, harness, batch, args, 0, args.steps, M.Clock(device), watch, ctx,
                              fail_before_forward=simulate)
    summary = summarize(timings, args, harness.num_blocks)
    record.update({k: summary[k] for k in ("mean_step_ms", "fwd_ms", "bwd_ms", "opt_ms", "opt_switch_ms",
                                           "switches", "final_loss")})
    if summary["switches"] < 1:
        raise RuntimeError(f"no block switch in {args.steps} steps with K={args.switch_every}; raise --steps")
    record.update(watch.peaks())
    watch.close()
    savings = getattr(harness, "savings", None)
    if savings is not None:  # after the steps: what "auto" chose, bytes offloaded, host allocations
        record["memory_savings"] = R.jsonable(savings.stats())
    return record


def child_main(argv: list[str]) -> dict[str, Any]:
    args = parse_args(argv)
    record = H.run_tracked(lambda ctx: run_attempt(args, ctx))
    record.update(kind="budget_attempt", variant=args.variant, model=args.model, bsz=args.batch, seqlen=args.seq,
                  loss=args.loss, budget_gib=args.budget_gib, steps=args.steps, switch_every=args.switch_every,
                  simulated_oom_above=args.simulate_oom_above)
    record["fits"] = {"ok": True, "oom": False}.get(record.get("status"))
    return record


# ------------------------------------------------------------------------------------ the parent
def lengths_for(args: argparse.Namespace, variant: str) -> list[int]:
    """The lengths to try for ``variant``: its ``--lengths-for`` entry, else ``--lengths``."""
    for item in args.lengths_for:
        name, _, values = item.partition("=")
        if name == variant:
            return _lengths(values)
    return list(args.lengths)


def _attempt(args: argparse.Namespace, argv: list[str], variant: str, seq: int, loss: str) -> dict[str, Any]:
    label = f"budget {variant} loss={loss} seq={seq}"
    return BENCH.run_child(args, argv, child_argv(args, variant, seq, loss), label)


def search(args: argparse.Namespace, argv: list[str], variant: str, loss: str) -> list[dict[str, Any]]:
    """Attempts in ascending order up to the first OOM, then one bisection step; then a summary record."""
    attempts: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    first_oom: int | None = None
    stopped = None
    for seq in lengths_for(args, variant):
        rec = _attempt(args, argv, variant, seq, loss)
        attempts.append(rec)
        if rec.get("status") == "ok":
            best = rec
            continue
        if rec.get("status") == "oom":
            first_oom = seq
        else:
            stopped = f"{rec.get('status')}: {rec.get('error')}"
        break
    if args.bisect and best is not None and first_oom is not None:
        g = args.bisect_granularity
        mid = (best["seqlen"] + first_oom) // 2 // g * g
        if best["seqlen"] < mid < first_oom:
            rec = _attempt(args, argv, variant, mid, loss)
            attempts.append(rec)
            if rec.get("status") == "ok":
                best = rec
            elif rec.get("status") == "oom":
                first_oom = mid
    summary: dict[str, Any] = {
        "kind": "budget_summary", "variant": variant, "loss": loss, "model": args.model, "bsz": args.batch,
        "budget_gib": args.budget_gib, "lengths_tried": [a["seqlen"] for a in attempts],
        "max_fit_seq": best["seqlen"] if best else None, "first_oom_seq": first_oom,
        "all_lengths_fit": best is not None and first_oom is None and stopped is None,
        "stopped_by": stopped, "command": [sys.executable, SCRIPT, *argv],
        "env": next((a["env"] for a in attempts if "env" in a), None),
    }
    for key in ("peak_alloc_gib", "peak_reserved_gib", "nvml_peak_gib", "mean_step_ms"):
        summary[f"{key}_at_max"] = best.get(key) if best else None
    oom = next((a for a in attempts if a.get("status") == "oom"), None)
    summary["oom_error"] = oom.get("error") if oom else None
    return attempts + [summary]


def print_summary(args: argparse.Namespace, records: list[dict[str, Any]]) -> None:
    attempts = [r for r in records if r["kind"] == "budget_attempt"]
    summaries = [r for r in records if r["kind"] == "budget_summary"]
    env = next((r["env"] for r in records if r.get("env")), {}) or {}
    first = summaries[0] if summaries else {}
    R.print_table(f"Budget attempts: {first.get('model')} bsz {first.get('bsz')}, torch capped at "
                  f"{first.get('budget_gib')} GiB, on {env.get('device', '?')}",
                  ["optimizer", "loss", "seq", "status", "alloc GiB", "reserved GiB", "NVML GiB", "step ms"],
                  [[a["variant"], a["loss"], a["seqlen"], a.get("status"), a.get("peak_alloc_gib"),
                    a.get("peak_reserved_gib"), a.get("nvml_peak_gib"), a.get("mean_step_ms")] for a in attempts])
    ref = {s["loss"]: s for s in summaries if s["variant"] == "ref"}
    rows = []
    for s in summaries:
        base = ref.get(s["loss"])
        first_oom = s["first_oom_seq"] or ("none" if s["all_lengths_fit"] else "-")
        rows.append([s["variant"], s["loss"], s["max_fit_seq"], first_oom,
                     s["peak_alloc_gib_at_max"], s["peak_reserved_gib_at_max"], s["nvml_peak_gib_at_max"],
                     R.fmt_ratio(s["max_fit_seq"], base["max_fit_seq"] if base else None)])
    R.print_table("Longest sequence within the budget (ratio vs the reference with the same loss)",
                  ["optimizer", "loss", "max seq", "first OOM", "alloc GiB @max", "reserved GiB @max",
                   "NVML GiB @max", "max seq vs ref"], rows)
    for s in summaries:
        if s["stopped_by"]:
            print(f"{s['variant']} ({s['loss']}): stopped by {s['stopped_by']}")
        if s["oom_error"]:
            print(f"{s['variant']} ({s['loss']}) first OOM: {s['oom_error']}")


def run_all(args: argparse.Namespace, argv: list[str]) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for loss in ["hf", "chunked"] if args.chunked_loss else ["hf"]:
        for variant in args.optimizers:
            records += search(args, argv, variant, loss)
    return records


BENCH = H.Bench("budget", SCRIPT, _START, parse_args, child_main, run_all, print_summary)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    return BENCH.main(argv)


if __name__ == "__main__":
    main()
