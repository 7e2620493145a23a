"""Shared machinery of the backward / end-to-end / budget benchmarks.

* :class:`Clock` — device timestamps: CUDA events (read once at the end, no per-step sync) or
  ``perf_counter`` on CPU.
* :class:`MemoryWatch` — torch peak allocated / reserved, NVML used memory (max over samples taken
  after each phase), host peak RSS.
* :func:`run_guarded` — run one variant and turn an OOM or any other exception into a result record.
* :func:`dispatch` — run a variant in a fresh subprocess (the script re-invokes itself; the child
  prints one ``RESULT_PREFIX`` JSON line on stdout), in a forked child (``fork``: also a fresh process
  with its own CUDA context, without re-importing torch / transformers; the parent never touches
  CUDA) or in this process (``inline``, for CPU smoke runs).
* :class:`GcWatch` — Python garbage-collector pauses during the measured steps.
* :func:`env_info`, :func:`device_for`, :func:`append_jsonl`, :func:`print_table` (thin layers over
  ``_common``), :class:`ScriptPhases`.
"""
from __future__ import annotations

import gc
import importlib.metadata
import json
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch

import _common

RESULT_PREFIX = "@@BENCH_RESULT@@ "
GIB = float(2**30)
ISOLATIONS = ("subprocess", "fork", "inline")
# Set in a forked child: its imports were the parent's, so it reports no import time of its own.
_FORKED = False


# ------------------------------------------------------------------------------------ environment
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def env_info(device: torch.device | None) -> dict[str, Any]:
    """``_common.env_record()`` (device, torch, triton, date, command) plus transformers / badam versions,
    CUDA version, host and the device's memory. Touches CUDA only when ``device`` is CUDA."""
    info = _common.env_record()
    info.update(transformers=_version("transformers"), badam=_version("badam"), cuda=torch.version.cuda,
                python=platform.python_version(), host=platform.node(), total_gib=None)
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, total_gib=round(props.total_memory / GIB, 3))
    return info


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


# ----------------------------------------------------------------------------------------- timing
class Clock:
    """Timestamps on the device's stream. ``mark()`` never syncs; ``ms(a, b)`` syncs on ``b``."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def ms(self, start: Any, end: Any) -> float:
        if self.cuda:
            end.synchronize()
            return float(start.elapsed_time(end))
        return (end - start) * 1e3


def median(xs: Sequence[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def mean(xs: Sequence[float]) -> float | None:
    return float(statistics.fmean(xs)) if xs else None


class ScriptPhases:
    """Wall time of the script's own phases (import, build, setup, run), printed as they end."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            took = time.perf_counter() - start
            self.seconds[name] = round(self.seconds.get(name, 0.0) + took, 3)
            log(f"[{self.label}] {name}: {took:.2f} s")


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


class GcWatch:
    """Count and host time of Python garbage collections while registered (a context manager).

    A full (generation 2) collection in a process holding torch + transformers takes hundreds of
    milliseconds; when one lands inside a timed phase, this says so.
    """

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.ms = [0.0, 0.0, 0.0]
        self._t0: float | None = None

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            gen = min(int(info.get("generation", 2)), 2)
            self.count[gen] += 1
            self.ms[gen] += (time.perf_counter() - self._t0) * 1e3
            self._t0 = None

    def reset(self) -> None:
        self.count = [0, 0, 0]
        self.ms = [0.0, 0.0, 0.0]

    def __enter__(self) -> "GcWatch":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: Any) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict[str, Any]:
        return {"gc_collections": sum(self.count), "gc_full_collections": self.count[2],
                "gc_ms": round(sum(self.ms), 3), "gc_full_ms": round(self.ms[2], 3)}


