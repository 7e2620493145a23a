"""``badam-ext plan``: the memory plan of a model config, as a table or JSON."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .planner import GIB, plan_memory


def add_plan_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the ``plan`` subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("plan", help="predict a step's peak memory per block from a model config (no weights)")
    p.add_argument("--config", required=True, help="a Hugging Face config.json, or a checkpoint folder holding one")
    p.add_argument("--budget-gib", type=float, default=23.0, help="memory the step may use (default 23: a 24 GB card)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--offload", choices=["auto", "on", "off"], default="auto", help="checkpoint offload (default auto)")
    p.add_argument("--no-fused-loss", dest="fused_loss", action="store_false", help="plan Hugging Face's own loss")
    p.add_argument("--layer-kernels", choices=["auto", "on", "off"], default="auto",
                   help="plan with Liger-Kernel's RMSNorm and SwiGLU in the layers (auto, as in training: for "
                        "Llama, Mistral and Qwen2/3 when Liger-Kernel is installed)")
    p.add_argument("--loss-backend", choices=["auto", "torch", "liger"], default="auto",
                   help="the fused loss's implementation (default: what this machine would use)")
    p.add_argument("--states", choices=["fp32", "8bit"], default="fp32",
                   help="BlockAdam's optimizer-state format (sizes the arena; default fp32)")
    p.add_argument("--no-master", dest="master", action="store_false",
                   help="BlockAdam(master=False): no fp32 master copy in the arena")
    p.add_argument("--include-embedding", action="store_true")
    p.add_argument("--include-lm-head", action="store_true")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan; exit status 0 when it fits the budget, 3 when it does not."""
    offload = {"auto": "auto", "on": True, "off": False}[args.offload]
    try:
        layer_kernels = _layer_kernels(args.layer_kernels, args.config)
        plan = plan_memory(args.config, batch_size=args.batch_size, seq_len=args.seq_len, budget_gib=args.budget_gib,
                           fused_loss=args.fused_loss, offload=offload, include_embedding=args.include_embedding,
                           include_lm_head=args.include_lm_head, layer_kernels=layer_kernels,
                           loss_backend=args.loss_backend, states=args.states, master=args.master)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        print(f"badam-ext plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print_plan(plan)
    return 0 if plan.fits else 3


def _layer_kernels(choice: str, config: str) -> bool:
    """What a training run would do: ``auto`` is on for the supported architectures with Liger installed."""
    if choice != "auto":
        return choice == "on"
    import importlib.util

    from .layer_kernels import LAYER_KERNEL_MODEL_TYPES
    from .planner import load_config

    return (load_config(config).model_type in LAYER_KERNEL_MODEL_TYPES
            and importlib.util.find_spec("liger_kernel") is not None)


def print_plan(plan: Any) -> None:
    """Per-block table, the worst block, the limits and what "auto" chose."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    table = Table(title=f"Memory plan: {plan.model_type}, {plan.batch_size} x {plan.seq_len} tokens, "
                        f"fused loss {plan.loss_backend if plan.fused_loss else 'off'}, "
                        f"offload {'on' if plan.offload else 'off'}, layer kernels {'on' if plan.layer_kernels else 'off'}, "
                        f"states {plan.states}{'' if plan.master else ' (no master)'}")
    columns = ("block", "weights", "arena", "grads", "checkpoints", "recompute", "loss", "peak GiB", "at")
    for c in columns:
        table.add_column(c, justify="left" if c in ("block", "at") else "right")
    worst = plan.worst.index
    for b in plan.blocks:
        g = b.gib()
        style = "bold" if b.index == worst else None
        table.add_row(f"{b.index} {b.name}", *(f"{g[k]:.2f}" for k in columns[1:7]), f"{g['peak']:.2f}", b.peak_at,
                      style=style)
    console.print(table)
    budget = "no budget" if plan.budget_bytes is None else f"budget {plan.budget_bytes / GIB:.1f} GiB"
    verdict = {True: "fits", False: "does NOT fit", None: "-"}[plan.fits]
    console.print(f"worst block {worst} ({plan.worst.name}): {plan.peak_bytes / GIB:.2f} GiB peak allocated, "
                  f"+ {plan.fragmentation_bytes / GIB:.2f} GiB allocator slack; {budget}: {verdict}")
    if plan.auto_offload is not None:
        console.print(f"offload 'auto' chooses: {'on' if plan.auto_offload else 'off'}")
    for label, lim in plan.limits.items():
        console.print(f"  {label:<20} longest sequence at batch {plan.batch_size}: {lim['longest_seq']:>7}   "
                      f"largest batch at {plan.seq_len}: {lim['largest_batch']}")
