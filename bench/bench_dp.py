#!/usr/bin/env python3
"""Data-parallel BlockAdam: step time and tokens/s on 1 GPU against N GPUs (torchrun).

Every rank builds the same model (Llama-3-8B shape by default, seeded random bf16 weights, gradient
checkpointing) and trains it with ``BlockAdam(K=2, ascending)`` on its own batch (2 x 1024 tokens);
only the active block's gradients are all-reduced (``badam_ext.distributed.GradSync``). Reported:
median step time (CUDA events, after warm-up), tokens/s over all ranks, the scaling ratio against one
GPU (target >= 1.85x on 2 GPUs), the gradient bytes all-reduced per step beside what DDP moves for full
finetuning, and a bitwise check that the ranks' weights are identical at the end.

    torchrun --standalone --nproc_per_node 2 bench/bench_dp.py --world1 --out results.jsonl
    torchrun --standalone --nproc_per_node 1 bench/bench_dp.py --out results.jsonl   # 1 GPU alone
    python bench/bench_dp.py --smoke    # CPU, gloo, 2 spawned processes, tiny model

``--world1`` also measures the 1-GPU baseline in the same invocation: rank 0 trains alone (fresh
model and optimizer, no gradient sync) while the other ranks wait.
"""
from __future__ import annotations

import os

# NVLink multicast (NCCL NVLS, torch symmetric-memory multicast, NVSHMEM NVLS) must stay off on the
# shared GPU hosts: set before torch.distributed is imported, so NCCL and torch read them at init.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Optional  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import enable_interpreter_if_cpu_smoke  # noqa: E402

enable_interpreter_if_cpu_smoke(sys.argv)  # before anything imports triton

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import _harness as H  # noqa: E402
import _measure as M  # noqa: E402
import _report as R  # noqa: E402
from models import MODEL_NAMES, build_model, random_batch  # noqa: E402

from badam_ext import BlockAdam  # noqa: E402
from badam_ext.distributed import full_model_grad_bytes  # noqa: E402

