#!/usr/bin/env python3
"""End-to-end training steps over a block epoch: badam_ext.BlockAdam against the reference BAdam.

Llama shapes in bf16 with gradient checkpointing, random tokens, batch 2 x 1024 by default. Per step:
forward / backward / optimizer step time (CUDA events; a block switch happens inside ``step()`` and
switching steps are reported apart), peak allocated / reserved (torch) and NVML used memory (max of
samples taken after each phase). Variants, each in a fresh process (``--isolation``):

* ``ours`` — ``BlockAdam(model, switch_every=K, switch_mode="ascending")``: fused kernels, arena,
  backward pruning, HF gradient checkpointing.
* ``ours_saved_compiled`` — ``ours_compiled`` plus ``apply_memory_savings`` with Hugging Face's layers.
* ``ours_compiled`` — ``ours`` with the decoder layers compiled one by one
  (``badam_ext.compile_layers(model)``, i.e. ``layer.compile()`` per layer: regional compilation, whose
  graphs stay few whatever the number of blocks); not in the default set. The record's ``compile``
  entry counts the graphs dynamo built in total and during the measured steps (0 there: no recompile
  after the warm-up).
* ``ref`` — reference ``badam`` 1.4 as its README shows it (``BlockOptimizer`` over
  ``torch.optim.AdamW``) with plain HF ``gradient_checkpointing_enable()`` (no pruning).
* ``ref_patched`` — the reference with its gradient-checkpointing patch (``BAdamCallback``); on
  transformers 5.x it fails at the first forward, and the error is the result.
* ``full_adamw`` — full finetuning, ``torch.optim.AdamW(model.parameters(), fused=True)`` on fp32
  weights with bf16 autocast (Hugging Face Trainer's ``bf16=True`` recipe) and gradient checkpointing;
  an OOM (the 8B shape on 80 GB) is recorded as the result.

    python bench/bench_e2e.py --model 8b --out results.jsonl
    python bench/bench_e2e.py --model 8b --variants ours,ours_compiled --steps 64 --out results.jsonl
    python bench/bench_e2e.py --smoke
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

_START = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import enable_interpreter_if_cpu_smoke  # noqa: E402

enable_interpreter_if_cpu_smoke(sys.argv)  # before anything imports triton

import torch  # noqa: E402

import _harness as H  # noqa: E402
import _measure as M  # noqa: E402
import _report as R  # noqa: E402
from _memory_setups import make_setups  # noqa: E402
from models import LOSS_MODES, MODEL_NAMES, build_model, causal_lm_loss, config_for, random_batch  # noqa: E402

SCRIPT = os.path.abspath(__file__)
VARIANTS = ("ours", "ref", "ref_patched", "full_adamw")  # the default set
MEMORY_VARIANTS = ("ours_saved", "ours_saved_8bit", "ours_offload", "ours_liger", "ref_liger")  # bench/_memory_setups.py
ALL_VARIANTS = (*VARIANTS, "ours_compiled", "ours_saved_compiled", *MEMORY_VARIANTS)
REFERENCE_VARIANTS = ("ref", "ref_patched")

warnings.filterwarnings("ignore", message=r".*gradient_checkpointing_enable.*", category=FutureWarning)


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Options shared with bench_budget.py."""
    H.add_run_args(p)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--switch-every", type=int, default=2, help="K: optimizer steps per block")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="BlockAdam backend (auto: Triton on CUDA, torch on CPU)")
    p.add_argument("--loss", choices=LOSS_MODES, default="hf",
                   help="hf: the model's own loss (full fp32 logits); chunked: chunked cross-entropy")
    p.add_argument("--loss-chunk", type=int, default=512, help="tokens per chunk for --loss chunked")


def finish_common_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    H.finish_run_args(args)
    if args.batch < 1 or args.switch_every < 1 or args.loss_chunk < 1:
        p.error("need --batch >= 1, --switch-every >= 1, --loss-chunk >= 1")


