"""Accumulators for the profiler: timings, memory peaks, per-phase and per-block statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Phases every block row shows (others appear when used, e.g. "train_step" from the HF callback).
STANDARD_PHASES = ("forward", "backward", "step", "switch")


@dataclass
class TimingStats:
    """Count, total, min and max of a phase's durations, in seconds."""

    count: int = 0
    total_s: float = 0.0
    min_s: float = math.inf
    max_s: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total_s += seconds
        self.min_s = min(self.min_s, seconds)
        self.max_s = max(self.max_s, seconds)

    @property
    def mean_s(self) -> float | None:
        return self.total_s / self.count if self.count else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "total_s": self.total_s,
            "mean_s": self.mean_s,
            "min_s": self.min_s if self.count else None,
            "max_s": self.max_s if self.count else None,
        }


def _max(current: int | None, value: int | None) -> int | None:
    if value is None:
        return current
    return value if current is None else max(current, value)


@dataclass
class Peaks:
    """Highest memory figures seen, in bytes (None when never observed)."""

    allocated: int | None = None
    reserved: int | None = None
    nvml_process: int | None = None
    nvml_device: int | None = None
    rss: int | None = None

    def observe(self, allocated: int | None = None, reserved: int | None = None,
                nvml_process: int | None = None, nvml_device: int | None = None,
                rss: int | None = None) -> None:
        self.allocated = _max(self.allocated, allocated)
        self.reserved = _max(self.reserved, reserved)
        self.nvml_process = _max(self.nvml_process, nvml_process)
        self.nvml_device = _max(self.nvml_device, nvml_device)
        self.rss = _max(self.rss, rss)

    def nvml(self, scope: str | None) -> int | None:
        """Peak NVML figure in the report's scope (process when known, else device)."""
        if scope == "process" and self.nvml_process is not None:
            return self.nvml_process
        return self.nvml_device

    def to_dict(self, scope: str | None) -> dict[str, Any]:
        return {
            "peak_allocated_bytes": self.allocated,
            "peak_reserved_bytes": self.reserved,
            "peak_nvml_bytes": self.nvml(scope),
            "peak_nvml_device_bytes": self.nvml_device,
            "peak_rss_bytes": self.rss,
        }


@dataclass
class PhaseStats:
    """One phase's calls, timings and memory peaks.

    ``peak_delta_bytes`` is the largest rise of allocated memory above its value at phase start
    (for a forward phase: the activations).
    """

    name: str
    calls: int = 0
    timing: TimingStats = field(default_factory=TimingStats)
    peaks: Peaks = field(default_factory=Peaks)
    peak_delta_bytes: int | None = None

    def observe_delta(self, delta: int | None) -> None:
        self.peak_delta_bytes = _max(self.peak_delta_bytes, delta)

    def to_dict(self, scope: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "calls": self.calls}
        out.update({f"time_{k}": v for k, v in self.timing.to_dict().items()})
        out.update(self.peaks.to_dict(scope))
        out["peak_delta_bytes"] = self.peak_delta_bytes
        return out


@dataclass
class BlockStats:
    """One block's description, activations (how often it became active), peaks and phases."""

    index: int
    name: str | None = None
    num_params: int | None = None
    arena_bytes: int | None = None
    grad_bytes: int | None = None
    activations: int = 0
    peaks: Peaks = field(default_factory=Peaks)
    phases: dict[str, PhaseStats] = field(default_factory=dict)

    def phase(self, name: str) -> PhaseStats:
        stats = self.phases.get(name)
        if stats is None:
            stats = self.phases[name] = PhaseStats(name)
        return stats

    def to_dict(self, scope: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "name": self.name,
            "num_params": self.num_params,
            "arena_bytes": self.arena_bytes,
            "grad_bytes": self.grad_bytes,
            "activations": self.activations,
        }
        out.update(self.peaks.to_dict(scope))
        out["phases"] = {name: stats.to_dict(scope) for name, stats in self.phases.items()}
        return out

    def row(self, scope: str | None, phase_names: list[str]) -> dict[str, Any]:
        """Flat row for CSV / tables: description, peaks, and mean time + count per phase."""
        row = {k: v for k, v in self.to_dict(scope).items() if k != "phases"}
        for name in phase_names:
            stats = self.phases.get(name)
            row[f"{name}_mean_s"] = stats.timing.mean_s if stats else None
            row[f"{name}_count"] = stats.calls if stats else 0
        return row


@dataclass(slots=True)
class Sample:
    """One sampler reading (bytes; None where the source is unavailable)."""

    time_s: float
    block: int | None
    allocated_bytes: int | None
    reserved_bytes: int | None
    nvml_used_bytes: int | None
    nvml_device_used_bytes: int | None
    rss_bytes: int


@dataclass(slots=True)
class PhaseRecord:
    """One phase call: host times, owning block, memory at its end; duration once resolved."""

    name: str
    block: int | None
    start_s: float
    end_s: float
    allocated_start_bytes: int | None
    allocated_end_bytes: int | None
    peak_allocated_bytes: int | None
    nvml_used_bytes: int | None
    rss_bytes: int | None
    duration_s: float | None = None


@dataclass(frozen=True, slots=True)
class SwitchEvent:
    """A block switch at host time ``time_s`` (``old_block`` None for the first activation)."""

    time_s: float
    old_block: int | None
    new_block: int
