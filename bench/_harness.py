"""The process harness of the training-step benchmarks (end to end, backward by depth, budget).

A script is a parent that runs variants, each in a child: a fresh subprocess (the script re-invoked
with its hidden ``--variant``; the child prints one ``RESULT_PREFIX`` JSON line on stdout), a forked
child (``fork``: a fresh CUDA context without re-importing torch / transformers; the parent never
touches CUDA) or this process (``inline``, for CPU smoke runs). A failing child, an OOM included,
answers with a record saying so. :class:`Bench` holds a script's parts and runs its ``main``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

import _common
from _report import append_jsonl, first_line, jsonable, log

RESULT_PREFIX = "@@BENCH_RESULT@@ "
ISOLATIONS = ("subprocess", "fork", "inline")
Record = dict[str, Any]
# Set in a forked child: its imports were the parent's, so it reports no import time of its own.
_FORKED = False


# ------------------------------------------------------------------------------------ arguments
def add_run_args(p: argparse.ArgumentParser) -> None:
    """The options of every harness script: smoke mode, isolation, device, seed, timeout, output."""
    p.add_argument("--smoke", action="store_true",
                   help="tiny Llama, seq 16 (on CPU without a GPU): every code path in seconds")
    p.add_argument("--isolation", choices=ISOLATIONS, default=None,
                   help="each variant in a fresh process: forked (default; no re-imports, the parent never "
                        "touches CUDA) or a re-invoked subprocess (--variant X); inline: in this process "
                        "(smoke default)")
    p.add_argument("--device", default=None, help="torch device (default cuda; smoke without a GPU: cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child-timeout", type=float, default=600.0, help="seconds per variant process")
    p.add_argument("--out", default=None, help="append JSON lines to this file")


def add_child_arg(p: argparse.ArgumentParser, choices: Sequence[str]) -> None:
    """The hidden ``--variant X`` that makes the script a child running one variant."""
    p.add_argument("--variant", choices=choices, default=None, help=argparse.SUPPRESS)


def finish_run_args(args: argparse.Namespace) -> None:
    args.isolation = args.isolation or ("inline" if args.smoke else "fork")


def run_child_argv(args: argparse.Namespace) -> list[str]:
    """The harness options a child must see again (seed, device, smoke)."""
    argv = ["--seed", str(args.seed)]
    if args.device:
        argv += ["--device", args.device]
    if args.smoke:
        argv.append("--smoke")
    return argv


def csv_choices(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated, non-empty list of items from ``choices``."""

    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}; got {text!r}")
        return items
    return parse


# --------------------------------------------------------------------------------------- device
def device_for(smoke: bool, requested: str | None) -> torch.device:
    """``--device`` when given, else ``_common.pick_device`` (CUDA; the CPU only for smoke runs)."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"--device {requested}: no CUDA device available")
    else:
        device = _common.pick_device(smoke)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def init_device(device: torch.device) -> None:
    """Create the CUDA context now, so that the model build time does not include it."""
    if device.type == "cuda":
        torch.empty(1, device=device)
        torch.cuda.synchronize(device)


@contextmanager
def cpu_threads(smoke: bool) -> Iterator[None]:
    """One intra-op thread for smoke runs (tiny tensors: extra threads only spin), restored afterwards."""
    if not smoke:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def import_seconds(script_start: float) -> float:
    """Seconds this process spent before its variant started (0 in a forked child: no imports of its own)."""
    return 0.0 if _FORKED else round(time.perf_counter() - script_start, 3)


# ------------------------------------------------------------------------------- errors and OOMs
_OOM_TYPES: tuple[type, ...] = tuple(
    t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t
)


def is_oom(exc: BaseException) -> bool:
    """A CUDA out-of-memory error (torch's own, or one cuBLAS / a kernel launch reports)."""
    if _OOM_TYPES and isinstance(exc, _OOM_TYPES):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def run_guarded(fn: Callable[[], Record], on_error: Callable[[], Record] | None = None) -> Record:
    """``fn()``; an exception becomes ``{"status": "oom" | "error", "error": ...}`` plus ``on_error()``."""
    try:
        result = fn()
        result.setdefault("status", "ok")
        return result
    except Exception as exc:  # noqa: BLE001 - every failure is a benchmark result
        status = "oom" if is_oom(exc) else "error"
        record: Record = {
            "status": status,
            "error": f"{type(exc).__name__}: {first_line(str(exc))}",
            "traceback_tail": traceback.format_exc().strip().splitlines()[-6:],
        }
        if on_error is not None:
            try:
                record.update(on_error())
            except Exception as inner:  # noqa: BLE001
                record["on_error_failed"] = f"{type(inner).__name__}: {inner}"
        return record


def run_tracked(fn: Callable[[dict[str, Any]], Record]) -> Record:
    """``run_guarded(fn(ctx))`` where ``fn`` keeps ``ctx`` ("phase", "step", "watch") current; a failure
    record says where it happened and the memory peaks up to then."""
    ctx: dict[str, Any] = {"phase": "start", "step": None, "watch": None}

    def on_error() -> Record:
        info: Record = {"failed_in": ctx["phase"], "failed_at_step": ctx["step"]}
        if ctx["watch"] is not None:
            info.update(ctx["watch"].peaks())
        return info

    return run_guarded(lambda: fn(ctx), on_error)


# ---------------------------------------------------------------------------------- child processes
def emit_result(record: Record) -> None:
    """The child's answer to its parent: one prefixed JSON line on stdout."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(jsonable(record)) + "\n")
    sys.stdout.flush()


def parse_child_output(stdout: str) -> Record | None:
    """The last result line of a child's stdout (None when there is none)."""
    found = None
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            found = json.loads(line[len(RESULT_PREFIX):])
    return found


def run_subprocess(script: str, argv: list[str], timeout_s: float) -> Record:
    """Run ``python script argv...`` in a fresh process; its stderr streams through to ours."""
    cmd = [sys.executable, script, *argv]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"child timed out after {timeout_s:.0f} s", "child_command": cmd}
    wall = time.perf_counter() - start
    record = parse_child_output(proc.stdout)
    if record is None:
        tail = [ln for ln in proc.stdout.strip().splitlines()[-5:]]
        record = {"status": "error", "error": f"child exited with code {proc.returncode} and no result",
                  "stdout_tail": tail}
    record["child_returncode"] = proc.returncode
    record["child_wall_s"] = round(wall, 3)
    record["child_command"] = cmd
    return record