def common_child_argv(args: argparse.Namespace) -> list[str]:
    return H.run_child_argv(args) + [
        "--batch", str(args.batch), "--switch-every", str(args.switch_every), "--lr", repr(args.lr),
        "--backend", args.backend, "--loss", args.loss, "--loss-chunk", str(args.loss_chunk)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--model", choices=MODEL_NAMES, default=None, help="model shape (default 8b; smoke: tiny)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024; smoke: 16)")
    p.add_argument("--steps", type=int, default=None,
                   help="measured steps (default: one block epoch, blocks x K)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (default K + 1: a switch and a forward on the next block, whose "
                        "first pruned forward pays one-time kernel set-up)")
    p.add_argument("--variants", type=H.csv_choices(ALL_VARIANTS), default=list(VARIANTS),
                   help=f"comma-separated, of {','.join(ALL_VARIANTS)} (default: {','.join(VARIANTS)})")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of ours_compiled (aot_eager: CPU smoke runs without C++ codegen)")
    p.add_argument("--compile-checkpointing", choices=("non-reentrant", "reentrant"), default="non-reentrant",
                   help="gradient checkpointing of ours_compiled (non-reentrant: traced inside the compiled layers)")
    H.add_child_arg(p, ALL_VARIANTS)
    args = p.parse_args(argv)
    finish_common_args(p, args)
    args.model = args.model or ("tiny" if args.smoke else "8b")
    args.seq = args.seq or (16 if args.smoke else 1024)
    blocks = config_for(args.model).num_hidden_layers
    args.epoch_steps = blocks * args.switch_every
    args.steps = args.steps or args.epoch_steps
    args.warmup = args.warmup if args.warmup is not None else args.switch_every + 1
    if args.seq < 2 or args.steps < 1 or args.warmup < 0:
        p.error("need --seq >= 2, --steps >= 1, --warmup >= 0")
    return args


def child_argv(args: argparse.Namespace, variant: str) -> list[str]:
    return common_child_argv(args) + ["--model", args.model, "--seq", str(args.seq), "--steps", str(args.steps),
                                      "--warmup", str(args.warmup), "--compile-backend", args.compile_backend,
                                      "--compile-checkpointing", args.compile_checkpointing, "--variant", variant]


# ------------------------------------------------------------------------------ variant harness
@dataclass
class Harness:
    """What one variant trains with."""

    optimizer: Any
    block_of: Callable[[], int | None]
    num_blocks: int
    autocast: torch.dtype | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def reference_missing() -> str | None:
    """Why the reference cannot run here (None when ``badam`` is importable)."""
    if importlib.util.find_spec("badam") is None:
        return "not installed: the reference package `badam` is not importable"
    return None


def setup_ours(model: torch.nn.Module, args: argparse.Namespace, checkpointing: dict | None = None,
               states: str = "fp32") -> Harness:
    # HF defaults unless given; BlockAdam's pruner then undoes the input-grad hook
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    from badam_ext import BlockAdam

    opt = BlockAdam(model, lr=args.lr, switch_every=args.switch_every, switch_mode="ascending",
                    backend=args.backend, prune_backward=True, states=states)
    notes = {"arena_bytes": int(opt.arena.capacity_bytes), "states": states, "backend": getattr(opt._ops, "name", args.backend),
             "pruner": opt.pruner.describe() if opt.pruner is not None else None}
    return Harness(opt, lambda: opt.active_block, len(opt.partition), notes=notes)


def setup_ours_compiled(model: torch.nn.Module, args: argparse.Namespace) -> Harness:
    from badam_ext import compile_layers

    model.config.use_cache = False  # a KV cache built in training forwards would specialise every layer
    # Non-reentrant: compile_layers traces the checkpoint inside the compiled layers (its recompute is
    # in the compiled backward); a checkpoint run eagerly around them failed on the H200 (issue 12).
    checkpointing = {"use_reentrant": args.compile_checkpointing == "reentrant"}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    layers = compile_layers(model, backend=args.compile_backend)
    harness = setup_ours(model, args, checkpointing)
    harness.notes.update(compiled_layers=layers, compile_backend=args.compile_backend, checkpointing=checkpointing)
    return harness


def setup_ours_saved_compiled(model: torch.nn.Module, args: argparse.Namespace) -> Harness:
    """``ours_compiled`` plus ``apply_memory_savings`` (fused loss; Hugging Face's layers, which the
    compiler fuses, instead of the Liger layer kernels)."""
    from badam_ext import apply_memory_savings

    harness = setup_ours_compiled(model, args)
    savings = apply_memory_savings(model, offload_checkpoints="auto", layer_kernels=False,
                                   budget_gib=getattr(args, "budget_gib", None))
    harness.notes.update(memory_savings=savings.stats())
    harness.savings = savings
    return harness