def csv_choices(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated, non-empty list of items from ``choices``."""
    import argparse

    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}; got {text!r}")
        return items
    return parse


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- memory
def _nvml_open(device: torch.device) -> tuple[Any, str | None]:
    if device.type != "cuda":
        return None, "not a CUDA device"
    try:
        from badam_ext.profiling.nvml import NvmlDevice
    except ImportError as exc:
        return None, f"badam_ext.profiling.nvml not importable: {exc}"
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    return NvmlDevice.open(device.index or 0, None if uuid is None else str(uuid))


def _peak_rss() -> int | None:
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


class MemoryWatch:
    """Peak memory of this process: torch allocated / reserved and NVML used (max of samples)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._nvml, self.nvml_note = _nvml_open(device)
        self.nvml_scope: str | None = None
        self.nvml_peak: int | None = None

    def reset(self) -> None:
        """Start the peaks from what is allocated now."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.nvml_peak = None
        self.sample()

    def sample(self) -> None:
        """Read NVML used memory (host call, no device sync); keep the maximum."""
        if self._nvml is None:
            return
        reading = self._nvml.read()
        self.nvml_scope = reading.scope
        if self.nvml_peak is None or reading.used > self.nvml_peak:
            self.nvml_peak = reading.used

    def peaks(self) -> dict[str, Any]:
        """Peak figures in GiB (None where the source does not exist on this device)."""
        self.sample()
        out: dict[str, Any] = {"peak_alloc_gib": None, "peak_reserved_gib": None, "nvml_peak_gib": None,
                               "nvml_scope": self.nvml_scope, "host_peak_rss_gib": None}
        if self.cuda:
            out["peak_alloc_gib"] = torch.cuda.max_memory_allocated(self.device) / GIB
            out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / GIB
        if self.nvml_peak is not None:
            out["nvml_peak_gib"] = self.nvml_peak / GIB
        rss = _peak_rss()
        if rss is not None:
            out["host_peak_rss_gib"] = rss / GIB
        if self._nvml is None and self.cuda:
            out["nvml_note"] = self.nvml_note
        return out

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None


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


def first_line(text: str, limit: int = 400) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:limit]


def run_guarded(fn: Callable[[], dict[str, Any]], on_error: Callable[[], dict[str, Any]] | None = None
                ) -> dict[str, Any]:
    """``fn()``; an exception becomes ``{"status": "oom" | "error", "error": ...}`` plus ``on_error()``."""
    try:
        result = fn()
        result.setdefault("status", "ok")
        return result
    except Exception as exc:  # noqa: BLE001 - every failure is a benchmark result
        status = "oom" if is_oom(exc) else "error"
        record: dict[str, Any] = {
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


# ------------------------------------------------------------------------------------ dispatching
def emit_result(record: dict[str, Any]) -> None:
    """The child's answer to its parent: one prefixed JSON line on stdout."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(jsonable(record)) + "\n")
    sys.stdout.flush()


def parse_child_output(stdout: str) -> dict[str, Any] | None:
    """The last result line of a child's stdout (None when there is none)."""
    found = None
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            found = json.loads(line[len(RESULT_PREFIX):])
    return found


def run_subprocess(script: str, argv: list[str], timeout_s: float) -> dict[str, Any]:
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


def _forked_entry(conn: Any, fn: Callable[[list[str]], dict[str, Any]], argv: list[str]) -> None:
    global _FORKED
    _FORKED = True
    try:
        record = fn(argv)
    except BaseException as exc:  # noqa: BLE001 - the parent must get an answer
        record = {"status": "error", "error": f"{type(exc).__name__}: {first_line(str(exc))}"}
    conn.send(jsonable(record))
    conn.close()


def run_forked(fn: Callable[[list[str]], dict[str, Any]], argv: list[str], timeout_s: float) -> dict[str, Any]:
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


def dispatch(script: str, argv: list[str], isolation: str, run_inline: Callable[[list[str]], dict[str, Any]],
             timeout_s: float = 600.0) -> dict[str, Any]:
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


# ----------------------------------------------------------------------------------------- output
def jsonable(value: Any) -> Any:
    """Plain JSON: NaN / inf become None, tuples lists, dtypes and devices strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    return value


def append_jsonl(path: str | None, records: Sequence[dict[str, Any]]) -> None:
    """``_common.append_jsonl`` of plain-JSON records (NaN / inf as null)."""
    _common.append_jsonl(path, [jsonable(r) for r in records])


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def fmt_ratio(value: float | None, base: float | None) -> str:
    r = ratio(value, base)
    return "-" if r is None else f"{r:.2f}x"


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """``_common.print_table`` with cells formatted here (None as "-", two decimals)."""
    _common.print_table(title, columns, [[fmt(c) for c in row] for row in rows])