def _forked_entry(conn: Any, fn: Callable[[list[str]], Record], argv: list[str]) -> None:
    global _FORKED
    _FORKED = True
    try:
        record = fn(argv)
    except BaseException as exc:  # noqa: BLE001 - the parent must get an answer
        record = {"status": "error", "error": f"{type(exc).__name__}: {first_line(str(exc))}"}
    conn.send(jsonable(record))
    conn.close()


def run_forked(fn: Callable[[list[str]], Record], argv: list[str], timeout_s: float) -> Record:
    """``fn(argv)`` in a forked child process; its record comes back through a pipe.

    The parent must not have initialised CUDA (a forked child cannot use an inherited CUDA context).
    """
    if torch.cuda.is_initialized():
        raise RuntimeError("fork isolation needs a parent that has not initialised CUDA")
    mp = multiprocessing.get_context("fork")
    recv, send = mp.Pipe(duplex=False)
    sys.stdout.flush()
    sys.stderr.flush()
    proc = mp.Process(target=_forked_entry, args=(send, fn, argv))
    start = time.perf_counter()
    proc.start()
    send.close()
    record = None
    if recv.poll(timeout_s):
        try:
            record = recv.recv()
        except EOFError:  # the child died before answering
            record = None
        timed_out = False
    else:
        timed_out = True
    proc.join(timeout=60 if record is not None else 5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if record is None:
        why = f"timed out after {timeout_s:.0f} s" if timed_out else f"exited with code {proc.exitcode} and no result"
        record = {"status": "error", "error": f"forked child {why}"}
    record["child_returncode"] = proc.exitcode
    record["child_wall_s"] = round(time.perf_counter() - start, 3)
    return record


def dispatch(script: str, argv: list[str], isolation: str, run_inline: Callable[[list[str]], Record],
             timeout_s: float = 600.0) -> Record:
    """One variant: in a fresh subprocess, a forked child or this process (``run_inline(argv)``)."""
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    if isolation == "subprocess":
        return run_subprocess(script, argv, timeout_s)
    if isolation == "fork":
        record = run_forked(run_inline, argv, timeout_s)
        record["child_command"] = ["<fork>", script, *argv]
        return record
    start = time.perf_counter()
    record = run_inline(argv)
    record["child_wall_s"] = round(time.perf_counter() - start, 3)
    record["child_command"] = ["<inline>", script, *argv]
    return record


# ------------------------------------------------------------------------------------ a script
@dataclass(frozen=True)
class Bench:
    """One benchmark script: how it parses, what a child runs, what the parent runs and prints.

    ``parse_args(argv)`` must give ``smoke``, ``isolation``, ``child_timeout``, ``out`` and ``variant``
    (set in a child); ``child(argv)`` returns one variant's record; ``parent(args, argv)`` runs the
    variants (through :meth:`run_child`) and returns their records; ``summary(args, records)`` prints.
    """

    name: str
    script: str
    start: float
    parse_args: Callable[[list[str]], argparse.Namespace]
    child: Callable[[list[str]], Record]
    parent: Callable[[argparse.Namespace, list[str]], list[Record]]
    summary: Callable[[argparse.Namespace, list[Record]], None]

    def main(self, argv: list[str] | None = None) -> list[Record]:
        """A child prints its record on stdout; the parent runs every variant, appends the JSON lines
        to ``--out`` and prints the summary. Returns the records."""
        argv = list(sys.argv[1:] if argv is None else argv)
        args = self.parse_args(argv)
        with cpu_threads(args.smoke):
            if args.variant is not None:
                record = self.child(argv)
                emit_result(record)
                return [record]
            records = self.parent(args, argv)
            append_jsonl(args.out, records)
            self.summary(args, records)
            log(f"bench_{self.name} total: {time.perf_counter() - self.start:.1f} s")
            return records

    def run_child(self, args: argparse.Namespace, argv: list[str], child_argv: list[str], label: str) -> Record:
        """One variant in a child as ``--isolation`` says, its record stamped with the parent's command."""
        log(f"== {label} ({args.isolation})")
        record = dispatch(self.script, child_argv, args.isolation, self.child, args.child_timeout)
        record["command"] = [sys.executable, self.script, *argv]
        log(f"== {label}: {record.get('status')} in {record['child_wall_s']:.1f} s")
        return record