def _reference_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> Any:
    from badam import BlockOptimizer

    return BlockOptimizer(base_optimizer=torch.optim.AdamW(model.parameters(), lr=args.lr),
                          named_parameters_list=list(model.named_parameters()),
                          switch_block_every=args.switch_every, switch_mode="ascending")


def setup_ref(model: torch.nn.Module, args: argparse.Namespace) -> Harness:
    model.gradient_checkpointing_enable()  # plain HF: input-grad hook stays, no pruning
    opt = _reference_optimizer(model, args)
    return Harness(opt, lambda: opt.current_block_idx, opt.block_num, notes={"checkpointing": "hf default"})


def setup_ref_patched(model: torch.nn.Module, args: argparse.Namespace) -> Harness:
    from badam.utils import BAdamCallback

    # What the Trainer callback does at on_train_begin: drop the input-grad hook and install the
    # reference's block-aware gradient_checkpointing_enable, which is then called.
    BAdamCallback().on_train_begin(None, None, None, model=model)
    model.gradient_checkpointing_enable()
    opt = _reference_optimizer(model, args)
    return Harness(opt, lambda: opt.current_block_idx, opt.block_num,
                   notes={"checkpointing": "badam.utils.gradient_checkpointing_enable_for_bcd"})


def setup_full_adamw(model: torch.nn.Module, args: argparse.Namespace) -> Harness:
    model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
    return Harness(opt, lambda: None, model.config.num_hidden_layers, autocast=torch.bfloat16,
                   notes={"precision": "fp32 weights, bf16 autocast, fused AdamW"})


SETUPS: dict[str, Callable[[torch.nn.Module, argparse.Namespace], Harness]] = {
    "ours": setup_ours, "ref": setup_ref, "ref_patched": setup_ref_patched, "full_adamw": setup_full_adamw,
    "ours_compiled": setup_ours_compiled, "ours_saved_compiled": setup_ours_saved_compiled,
}
SETUPS.update(make_setups(SETUPS))


def train_steps(model: torch.nn.Module, h: Harness, batch: dict[str, torch.Tensor], args: argparse.Namespace,
                warmup: int, steps: int, clock: M.Clock, watch: M.MemoryWatch, ctx: dict[str, Any],
                fail_before_forward: Callable[[], None] | None = None) -> dict[str, Any]:
    """``warmup + steps`` training steps; per-step phase times of the measured ones, and switch flags."""
    marks: list[tuple] = []
    device_type = next(model.parameters()).device.type
    gc.collect()  # settle what imports, build and setup left behind, so no full collection is due at once
    gcw = M.GcWatch()
    graphs_at_warmup_end = compiled_graphs()
    with gcw:
        for i in range(warmup + steps):
            if i == warmup:
                gcw.reset()  # count the measured steps only
                graphs_at_warmup_end = compiled_graphs()
            _one_step(model, h, batch, args, i, i >= warmup, marks, clock, watch, ctx, device_type,
                      fail_before_forward)
    graphs = compiled_graphs()
    ctx["phase"] = "resolve"
    last_loss = marks[-1][5] if marks else None
    fwd = [clock.ms(a, b) for a, b, _, _, _, _ in marks]
    bwd = [clock.ms(b, c) for _, b, c, _, _, _ in marks]
    opt = [clock.ms(c, d) for _, _, c, d, _, _ in marks]
    step = [clock.ms(a, d) for a, _, _, d, _, _ in marks]
    switch = [m[4] for m in marks]
    return {"fwd": fwd, "bwd": bwd, "opt": opt, "step": step, "switch": switch, **gcw.summary(),
            "compile": {"graphs": graphs, "graphs_during_measured_steps": graphs - graphs_at_warmup_end},
            "final_loss": None if last_loss is None else float(last_loss.float().item())}


