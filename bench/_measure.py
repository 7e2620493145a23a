"""What a training-step benchmark measures inside one variant's process.

* :class:`Clock`: device timestamps, CUDA events (read once at the end, no per-step sync) or
  ``perf_counter`` on the CPU. Kernel benchmarks time with ``triton.testing.do_bench`` instead
  (``_common.time_ms``); a training step is stateful and phased, so it is timed in place.
* :class:`MemoryWatch`: torch peak allocated / reserved, NVML used memory (max over samples taken
  after each phase), host peak RSS.
* :class:`GcWatch`: Python garbage-collector pauses during the measured steps.
* :class:`ScriptPhases`: wall time of the script's own phases (import, build, setup, run).
"""
from __future__ import annotations

import gc
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from _report import log

GIB = float(2**30)


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
