"""PNG of a ProfileReport: memory over time with block switches marked, and per-block bars.

Drawn on matplotlib's Agg canvas directly (no pyplot, no display, no global backend change).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from .report import ProfileReport

_MAX_LABELLED_SWITCHES = 40


def _unit(values: Sequence[int | None]) -> tuple[str, float]:
    largest = max((v for v in values if v is not None), default=0)
    if largest >= 4 * 1024**3:
        return "GiB", float(1024**3)
    if largest >= 1024**2:
        return "MiB", float(1024**2)
    return "KiB", 1024.0


def _series(points: list[tuple[float, int | None]], scale: float) -> tuple[list[float], list[float]]:
    kept = [(t, v / scale) for t, v in points if v is not None]
    return [t for t, _ in kept], [v for _, v in kept]


def _timeline(ax: Axes, report: ProfileReport) -> None:
    if report.samples:
        rows = report.samples
        named = {
            "torch allocated": [(s.time_s, s.allocated_bytes) for s in rows],
            "torch reserved": [(s.time_s, s.reserved_bytes) for s in rows],
            f"NVML used ({report.nvml_scope})": [(s.time_s, s.nvml_used_bytes) for s in rows],
        }
        if all(s.allocated_bytes is None for s in rows):
            named["process RSS"] = [(s.time_s, s.rss_bytes) for s in rows]
        title, style = "memory over time (sampled)", "-"
    elif report.phase_records:
        rows = report.phase_records
        named = {
            "torch allocated (phase end)": [(r.end_s, r.allocated_end_bytes) for r in rows],
            "peak allocated (phase)": [(r.end_s, r.peak_allocated_bytes) for r in rows],
            f"NVML used ({report.nvml_scope}, phase end)": [(r.end_s, r.nvml_used_bytes) for r in rows],
            "process RSS (phase end)": [(r.end_s, r.rss_bytes) for r in rows],
        }
        title, style = "memory at phase ends (no sampler: set sample_interval_s for a timeline)", ".-"
    else:
        ax.text(0.5, 0.5, "no timeline: no phases or samples recorded", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return
    unit, scale = _unit([v for points in named.values() for _, v in points])
    for label, points in named.items():
        xs, ys = _series(points, scale)
        if xs:
            ax.plot(xs, ys, style, label=label, linewidth=1.2, markersize=3)
    for i, event in enumerate(report.switches):
        ax.axvline(event.time_s, color="0.5", linestyle="--", linewidth=0.8,
                   label="block switch" if i == 0 else None)
        if len(report.switches) <= _MAX_LABELLED_SWITCHES:
            ax.annotate(str(event.new_block), (event.time_s, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(2, -2), textcoords="offset points", fontsize=7, ha="left", va="top",
                        color="0.3")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("time since profiler start (s)")
    ax.set_ylabel(unit)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def _block_bars(ax: Axes, report: ProfileReport) -> None:
    blocks = report.blocks
    if not blocks:
        ax.text(0.5, 0.5, "no blocks recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    use_rss = all(b.peaks.allocated is None for b in blocks)
    peak_label = "peak RSS" if use_rss else "peak allocated"
    peaks = [b.peaks.rss if use_rss else b.peaks.allocated for b in blocks]
    arenas = [b.arena_bytes for b in blocks]
    bars = [(peak_label, peaks)]
    if any(v is not None for v in arenas):
        bars.append(("arena bytes", arenas))
    unit, scale = _unit(peaks + arenas)
    width = 0.8 / len(bars)
    positions = list(range(len(blocks)))
    for offset, (label, values) in enumerate(bars):
        xs = [p - 0.4 + width * (offset + 0.5) for p in positions]
        ax.bar(xs, [(v or 0) / scale for v in values], width=width, label=label)
    ax.set_xticks(positions)
    ax.set_xticklabels([str(b.index) for b in blocks], fontsize=7 if len(blocks) > 24 else 9)
    ax.set_xlabel("block")
    ax.set_ylabel(unit)
    ax.set_title("per block", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def plot_report(report: ProfileReport, path: str | os.PathLike[str]) -> Path:
    """Write the two-panel PNG to ``path`` and return it."""
    figure = Figure(figsize=(11, 7.5), layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, height_ratios=(3, 2))
    _timeline(top, report)
    _block_bars(bottom, report)
    figure.suptitle(f"VRAM profile: {report.device} ({report.device_name})", fontsize=11)
    out = Path(path)
    figure.savefig(out, format="png", dpi=110)
    return out
