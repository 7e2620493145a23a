#!/usr/bin/env python3
"""Issue 12: regional compilation (``compile_layers``) with NON-reentrant gradient checkpointing.

On the H200 (torch 2.11, transformers 5.17) ``ours_compiled`` with ``use_reentrant=False`` failed at
step 2, right after the first block switch, with torch.utils.checkpoint's CheckpointError "A
different number of tensors was saved during the original forward and recomputation". transformers
5.17 runs the checkpoint *around* the compiled layer, so the recompute in backward calls the compiled
layer again and goes through dynamo's cache, on the autograd device thread; whichever graph (or the
eager fallback past the recompile limit) runs there must save what the forward's graph saved.

Each variant trains a small Llama (bf16, random tokens, BlockAdam ascending, K=2, pruning) for a few
block switches and is compared with eager (same checkpointing):

* ``regional``            the old behaviour: ``compile_layers(model, traced_checkpoint=False)``
* ``regional_limit64``    the same with ``torch._dynamo.config.recompile_limit = 64``
* ``regional_no_lru``     the same with dynamo's most-recently-used entry order off
* ``regional_no_dict_tags`` the same without dynamo's recursive dict-tag guard fast path
* ``regional_same_threads`` the same in a fresh process that sets its intra-op thread count first, so
                          the autograd device threads get the main thread's (dynamo guards on it)
* ``traced``              the fix: ``compile_layers(model)`` traces the checkpoint inside the compiled
                          region, whose recompute is then part of the compiled backward
* ``regional_reentrant``  reentrant checkpointing (what bench_e2e ran so far), for the timing

Losses are compared with eager non-reentrant checkpointing (checkpointing does not change the math).

For each: status, the error (in full), losses against eager, the graphs dynamo built in forward and in
backward with the thread and intra-op thread count they were built on, the recompile reasons, and
step times (small model: compare variants, not with the 8B numbers).

    python bench/diagnose_compile.py                      # default variants, < 1 min on one H200
    python bench/diagnose_compile.py --variants all --layers 8 --seq 1024
    # CPU (transformers 5.17): the failure's mechanism, a recompile in backward past the recompile limit
    python bench/diagnose_compile.py --device cpu --backend aot_eager --layers 3 --hidden 64 --intermediate 128 \
        --heads 4 --kv-heads 2 --vocab 256 --seq 16 --emulate-device-thread --recompile-limit 3
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # badam_ext from this checkout

ALL = ("regional", "regional_limit64", "regional_no_lru", "regional_no_dict_tags", "regional_same_threads",
       "traced", "regional_reentrant")
DEFAULT = ("regional", "regional_limit64", "traced", "regional_same_threads")
PHASE = {"now": "setup"}
EVENTS: list[str] = []


class _Tagged(logging.Handler):
    """Dynamo's recompile reasons and recompile-limit warnings, with the thread they happened on."""

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage().strip()
        if "Recompiling" in msg or "recompile_limit" in msg or "triggered by" in msg or msg.startswith("- "):
            EVENTS.append(f"[{PHASE['now']}, thread {threading.current_thread().name}, "
                          f"num_threads {torch.get_num_threads()}] " + " | ".join(
                              line.strip() for line in msg.splitlines() if line.strip())[:900])


def _install_logging() -> None:
    torch._logging.set_logs(recompiles=True)
    handler = _Tagged()
    for name in ("torch._dynamo.guards.__recompiles", "torch._dynamo.convert_frame"):
        logging.getLogger(name).addHandler(handler)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def build(args: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(2048, args.seq),
                         attention_dropout=0.0, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16).train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=gen).to(args.device)
    return model, {"input_ids": ids, "labels": ids.clone()}


