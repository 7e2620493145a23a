#!/usr/bin/env python3
"""Backward time by the depth of the one trainable layer (the BAdam paper's Table 4).

Rows: the first, middle or last layer trainable, lm_head + last layer, everything trainable.
Variants (each in a fresh process, so peaks do not mix; see ``--isolation``):

* ``no_gc`` — no gradient checkpointing: autograd stops at the lowest trainable layer by itself.
* ``gc_default`` — Hugging Face ``gradient_checkpointing_enable()`` defaults. transformers 5.x also
  turns on ``enable_input_require_grads``, so backward runs through every layer whatever is trainable.
* ``gc_pruned`` — the same plus badam_ext's ``BackwardPruner`` (undoes the input-grad hook).
* ``gc_reentrant_pruned`` — reentrant checkpointing (``use_reentrant=True``) plus the pruner, which
  makes the lowest trainable layer's input require grad.

Only the backward is timed (CUDA events, median of ``--reps`` after ``--warmup``); the forward time is
reported beside it. Each row checks that every trainable parameter received a gradient.

    python bench/bench_backward.py --out results.jsonl            # Llama-3-8B shape on the GPU
    python bench/bench_backward.py --smoke                        # tiny Llama on CPU, seconds
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import warnings
from typing import Any

_START = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import enable_interpreter_if_cpu_smoke  # noqa: E402

enable_interpreter_if_cpu_smoke(sys.argv)  # before anything imports triton

import torch  # noqa: E402

import _harness as H  # noqa: E402
import _measure as M  # noqa: E402
import _report as R  # noqa: E402
from models import MODEL_NAMES, build_model, random_batch  # noqa: E402

SCRIPT = os.path.abspath(__file__)
VARIANTS = ("no_gc", "gc_default", "gc_pruned", "gc_reentrant_pruned")
DEPTHS = ("first_layer", "middle_layer", "last_layer", "lm_head+last_layer", "all")

warnings.filterwarnings("ignore", message=r".*gradient_checkpointing_enable.*", category=FutureWarning)
# Reentrant checkpointing warns for every layer below the lowest trainable one: expected here.
warnings.filterwarnings("ignore", message=r"None of the inputs have requires_grad=True")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_run_args(p)
    p.add_argument("--model", choices=MODEL_NAMES, default=None, help="model shape (default 8b; smoke: tiny)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024; smoke: 16)")
    p.add_argument("--warmup", type=int, default=None, help="untimed repetitions per row (default 2; smoke: 1)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per row (default 5; smoke: 2)")
    p.add_argument("--variants", type=H.csv_choices(VARIANTS), default=list(VARIANTS))
    p.add_argument("--depths", type=H.csv_choices(DEPTHS), default=list(DEPTHS))
    H.add_child_arg(p, VARIANTS)
    args = p.parse_args(argv)
    H.finish_run_args(args)
    smoke = args.smoke
    args.model = args.model or ("tiny" if smoke else "8b")
    args.seq = args.seq or (16 if smoke else 1024)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)
    args.reps = args.reps or (2 if smoke else 5)
    if args.batch < 1 or args.seq < 2 or args.reps < 1 or args.warmup < 0:
        p.error("need --batch >= 1, --seq >= 2, --reps >= 1, --warmup >= 0")
    return args


def child_argv(args: argparse.Namespace, variant: str) -> list[str]:
    return H.run_child_argv(args) + [
        "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup),
        "--reps", str(args.reps), "--depths", ",".join(args.depths), "--variant", variant]


# ------------------------------------------------------------------------------------- the child
def configure(model: torch.nn.Module, variant: str) -> Any:
    """Checkpointing as the variant says; returns the BackwardPruner for pruned variants, else None."""
    if variant == "no_gc":
        return None
    kwargs = {"use_reentrant": True} if variant == "gc_reentrant_pruned" else None
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not variant.endswith("_pruned"):
        return None
    from badam_ext.partition import infer_partition
    from badam_ext.pruning import BackwardPruner

    return BackwardPruner(model, infer_partition(model))


def select_params(model: torch.nn.Module, depth: str) -> tuple[list[torch.nn.Parameter], int | None]:
    """The parameters trainable in row ``depth`` and the index of the lowest trainable layer."""
    layers = model.model.layers
    if depth == "all":
        return list(model.parameters()), 0
    index = {"first_layer": 0, "middle_layer": len(layers) // 2, "last_layer": len(layers) - 1,
             "lm_head+last_layer": len(layers) - 1}[depth]
    params = list(layers[index].parameters())
    if depth == "lm_head+last_layer":
        params.append(model.get_output_embeddings().weight)
    return params, index


def set_trainable(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
    chosen = {id(p) for p in params}
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(id(p) in chosen)


def prune_for(model: torch.nn.Module, pruner: Any, params: list[torch.nn.Parameter], layer: int | None) -> str:
    """Point the pruner at ``layer``; with the embedding trainable there is nothing to prune."""
    if pruner is None:
        return "none"
    if model.get_input_embeddings().weight.requires_grad:
        # Everything down to the embedding needs backward (all trainable, or a head tied to it).
        pruner.remove()
        return "detached (embedding trainable)"
    names = {id(p): n for n, p in model.named_parameters()}
    block = pruner.partition.block_of(names[id(params[0])])
    if block is None:
        raise RuntimeError(f"layer {layer} is in no block of the partition")
    pruner.on_switch(block)
    return f"block {block}"


def measure_depth(model: torch.nn.Module, batch: dict, params: list[torch.nn.Parameter], clock: M.Clock,
                  watch: M.MemoryWatch, warmup: int, reps: int) -> dict[str, Any]:
    marks = []
    missing = None
    for r in range(warmup + reps):
        a = clock.mark()
        loss = model(**batch).loss
        b = clock.mark()
        watch.sample()
        loss.backward()
        c = clock.mark()
        watch.sample()
        if r == 0:
            missing = sum(p.grad is None for p in params)
        for p in params:
            p.grad = None
        del loss
        if r >= warmup:
            marks.append((a, b, c))
    fwd = [clock.ms(a, b) for a, b, _ in marks]
    bwd = [clock.ms(b, c) for _, b, c in marks]
    return {"fwd_ms": M.median(fwd), "bwd_ms": M.median(bwd), "bwd_ms_reps": bwd, "missing_grads": missing}


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    phases = M.ScriptPhases(f"backward/{args.variant}")
    phases.seconds["import"] = H.import_seconds(_START)
    device = H.device_for(args.smoke, args.device)
    with phases.phase("device_init"):
        H.init_device(device)
    with phases.phase("build"):
        built = build_model(args.model, device, torch.bfloat16, seed=args.seed)
    model = built.model
    with phases.phase("setup"):
        pruner = configure(model, args.variant)
    batch = random_batch(model.config.vocab_size, args.batch, args.seq, device, seed=args.seed)
    clock, watch = M.Clock(device), M.MemoryWatch(device)
    gc.collect()  # settle import / build garbage before timing
    watch.reset()
    record: dict[str, Any] = {"kind": "backward_by_depth", "variant": args.variant, **built.describe(),
                              "bsz": args.batch, "seqlen": args.seq, "warmup": args.warmup, "reps": args.reps}
    rows: dict[str, Any] = {}
    with phases.phase("measure"):
        for depth in args.depths:
            params, layer = select_params(model, depth)
            set_trainable(model, params)
            pruning = prune_for(model, pruner, params, layer)
            row = measure_depth(model, batch, params, clock, watch, args.warmup, args.reps)
            row.update(pruner=pruning, trainable_params=sum(p.numel() for p in params))
            rows[depth] = row
            record[f"{depth}_bwd_ms"] = row["bwd_ms"]
            record[f"{depth}_fwd_ms"] = row["fwd_ms"]
            R.log(f"[backward/{args.variant}] {depth}: bwd {row['bwd_ms']:.2f} ms, fwd {row['fwd_ms']:.2f} ms, "
                  f"missing grads {row['missing_grads']}, pruner {pruning}")
    record["rows"] = rows
    record["grads_ok"] = all(r["missing_grads"] == 0 for r in rows.values())
    record.update(watch.peaks())
    record["pruner_describe"] = pruner.describe() if pruner is not None else None
    record["env"] = R.env_info(device)
    record["phases_s"] = phases.seconds
    watch.close()
    return record


def child_main(argv: list[str]) -> dict[str, Any]:
    args = parse_args(argv)
    record = H.run_guarded(lambda: run_variant(args))
    record.setdefault("kind", "backward_by_depth")
    record.setdefault("variant", args.variant)
    record.setdefault("model", args.model)
    return record


# ------------------------------------------------------------------------------------ the parent
def print_summary(args: argparse.Namespace, records: list[dict[str, Any]]) -> None:
    by = {r["variant"]: r for r in records}
    variants = [v for v in VARIANTS if v in by]
    cols = ["row (bwd ms)"] + variants
    pairs = [(a, b) for a, b in (("gc_pruned", "gc_default"), ("gc_pruned", "no_gc"),
                                 ("gc_reentrant_pruned", "gc_default")) if a in by and b in by]
    cols += [f"{a} / {b}" for a, b in pairs]
    rows = []
    for depth in args.depths:
        key = f"{depth}_bwd_ms"
        row: list[Any] = [depth] + [by[v].get(key) for v in variants]
        row += [R.fmt_ratio(by[a].get(key), by[b].get(key)) for a, b in pairs]
        rows.append(row)
    rows.append(["peak alloc GiB"] + [by[v].get("peak_alloc_gib") for v in variants] + [""] * len(pairs))
    rows.append(["grads ok"] + [by[v].get("grads_ok", by[v].get("status")) for v in variants] + [""] * len(pairs))
    first = records[0] if records else {}
    R.print_table(f"Backward by depth: {first.get('model')} bsz {first.get('bsz')} x {first.get('seqlen')} "
                  f"on {first.get('env', {}).get('device', '?')}", cols, rows)
    for r in records:
        if r.get("status") != "ok":
            print(f"{r['variant']}: {r.get('status')}: {r.get('error')}")


def run_all(args: argparse.Namespace, argv: list[str]) -> list[dict[str, Any]]:
    return [BENCH.run_child(args, argv, child_argv(args, v), f"backward {v}") for v in args.variants]


BENCH = H.Bench("backward", SCRIPT, _START, parse_args, child_main, run_all, print_summary)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    return BENCH.main(argv)


if __name__ == "__main__":
    main()
