"""VRAM and time profiling per phase and per block of a BAdam run.

    from badam_ext.profiling import VramProfiler
    prof = VramProfiler(sample_interval_s=0.05)
    prof.attach(optimizer)                       # block switches marked via add_switch_hook
    with prof.phase("forward"): ...
    prof.report().save("vram_profile")           # JSON + CSV + PNG; .print() for tables

With transformers: ``Trainer(..., callbacks=[VramProfilerCallback(prof)])``
(``VramProfilerCallback`` imports transformers on first access).
"""

from __future__ import annotations

from typing import Any

from .memory import NON_TORCH_LABEL, MemorySnapshot, resolve_device
from .nvml import NvmlDevice, NvmlReading, nvml_target
from .recorder import VramProfiler
from .report import ProfileReport, format_bytes
from .stats import BlockStats, PhaseStats, Sample, SwitchEvent

__all__ = [
    "VramProfiler",
    "VramProfilerCallback",
    "ProfileReport",
    "MemorySnapshot",
    "BlockStats",
    "PhaseStats",
    "Sample",
    "SwitchEvent",
    "NvmlDevice",
    "NvmlReading",
    "NON_TORCH_LABEL",
    "format_bytes",
    "nvml_target",
    "plot_report",
    "resolve_device",
]


def __getattr__(name: str) -> Any:
    if name == "VramProfilerCallback":  # lazy: transformers is an optional dependency
        from .hf_callback import VramProfilerCallback

        return VramProfilerCallback
    if name == "plot_report":  # lazy: matplotlib takes a while to import
        from .plot import plot_report

        return plot_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