def _sync(args: argparse.Namespace) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def train(variant: str, args: argparse.Namespace) -> dict:
    """One variant in this process; globals it changes are put back."""
    from badam_ext import BlockAdam, compile_layers

    torch._dynamo.reset()
    EVENTS.clear()
    restore = []
    if variant == "regional_limit64":
        old = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = 64
        restore.append(lambda: setattr(torch._dynamo.config, "recompile_limit", old))
    if variant == "regional_no_lru":
        torch._C._dynamo.eval_frame._set_lru_cache(False)
        restore.append(lambda: torch._C._dynamo.eval_frame._set_lru_cache(True))
    if variant == "regional_no_dict_tags":
        torch._dynamo.config.use_recursive_dict_tags_for_guards = False
        restore.append(lambda: setattr(torch._dynamo.config, "use_recursive_dict_tags_for_guards", True))
    model, batch = build(args)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": variant == "regional_reentrant"})
    if variant != "eager":
        compile_layers(model, backend=args.backend, traced_checkpoint=variant == "traced")
    opt = BlockAdam(model, lr=1e-5, switch_every=args.switch_every, switch_mode="ascending", prune_backward=True)
    out: dict = {"variant": variant, "status": "ok", "losses": [], "graphs_fwd": 0, "graphs_bwd": 0,
                 "step_ms": [], "fwd_ms": [], "bwd_ms": []}
    threads_seen = set()

    def note_thread(grad):
        threads_seen.add((threading.current_thread().name, torch.get_num_threads()))
        return grad

    try:
        for i in range(args.steps):
            _sync(args)
            t0 = time.perf_counter()
            PHASE["now"] = f"step {i} forward, block {opt.active_block}"
            g = _graphs()
            loss = model(**batch).loss
            out["graphs_fwd"] += _graphs() - g
            _sync(args)
            t1 = time.perf_counter()
            loss.register_hook(note_thread)
            PHASE["now"] = f"step {i} backward, block {opt.active_block}"
            g = _graphs()
            threads = torch.get_num_threads()
            if args.emulate_device_thread:  # CPU: backward with another thread count, as on CUDA's device thread
                torch.set_num_threads(1 if threads > 1 else 2)
            try:
                loss.backward()
            finally:
                torch.set_num_threads(threads)
                out["graphs_bwd"] += _graphs() - g
            _sync(args)
            t2 = time.perf_counter()
            PHASE["now"] = f"step {i} optimizer"
            opt.step()
            opt.zero_grad()
            _sync(args)
            out["losses"].append(float(loss.item()))
            out["fwd_ms"].append((t1 - t0) * 1e3)
            out["bwd_ms"].append((t2 - t1) * 1e3)
            out["step_ms"].append((time.perf_counter() - t0) * 1e3)
    except Exception as e:  # noqa: BLE001 - the error is the result
        out.update(status="error", failed_at=PHASE["now"], error=f"{type(e).__name__}: {e}",
                   traceback=traceback.format_exc()[-6000:])
    finally:
        opt.close()
        for undo in restore:
            undo()
    out["main_thread"] = (threading.current_thread().name, torch.get_num_threads())
    out["backward_threads"] = sorted(threads_seen)
    out["events"] = list(EVENTS)
    del model, opt, batch
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def _same_threads_child(args: argparse.Namespace) -> list[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child-same-threads"] + _arg_list(args)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    for line in done.stdout.splitlines():
        if line.startswith("RESULTS "):
            return json.loads(line[len("RESULTS "):])
    return [{"variant": "regional_same_threads", "status": "child failed", "error": done.stderr[-3000:],
             "losses": []}]


def _arg_list(args: argparse.Namespace) -> list[str]:
    return ["--layers", str(args.layers), "--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
            "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--vocab", str(args.vocab),
            "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps),
            "--switch-every", str(args.switch_every), "--backend", args.backend, "--device", args.device] + (
                ["--recompile-limit", str(args.recompile_limit)] if args.recompile_limit is not None else [])


def compare(result: dict, eager: dict) -> str:
    a, b = result.get("losses") or [], eager.get("losses") or []
    if not a or not b:
        return "-"
    n = min(len(a), len(b))
    worst = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a[:n], b[:n]))
    finite = all(math.isfinite(x) for x in a)
    return f"{'yes' if finite and worst <= 2e-2 and len(a) == len(b) else 'NO'} (max rel {worst:.1e}, {n} steps)"