def compiled_graphs() -> int:
    """Graphs torch.compile (dynamo) has built in this process so far; every recompile adds one."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _one_step(model: torch.nn.Module, h: Harness, batch: dict[str, torch.Tensor], args: argparse.Namespace,
              i: int, measured: bool, marks: list, clock: M.Clock, watch: M.MemoryWatch, ctx: dict[str, Any],
              device_type: str, fail_before_forward: Callable[[], None] | None) -> None:
    """Forward, backward, optimizer step; appends ``(e0, e1, e2, e3, switched, loss)`` when measured."""
    ctx["step"] = i
    before = h.block_of()
    ctx["phase"] = "forward"
    if fail_before_forward is not None:
        fail_before_forward()
    e0 = clock.mark()
    amp = torch.autocast(device_type, dtype=h.autocast) if h.autocast is not None else contextlib.nullcontext()
    with amp:
        loss = causal_lm_loss(model, batch, args.loss, args.loss_chunk)
    e1 = clock.mark()
    watch.sample()
    ctx["phase"] = "backward"
    loss.backward()
    e2 = clock.mark()
    watch.sample()
    ctx["phase"] = "step"
    h.optimizer.step()
    e3 = clock.mark()
    watch.sample()
    h.optimizer.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    if measured:
        marks.append((e0, e1, e2, e3, before != h.block_of(), loss.detach()))


def summarize(t: dict[str, Any], args: argparse.Namespace, num_blocks: int) -> dict[str, Any]:
    """Means per phase, switching steps apart, block-epoch time and throughput."""
    sw = t["switch"]
    opt_plain = [x for x, s in zip(t["opt"], sw) if not s]
    opt_switch = [x for x, s in zip(t["opt"], sw) if s]
    step_plain = [x for x, s in zip(t["step"], sw) if not s]
    step_switch = [x for x, s in zip(t["step"], sw) if s]
    mean_step = M.mean(t["step"])
    epoch_steps = num_blocks * args.switch_every
    out = {
        "steps": len(t["step"]), "switches": sum(sw), "num_blocks": num_blocks, "switch_every": args.switch_every,
        "fwd_ms": M.mean(t["fwd"]), "bwd_ms": M.mean(t["bwd"]),
        "opt_ms": M.mean(opt_plain), "opt_switch_ms": M.mean(opt_switch),
        "mean_step_ms": mean_step, "median_step_ms": M.median(t["step"]),
        "step_ms_plain": M.mean(step_plain), "step_ms_switch": M.mean(step_switch),
        "epoch_steps": epoch_steps,
        "epoch_s": None if mean_step is None else mean_step * epoch_steps / 1e3,
        "epoch_measured": len(t["step"]) >= epoch_steps,
        "tokens_per_s": None if not mean_step else args.batch * args.seq * 1e3 / mean_step,
        "final_loss": t["final_loss"],
        "compile": t.get("compile"),
        **{k: t[k] for k in ("gc_collections", "gc_full_collections", "gc_ms", "gc_full_ms")},
        "per_step": {k: t[k] for k in ("fwd", "bwd", "opt", "step", "switch")},
    }
    if out["opt_ms"] is not None and out["opt_switch_ms"] is not None:
        out["switch_overhead_ms"] = out["opt_switch_ms"] - out["opt_ms"]
    return out


def run_variant(args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    variant = args.variant
    phases = M.ScriptPhases(f"e2e/{args.model}/{variant}")
    phases.seconds["import"] = H.import_seconds(_START)
    record: dict[str, Any] = {"kind": "e2e", "variant": variant, "model": args.model, "bsz": args.batch,
                              "seqlen": args.seq, "loss": args.loss, "phases_s": phases.seconds}
    if variant in REFERENCE_VARIANTS and (why := reference_missing()):
        record.update(status="not_installed", error=why)
        return record
    device = H.device_for(args.smoke, args.device)
    record["env"] = R.env_info(device)
    dtype = torch.float32 if variant == "full_adamw" else torch.bfloat16
    with phases.phase("device_init"):
        H.init_device(device)
    ctx["phase"] = "build"
    with phases.phase("build"):
        built = build_model(args.model, device, dtype, seed=args.seed)
    record.update(built.describe())
    model = built.model
    watch = M.MemoryWatch(device)
    ctx["watch"] = watch
    watch.reset()
    ctx["phase"] = "setup"
    with phases.phase("setup"):
        harness = SETUPS[variant](model, args)
    record["notes"] = harness.notes
    batch = random_batch(model.config.vocab_size, args.batch, args.seq, device, seed=args.seed)
    with phases.phase("train"):
        timings = train_steps(model, harness, batch, args, args.warmup, args.steps, M.Clock(device), watch, ctx)
    record.update(summarize(timings, args, harness.num_blocks))
    record.update(watch.peaks())
    watch.close()
    return record


def child_main(argv: list[str]) -> dict[str, Any]:
    args = parse_args(argv)
    record = H.run_tracked(lambda ctx: run_variant(args, ctx))
    for key, value in (("kind", "e2e"), ("variant", args.variant), ("model", args.model),
                       ("bsz", args.batch), ("seqlen", args.seq), ("loss", args.loss)):
        record.setdefault(key, value)
    return record


# ------------------------------------------------------------------------------------ the parent
def print_summary(args: argparse.Namespace, records: list[dict[str, Any]]) -> None:
    first = next((r for r in records if "env" in r), records[0] if records else {})
    title = (f"End to end: {first.get('model')} bsz {first.get('bsz')} x {first.get('seqlen')}, "
             f"loss {first.get('loss')}, on {first.get('env', {}).get('device', '?')}")
    cols = ["variant", "status", "step ms", "switch step ms", "fwd", "bwd", "opt", "opt (switch)", "alloc GiB",
            "reserved GiB", "NVML GiB", "epoch s", "tokens/s"]
    rows = [[r["variant"], r.get("status"), r.get("mean_step_ms"), r.get("step_ms_switch"), r.get("fwd_ms"),
             r.get("bwd_ms"), r.get("opt_ms"), r.get("opt_switch_ms"), r.get("peak_alloc_gib"),
             r.get("peak_reserved_gib"), r.get("nvml_peak_gib"), r.get("epoch_s"), r.get("tokens_per_s")]
            for r in records]
    R.print_table(title, cols, rows)
    base = next((r for r in records if r["variant"] == "ref" and r.get("status") == "ok"), None)
    if base is not None:
        keys = [("mean_step_ms", "step time"), ("peak_alloc_gib", "peak alloc"),
                ("peak_reserved_gib", "peak reserved"), ("nvml_peak_gib", "peak NVML"),
                ("epoch_s", "block epoch"), ("tokens_per_s", "tokens/s")]
        rows = [[r["variant"]] + [R.fmt_ratio(r.get(k), base.get(k)) for k, _ in keys]
                for r in records if r.get("status") == "ok"]
        R.print_table("Ratios vs the reference (ref = 1.00x; below 1 is better except tokens/s)",
                      ["variant"] + [name for _, name in keys], rows)
    else:
        print("no successful `ref` run: ratios vs the reference not available")
    print_compiled_comparison(records)
    for r in records:
        if r.get("status") != "ok":
            print(f"{r['variant']}: {r.get('status')}: {r.get('error')}"
                  + (f" (in {r['failed_in']}, step {r.get('failed_at_step')})" if r.get("failed_in") else ""))


def print_compiled_comparison(records: list[dict[str, Any]]) -> None:
    """Eager against regionally compiled BlockAdam, and the compiled run's graph counts."""
    ok = {r["variant"]: r for r in records if r.get("status") == "ok"}
    compiled = ok.get("ours_compiled")
    if compiled is None:
        return
    graphs = compiled.get("compile") or {}
    print(f"ours_compiled: {graphs.get('graphs')} graphs compiled in all, "
          f"{graphs.get('graphs_during_measured_steps')} during the measured steps (recompiles after warm-up)")
    eager = ok.get("ours")
    if eager is not None and eager.get("mean_step_ms") and compiled.get("mean_step_ms"):
        print(f"step: compiled {compiled['mean_step_ms']:.1f} ms against eager {eager['mean_step_ms']:.1f} ms "
              f"({eager['mean_step_ms'] / compiled['mean_step_ms']:.2f}x)")


def run_all(args: argparse.Namespace, argv: list[str]) -> list[dict[str, Any]]:
    return [BENCH.run_child(args, argv, child_argv(args, v), f"e2e {args.model} {v}") for v in args.variants]


BENCH = H.Bench("e2e", SCRIPT, _START, parse_args, child_main, run_all, print_summary)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    return BENCH.main(argv)


if __name__ == "__main__":
    main()