SCALING_TARGET = 1.85
SMOKE_WORLD = 2


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help=f"CPU, gloo, tiny model, {SMOKE_WORLD} spawned processes (unless run under torchrun)")
    p.add_argument("--world1", action="store_true", help="also time 1 GPU alone (rank 0) in this invocation")
    p.add_argument("--model", choices=MODEL_NAMES, default=None, help="model shape (default 8b; smoke: tiny)")
    p.add_argument("--batch", type=int, default=2, help="sequences per rank")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024; smoke: 16)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke: 1)")
    p.add_argument("--switch-every", type=int, default=2, help="K: optimizer steps per block")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default=None,
                   help="BlockAdam backend (default auto; smoke: torch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append JSON lines to this file (rank 0)")
    args = p.parse_args(argv)
    args.model = args.model or ("tiny" if args.smoke else "8b")
    args.seq = args.seq or (16 if args.smoke else 1024)
    args.steps = args.steps if args.steps is not None else (3 if args.smoke else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    args.backend = args.backend or ("torch" if args.smoke else "auto")
    if args.batch < 1 or args.seq < 2 or args.steps < 1 or args.warmup < 0 or args.switch_every < 1:
        p.error("need --batch >= 1, --seq >= 2, --steps >= 1, --warmup >= 0, --switch-every >= 1")
    return args


# ------------------------------------------------------------------------------------------ one run
def train_and_time(args: argparse.Namespace, device: torch.device, distributed: bool,
                   rank: int) -> tuple[dict[str, Any], torch.nn.Module, BlockAdam]:
    """Build the model, train ``warmup + steps`` steps, time the last ``steps``; per-rank figures."""
    built = build_model(args.model, device, torch.bfloat16, seed=args.seed)  # same weights on every rank
    model = built.model
    model.gradient_checkpointing_enable()  # BlockAdam's pruner undoes HF's input-grad hook
    opt = BlockAdam(model, lr=args.lr, switch_every=args.switch_every, switch_mode="ascending",
                    backend=args.backend, distributed=distributed)
    sync = opt.grad_sync if distributed else None
    if sync is not None:
        sync.check_replicas(list(model.parameters()), "initial weights")
    batch = random_batch(model.config.vocab_size, args.batch, args.seq, device, seed=args.seed + 1000 * rank)
    clock = M.Clock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    marks, grad_bytes, losses = [], [], []
    if distributed:
        dist.barrier()
    for i in range(args.warmup + args.steps):
        start = clock.mark()
        loss = model(**batch).loss
        loss.backward()
        if sync is not None:
            grad_bytes.append(sync.bytes_per_step())  # the block whose gradients this step reduces
        opt.step()
        opt.zero_grad(set_to_none=True)
        end = clock.mark()
        if i >= args.warmup:
            marks.append((start, end))
            losses.append(loss.detach())
    step_ms = [clock.ms(a, b) for a, b in marks]
    record = {
        "median_step_ms": statistics.median(step_ms),
        "step_ms": step_ms,
        "final_loss": float(losses[-1].float().item()),
        "grad_bytes_per_step": statistics.median(grad_bytes[args.warmup:]) if grad_bytes else 0,
        "ddp_full_grad_bytes": full_model_grad_bytes(model),
        "params": built.num_params,
        "build_s": round(built.build_s, 3),
        "peak_alloc_gib": torch.cuda.max_memory_allocated(device) / M.GIB if device.type == "cuda" else None,
    }
    return record, model, opt


def release() -> None:
    """Hand freed model / arena memory back before the next run builds its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_rank(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> list[dict[str, Any]]:
    """This rank's part of the benchmark; rank 0 returns the result records."""
    base = {"kind": "dp", "model": args.model, "bsz_per_rank": args.batch, "seqlen": args.seq,
            "switch_every": args.switch_every, "switch_mode": "ascending", "backend": args.backend,
            "warmup": args.warmup, "steps": args.steps, "env": R.env_info(device)}
    records: list[dict[str, Any]] = []
    if world > 1:
        R.log(f"[rank {rank}] data parallel, world {world}")
        rec, model, opt = train_and_time(args, device, True, rank)
        slowest = torch.tensor([rec["median_step_ms"]], dtype=torch.float64, device=_comm_device(device))
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        try:
            opt.grad_sync.check_replicas(list(model.parameters()), "final weights")
            opt.check_replicas()  # the active block's fp32 masters too
            rec["replicas_identical"], rec["replicas_error"] = True, None
        except RuntimeError as exc:
            rec["replicas_identical"], rec["replicas_error"] = False, str(exc)
        rec["median_step_ms_slowest_rank"] = float(slowest.item())
        rec["tokens_per_s"] = world * args.batch * args.seq * 1e3 / rec["median_step_ms_slowest_rank"]
        records.append({**base, "world_size": world, **rec})
        del model, opt
        release()
    if world == 1 or args.world1:
        if rank == 0:
            R.log("[rank 0] 1 process alone (baseline)")
            rec, model, opt = train_and_time(args, device, False, rank)
            rec["tokens_per_s"] = args.batch * args.seq * 1e3 / rec["median_step_ms"]
            rec["grad_bytes_per_step"] = 0
            records.insert(0, {**base, "world_size": 1, **rec})
            del model, opt
            release()
        if world > 1:
            dist.barrier()
    if rank != 0:
        return []
    one = next((r for r in records if r["world_size"] == 1), None)
    many = next((r for r in records if r["world_size"] > 1), None)
    if one is not None and many is not None:
        scaling = many["tokens_per_s"] / one["tokens_per_s"]
        target = SCALING_TARGET if many["world_size"] == 2 and not args.smoke else None  # GPUs only
        records.append({"kind": "dp_scaling", "model": args.model, "world_size": many["world_size"],
                        "tokens_per_s_1": one["tokens_per_s"], "tokens_per_s_n": many["tokens_per_s"],
                        "scaling": scaling, "target": target,
                        "meets_target": None if target is None else scaling >= target, "env": base["env"]})
    return records


def _comm_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def print_summary(records: list[dict[str, Any]]) -> None:
    runs = [r for r in records if r["kind"] == "dp"]
    if not runs:
        return
    first = runs[0]
    title = (f"Data-parallel BlockAdam: {first['model']} bsz {first['bsz_per_rank']} x {first['seqlen']} per rank, "
             f"K={first['switch_every']}, on {first['env'].get('device')}")
    cols = ["world", "median step ms", "tokens/s", "all-reduced GB/step", "DDP full-FT GB/step", "ranks identical"]
    rows = [[r["world_size"], r.get("median_step_ms_slowest_rank", r["median_step_ms"]), r["tokens_per_s"],
             r["grad_bytes_per_step"] / 1e9 if r["world_size"] > 1 else None, r["ddp_full_grad_bytes"] / 1e9,
             r.get("replicas_identical")] for r in runs]
    R.print_table(title, cols, rows)
    for r in records:
        if r["kind"] == "dp_scaling":
            verdict = "" if r["target"] is None else (" (meets" if r["meets_target"] else " (misses") + \
                f" the {r['target']:.2f}x target)"
            print(f"scaling {r['world_size']} ranks vs 1: {r['scaling']:.3f}x tokens/s{verdict}")
    for r in runs:
        if r["world_size"] > 1:
            print(f"bytes all-reduced per step: {r['grad_bytes_per_step'] / 1e6:.1f} MB (active block) vs "
                  f"{r['ddp_full_grad_bytes'] / 1e6:.1f} MB for DDP full finetuning "
                  f"({r['ddp_full_grad_bytes'] / max(r['grad_bytes_per_step'], 1):.1f}x less)")
            if not r["replicas_identical"]:
                print(f"RANKS DIVERGED: {r['replicas_error']}")


# ------------------------------------------------------------------------------------- entry points
def _rank_main(args: argparse.Namespace, rank: int, world: int, local_rank: int,
               init_method: Optional[str]) -> list[dict[str, Any]]:
    if args.smoke:
        device, backend = torch.device("cpu"), "gloo"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_dp needs CUDA GPUs (use --smoke for a CPU run of the code path)")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    if world > 1:
        extra = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=10), **extra)
    try:
        with H.cpu_threads(args.smoke):
            records = run_rank(args, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return records


def _finish(args: argparse.Namespace, records: list[dict[str, Any]], started: float) -> int:
    for r in records:
        r["command"] = [sys.executable, *sys.argv]
    R.append_jsonl(args.out, records)
    print_summary(records)
    R.log(f"bench_dp total: {time.perf_counter() - started:.1f} s")
    diverged = any(r["kind"] == "dp" and r.get("replicas_identical") is False for r in records)
    return 1 if diverged else 0


def _spawned(local_rank: int, args: argparse.Namespace, init_method: str, started: float) -> None:
    records = _rank_main(args, local_rank, SMOKE_WORLD, local_rank, init_method)
    if local_rank == 0 and _finish(args, records, started):
        raise SystemExit(1)


def main(argv: Optional[list[str]] = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        records = _rank_main(args, rank, world, int(os.environ.get("LOCAL_RANK", rank)), "env://")
        return _finish(args, records, started) if rank == 0 else 0
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_spawned, args=(args, f"file://{tmp}/init", started), nprocs=SMOKE_WORLD, join=True)
        return 0
    records = _rank_main(args, 0, 1, 0, None)
    return _finish(args, records, started)


if __name__ == "__main__":
    sys.exit(main())