def report(results: list[dict], eager: dict) -> None:
    print("\n=== per variant")
    for r in results:
        print(f"\n--- {r['variant']}: {r['status']}" + (f" at {r.get('failed_at')}" if r["status"] != "ok" else ""))
        print(f"losses match eager: {compare(r, eager)}")
        print(f"losses: {[round(x, 4) for x in r.get('losses', [])]}")
        print(f"graphs built: {r.get('graphs_fwd')} in forward, {r.get('graphs_bwd')} in backward; main thread "
              f"{r.get('main_thread')}, backward ran on {r.get('backward_threads')}")
        if r.get("step_ms"):
            tail = slice(-2, None)  # after the compiles
            print("last steps ms: step %s fwd %s bwd %s" % tuple(
                [round(x, 1) for x in r[k][tail]] for k in ("step_ms", "fwd_ms", "bwd_ms")))
        for line in r.get("events", []):
            print("  " + line)
        if r["status"] != "ok":
            print(r.get("traceback") or r.get("error"))
    print("\n=== summary (issue 12: which variants train with non-reentrant checkpointing)")
    for r in results:
        print(f"{r['variant']:24s} {r['status']:8s} matches eager: {compare(r, eager):32s} "
              f"graphs fwd/bwd {r.get('graphs_fwd')}/{r.get('graphs_bwd')}  "
              + (r.get("error", "").splitlines()[0][:110] if r["status"] != "ok" else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(DEFAULT), help=f"comma-separated of {','.join(ALL)}, or all")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=3584)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=7, help="K=2: switches after steps 1, 3, 5")
    p.add_argument("--switch-every", type=int, default=2)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--device", default="cuda")
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--recompile-limit", type=int, default=None, help="torch._dynamo.config.recompile_limit")
    p.add_argument("--emulate-device-thread", action="store_true",
                   help="CPU runs: backward with another intra-op thread count (CUDA's autograd device thread)")
    p.add_argument("--child-same-threads", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.recompile_limit is not None:
        torch._dynamo.config.recompile_limit = args.recompile_limit
    if args.child_same_threads:
        torch.set_num_threads(torch.get_num_threads())  # before any backward creates a device thread
        _install_logging()
        print("RESULTS " + json.dumps([train("eager", args), train("regional_same_threads", args)]))
        return
    variants = ALL if args.variants == "all" else tuple(v for v in args.variants.split(",") if v)
    unknown = set(variants) - set(ALL)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {', '.join(ALL)}")
    import transformers

    import badam_ext

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}, "
          f"python {sys.version.split()[0]}, badam_ext at {os.path.dirname(badam_ext.__file__)}")
    print(f"model: {args.layers} layers, hidden {args.hidden}, batch {args.batch} x {args.seq}, bf16, "
          f"{args.backend}; {args.steps} steps, K={args.switch_every}")
    start = time.perf_counter()
    _install_logging()
    eager = train("eager", args)
    results = []
    for v in variants:
        if v == "regional_same_threads":
            continue  # a fresh process, last
        results.append(train(v, args))
        print(f"{v}: {results[-1]['status']} ({time.perf_counter() - start:.0f} s)", flush=True)
    if "regional_same_threads" in variants:
        child = _same_threads_child(args)
        results.append(child[-1])
        print(f"regional_same_threads: {child[-1]['status']} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"\neager (non-reentrant): {eager['status']}, losses {[round(x, 4) for x in eager['losses']]}, "
          f"main thread {eager['main_thread']}, backward on {eager['backward_threads']}, last step ms "
          f"{[round(x, 1) for x in eager['step_ms'][-2:]]}")
    report(results, eager)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
