"""Helpers shared by the benchmark scripts: timing, copy bandwidth, layer shapes, environment
records, JSON-lines output and a rich table. Nothing here is specific to one benchmark."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

GB = 1e9

# One transformer layer's weight shapes, (out_features, in_features) for linears and (dim,) for norms.
LAYER_SHAPES: dict[str, list[tuple[int, ...]]] = {
    # hidden 4096, intermediate 14336, 32 q heads / 8 kv heads of dim 128: 218.1M parameters
    "llama3-8b": [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096),
                  (14336, 4096), (14336, 4096), (4096, 14336), (4096,), (4096,)],
    # hidden 2048, intermediate 8192, 32 q heads / 8 kv heads of dim 64: 60.8M parameters
    "llama3.2-1b": [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048),
                    (8192, 2048), (8192, 2048), (2048, 8192), (2048,), (2048,)],
    # a toy layer for --smoke runs (CPU, Triton interpreter)
    "smoke": [(64, 64), (16, 64), (16, 64), (64, 64), (96, 64), (96, 64), (64, 96), (64,), (64,)],
}


def numel_of(shapes: Iterable[Sequence[int]]) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def pick_device(smoke: bool) -> torch.device:
    """CUDA for real runs; the CPU (kernels in Triton's interpreter) for smoke runs without a GPU."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return torch.device("cuda")
    if not smoke:
        raise SystemExit("this benchmark needs a CUDA device (use --smoke for a CPU check of the code path)")
    return torch.device("cpu")


def enable_interpreter_if_cpu_smoke(argv: Sequence[str]) -> None:
    """Before triton is imported: a --smoke run on a machine without a GPU uses the interpreter."""
    if "--smoke" in argv and not (os.path.exists("/dev/nvidiactl") or _which("nvidia-smi")):
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _which(cmd: str) -> bool:
    import shutil

    return shutil.which(cmd) is not None


def time_ms(fn: Callable[[], Any], device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100,
            cpu_reps: int = 3) -> float:
    """Median milliseconds per call: ``triton.testing.do_bench`` (CUDA events) on a GPU, a host
    clock around ``cpu_reps`` calls (after one warm-up call) on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    samples = []
    for _ in range(cpu_reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 2 << 30, **timing: Any) -> float:
    """Device copy bandwidth in GB/s, counting bytes read plus bytes written, of a large D2D copy."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, **timing)
    del src, dst
    return 2 * n * 4 / (ms * 1e-3) / GB


def gbs(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / GB


def env_record() -> dict[str, Any]:
    """Device, library versions, date and command line for a results record."""
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (triton interpreter)"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
    }


def append_jsonl(path: Optional[str], records: Iterable[dict[str, Any]]) -> None:
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for rec in records:
            f.write(json.dumps(rec, sort_keys=True) + "\n")


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A rich table (plain text when rich is missing)."""
    rows = [[_fmt(v) for v in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a dependency; keep output usable regardless
        print(title)
        print(" | ".join(columns))
        for row in rows:
            print(" | ".join(row))
        return
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=max(120, sum(len(c) + 6 for c in columns))).print(table)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def free_cuda_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def layer_bench_parser(description: Optional[str], layer_names: Sequence[str]) -> argparse.ArgumentParser:
    """The arguments every per-layer kernel benchmark takes (layers, smoke mode, timing, output)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="llama3-8b,llama3.2-1b", help="comma-separated: " + ", ".join(layer_names))
    parser.add_argument("--smoke", action="store_true", help="tiny layer; runs on CPU via the Triton interpreter")
    parser.add_argument("--out", help="append JSON lines here")
    parser.add_argument("--warmup", type=float, default=50, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=float, default=300, help="do_bench repetition time, ms")
    parser.add_argument("--cpu-reps", type=int, default=3)
    return parser


def layer_bench_setup(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], layer_names: Sequence[str]):
    """Parse, validate the layers, pick the device and measure its copy bandwidth.

    Returns ``(args, layers, device, env, copy_gbs)``.
    """
    args = parser.parse_args(argv)
    layers = ["smoke"] if args.smoke else [x for x in args.layers.split(",") if x]
    for name in layers:
        if name not in layer_names:
            parser.error(f"unknown layer {name!r}; choose from {', '.join(layer_names)}")
    if args.smoke:
        args.cpu_reps = 1
    device = pick_device(args.smoke)
    env = env_record()
    copy_gbs = copy_bandwidth_gbs(device, nbytes=(8 << 20) if args.smoke else (2 << 30),
                                  warmup_ms=args.warmup, rep_ms=args.rep, cpu_reps=args.cpu_reps)
    print(f"{env['device']}: copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    return args, layers, device, env, copy_gbs
