"""The ``badam-ext`` command: train (the main job), profile, bench."""
from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path
from typing import Optional, Sequence

BENCHES = ("update", "switch", "backward", "e2e", "budget", "memory")


def _add_train_args(p: argparse.ArgumentParser, *, steps_help: str) -> None:
    p.add_argument("--model", dest="model_path", help="local Hugging Face checkpoint folder (default: embedded model)")
    p.add_argument("--preset", choices=["tiny", "small"], help="embedded model size (default: small on CUDA, tiny on CPU)")
    p.add_argument("--data", help="JSON or JSONL examples to finetune on (text; prompt/completion; alpaca "
                                  "instruction/input/output; messages with the chat template); needs --model")
    p.add_argument("--eval-data", help="JSON or JSONL examples for the eval loss (default: the first training rows)")
    p.add_argument("--pack", action="store_true", help="pack whole examples into rows of --seq-len (default: pad)")
    p.add_argument("--save-model", action=argparse.BooleanOptionalAction, default=None,
                   help="save OUT/model (save_pretrained + tokenizer); default: on with --model")
    p.add_argument("--steps", type=int, help=steps_help)
    p.add_argument("--switch-every", type=int, default=5, help="K: optimizer steps per block")
    p.add_argument("--switch-mode", default="ascending", choices=["ascending", "descending", "random", "fixed"])
    p.add_argument("--start-block", type=int, help="first active block (required by --switch-mode fixed)")
    p.add_argument("--lr", type=float, help="learning rate (default: 1e-3 for the embedded model, 1e-5 with --model)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--include-embedding", action=argparse.BooleanOptionalAction, default=None,
                   help="train the input embedding as a block (default: on for the embedded model, off with --model)")
    p.add_argument("--include-lm-head", action=argparse.BooleanOptionalAction, default=None,
                   help="train an untied lm_head as a block (default: as --include-embedding)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-memory-savings", dest="memory_savings", action="store_false",
                   help="train with the model's own loss (full logits) and no checkpoint offload")
    p.add_argument("--offload-checkpoints", choices=["auto", "on", "off"], default="auto",
                   help="checkpointed layer inputs to host memory (auto: when the memory plan says it must)")
    p.add_argument("--layer-kernels", choices=["auto", "on", "off"], default="auto",
                   help="Liger-Kernel's RMSNorm and SwiGLU in the layers (auto: Llama-family models on CUDA "
                        "with Liger-Kernel installed)")
    p.add_argument("--budget-gib", type=float, help="device memory the step may use (default: the device's)")
    p.add_argument("--states", choices=["fp32", "8bit"], default="fp32",
                   help="optimizer-state format (8bit: blockwise 8-bit moments, about half the arena)")
    p.add_argument("--no-master", dest="master", action="store_false",
                   help="no fp32 master copy: update the bf16 weights directly with stochastic rounding")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip by global norm (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-interval", dest="sample_interval_s", type=float, default=0.05,
                   help="seconds between background memory samples (0: off)")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _train_config(args: argparse.Namespace, out: str):
    from .train import TrainConfig

    fields = {k: getattr(args, k) for k in TrainConfig.__dataclass_fields__ if hasattr(args, k)}
    fields["out"] = args.out or out
    for key in ("sample_interval_s", "max_grad_norm"):  # 0 switches these off
        if fields.get(key) == 0:
            fields[key] = None
    return TrainConfig(**fields)


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    from .profiling.report import make_console

    table = Table(title="badam-ext train: summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("device", "model_params", "blocks", "steps", "tokens_per_s", "train_loss_first",
                "train_loss_last", "eval_loss_before", "eval_loss_after", "eval_data", "arena_bytes", "wall_s",
                "model_dir"):
        value = summary[key]
        table.add_row(key, f"{value:,.4g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value))
    make_console().print(table)
    out = Path(summary["config"]["out"])
    print(f"report written to {out}/: " + ", ".join(sorted(p.name for p in out.iterdir())))


def bench_dir() -> Path:
    """The source tree's bench/ folder (benchmarks ship with the source, not the wheel)."""
    folder = Path(__file__).resolve().parent.parent / "bench"
    if not folder.is_dir():
        raise SystemExit("badam-ext bench needs the source tree (bench/ beside badam_ext/): install with pip install -e .")
    return folder


def _run_bench(name: str, argv: Sequence[str]) -> int:
    script = bench_dir() / f"bench_{name}.py"
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *argv]
    sys.path.insert(0, str(script.parent))  # the scripts import their siblings (_common, models)
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from .finetune_data import DataError
    from .train import run

    cfg = _train_config(args, "runs/train" if args.command == "train" else "runs/profile")
    if args.command == "profile":
        cfg.block_epochs = 1
    try:
        summary = run(cfg)
    except (DataError, FileNotFoundError) as e:  # bad input: a message, no traceback, nothing written
        print(f"badam-ext {args.command}: error: {e}", file=sys.stderr)
        return 2
    _print_summary(summary)
    print(json.dumps({k: summary[k] for k in ("eval_loss_before", "eval_loss_after", "tokens_per_s")}))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="badam-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="finetune with BlockAdam: the embedded default (the main job), or "
                                         "--model PATH --data FILE")
    _add_train_args(train, steps_help="optimizer steps (default: one pass over --data, else two block epochs)")
    train.add_argument("--out", help="output folder (default runs/train)")

    profile = sub.add_parser("profile", help="one block epoch with the VRAM/time profiler, per-block table")
    _add_train_args(profile, steps_help="optimizer steps (default: one block epoch)")
    profile.add_argument("--out", help="output folder (default runs/profile)")

    bench = sub.add_parser("bench", help="run a benchmark script from bench/ (extra args go to the script)")
    bench.add_argument("name", choices=BENCHES)
    bench.add_argument("args", nargs=argparse.REMAINDER)

    from .memory.plan_cli import add_plan_parser, run_plan

    add_plan_parser(sub)

    args = parser.parse_args(argv)
    if args.command == "bench":
        return _run_bench(args.name, args.args)
    if args.command == "plan":
        return run_plan(args)
    return _run_train(args)


if __name__ == "__main__":
    raise SystemExit(main())
