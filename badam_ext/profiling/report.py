"""ProfileReport: the profiler's summary, printed as rich tables or saved as JSON, CSV and PNG."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .memory import NON_TORCH_LABEL, MemorySnapshot
from .stats import STANDARD_PHASES, BlockStats, PhaseRecord, PhaseStats, Peaks, Sample, SwitchEvent

JSON_NAME = "vram_report.json"
BLOCKS_CSV = "vram_blocks.csv"
PHASES_CSV = "vram_phases.csv"
TIMELINE_CSV = "vram_timeline.csv"
PLOT_NAME = "vram_report.png"


def format_bytes(value: int | None) -> str:
    """Human-readable byte count ("n/a" for None)."""
    if value is None:
        return "n/a"
    sign = "-" if value < 0 else ""
    size = float(abs(value))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{sign}{size:.0f} {unit}" if unit == "B" else f"{sign}{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


#: Console width when the output is not a terminal (a file, a pipe): wide enough that no table is
#: cut or its cells shortened to "…"; tables still take only the width they need.
NON_TTY_WIDTH = 1000


def make_console(file: Any = None) -> Any:
    """A rich Console for tables: the terminal's width on a TTY, :data:`NON_TTY_WIDTH` otherwise.

    Rich falls back to 80 columns when it writes to a file or a pipe, which cuts wide tables.
    """
    from rich.console import Console

    console = Console(file=file)
    if not console.is_terminal:
        console = Console(file=file, width=NON_TTY_WIDTH)
    return console


def memory_savings_rows(stats: dict[str, Any] | None) -> list[tuple[str, Any]]:
    """The memory-savings lines of the device table: offloaded checkpoints, host buffer, loss."""
    if not stats:
        return []
    rows: list[tuple[str, Any]] = []
    if stats.get("fused_loss"):
        rows.append(("loss", f"fused ({stats.get('loss_backend')}), no full logits"))
        rows.append(("loss working set held for backward (last step)", stats.get("loss_held_bytes")))
        rows.append(("loss working set planned (last step, incl. transients)", stats.get("loss_planned_bytes")))
    if "offloaded_bytes" in stats:
        rows.append(("checkpoints offloaded to host (last step)", stats.get("offloaded_bytes")))
        rows.append(("checkpoints offloaded to host (peak step)", stats.get("peak_offloaded_bytes")))
        kind = "pinned" if stats.get("pinned") else "pageable"
        rows.append((f"offload host buffer ({kind}, {stats.get('host_allocations')} allocation(s))",
                     stats.get("host_capacity_bytes")))
    return rows


def _format_ms(seconds: float | None, count: int | None = None) -> str:
    if seconds is None:
        return "-"
    text = f"{seconds * 1e3:.3f}"
    return f"{text} ({count})" if count is not None else text


@dataclass
class ProfileReport:
    """Everything the profiler measured, as of ``VramProfiler.report()``.

    ``nvml_scope`` is ``"process"`` when the NVML figures are this process's own usage,
    ``"device"`` when they are the whole GPU's (see ``notes``), None without NVML. ``switches``
    lists switch events, the first activation included (``old_block`` None); ``total_switches``
    counts changes of block only.
    """

    device: str
    device_name: str
    nvml_available: bool
    nvml_scope: str | None
    nvml_match: str | None
    nvml_unavailable_reason: str | None
    snapshot: MemorySnapshot
    peaks: Peaks
    phases: list[PhaseStats]
    blocks: list[BlockStats]
    switches: list[SwitchEvent]
    total_switches: int
    samples: list[Sample]
    phase_records: list[PhaseRecord]
    current_block: int | None
    sample_interval_s: float | None
    elapsed_s: float
    notes: list[str]
    memory_savings: dict[str, Any] | None = None  # apply_memory_savings' figures, when attached

    # ---------------------------------------------------------------- lookups
    def phase(self, name: str) -> PhaseStats:
        for stats in self.phases:
            if stats.name == name:
                return stats
        raise KeyError(f"no phase {name!r} recorded (have: {[p.name for p in self.phases]})")

    def block(self, index: int) -> BlockStats:
        for stats in self.blocks:
            if stats.index == index:
                return stats
        raise KeyError(f"no block {index} recorded (have: {[b.index for b in self.blocks]})")

    def block_phase_names(self) -> list[str]:
        """The standard phases, then any other phase seen on a block, in first-seen order."""
        names = list(STANDARD_PHASES)
        for block in self.blocks:
            for name in block.phases:
                if name not in names:
                    names.append(name)
        return names

    def block_rows(self) -> list[dict[str, Any]]:
        names = self.block_phase_names()
        return [block.row(self.nvml_scope, names) for block in self.blocks]

    # ------------------------------------------------------------------ dicts
    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (bytes as ints, seconds as floats, None where unknown)."""
        scope = self.nvml_scope
        return {
            "device": {
                "device": self.device,
                "name": self.device_name,
                "nvml_available": self.nvml_available,
                "nvml_match": self.nvml_match,
                "nvml_unavailable_reason": self.nvml_unavailable_reason,
                "total_bytes": self.snapshot.nvml_device_total_bytes,
            },
            "nvml_scope": scope,
            "non_torch_label": NON_TORCH_LABEL,
            "memory": dataclasses.asdict(self.snapshot),
            "peaks": self.peaks.to_dict(scope),
            "phases": [stats.to_dict(scope) for stats in self.phases],
            "blocks": [block.to_dict(scope) for block in self.blocks],
            "current_block": self.current_block,
            "switches": [dataclasses.asdict(event) for event in self.switches],
            "total_switches": self.total_switches,
            "sample_interval_s": self.sample_interval_s,
            "timeline": [dataclasses.asdict(sample) for sample in self.samples],
            "phase_records": [dataclasses.asdict(record) for record in self.phase_records],
            "elapsed_s": self.elapsed_s,
            "notes": list(self.notes),
            "memory_savings": self.memory_savings,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    # ------------------------------------------------------------------ print
    def print(self, console: Any = None) -> None:
        """Print device, phase and block tables with rich."""
        from rich.table import Table

        console = console or make_console()
        snap = self.snapshot
        title = f"Memory: {self.device} ({self.device_name})"
        device_table = Table(title=title, show_header=False)
        device_table.add_column("figure")
        device_table.add_column("value", justify="right")
        rows = [
            ("torch allocated", snap.torch_allocated_bytes),
            ("torch reserved", snap.torch_reserved_bytes),
            ("torch peak allocated (session)", snap.torch_max_allocated_bytes),
            ("torch peak reserved (session)", snap.torch_max_reserved_bytes),
            (f"NVML used (scope: {self.nvml_scope})", snap.nvml_used_bytes),
            ("NVML peak seen", self.peaks.nvml(self.nvml_scope)),
            ("NVML device used", snap.nvml_device_used_bytes),
            ("NVML device total", snap.nvml_device_total_bytes),
            (NON_TORCH_LABEL, snap.non_torch_bytes),
            ("process RSS", snap.rss_bytes),
            ("process peak RSS", snap.peak_rss_bytes),
        ]
        rows += memory_savings_rows(self.memory_savings)
        for label, value in rows:
            if value is not None:
                device_table.add_row(label, value if isinstance(value, str) else format_bytes(value))
        console.print(device_table)

        scope = self.nvml_scope
        if self.phases:
            columns: list[tuple[str, list[Any], Any]] = [
                ("phase", [s.name for s in self.phases], str),
                ("calls", [s.calls for s in self.phases], str),
                ("mean ms", [s.timing.mean_s for s in self.phases], _format_ms),
                ("total s", [s.timing.total_s for s in self.phases], lambda v: f"{v:.3f}"),
                ("peak alloc", [s.peaks.allocated for s in self.phases], format_bytes),
                ("peak rise", [s.peak_delta_bytes for s in self.phases], format_bytes),
                ("peak NVML", [s.peaks.nvml(scope) for s in self.phases], format_bytes),
                ("peak RSS", [s.peaks.rss for s in self.phases], format_bytes),
            ]
            console.print(_table("Phases", columns))
        if self.blocks:
            blocks = self.blocks
            columns = [
                ("block", [b.index for b in blocks], str),
                ("name", [b.name for b in blocks], str),
                ("params", [b.num_params for b in blocks], lambda v: f"{v:,}"),
                ("arena", [b.arena_bytes for b in blocks], format_bytes),
                ("grad", [b.grad_bytes for b in blocks], format_bytes),
                ("active", [b.activations for b in blocks], str),
                ("peak alloc", [b.peaks.allocated for b in blocks], format_bytes),
                ("peak NVML", [b.peaks.nvml(scope) for b in blocks], format_bytes),
                ("peak RSS", [b.peaks.rss for b in blocks] if self.snapshot.torch_allocated_bytes is None
                 else [None] * len(blocks), format_bytes),
            ]
            for name in self.block_phase_names():
                stats = [b.phases.get(name) for b in blocks]
                values = [(s.timing.mean_s, s.calls) if s else None for s in stats]
                columns.append((f"{name} ms (n)", values, lambda v: _format_ms(*v)))
            console.print(_table(f"Blocks ({self.total_switches} switches)", columns))
        for note in self.notes:
            console.print(f"note: {note}")

    # ------------------------------------------------------------------- save
    def save(self, folder: str | os.PathLike[str], plot: bool = True) -> dict[str, Path]:
        """Write JSON, per-block and per-phase CSV, a timeline CSV (when sampled) and a PNG.

        Returns the written paths by kind ("json", "blocks_csv", "phases_csv", "timeline_csv",
        "png").
        """
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {"json": out / JSON_NAME}
        paths["json"].write_text(self.to_json())

        paths["blocks_csv"] = out / BLOCKS_CSV
        block_columns = list(self.block_rows()[0]) if self.blocks else [
            "index", "name", "num_params", "arena_bytes", "grad_bytes", "activations"]
        _write_csv(paths["blocks_csv"], block_columns, self.block_rows())

        paths["phases_csv"] = out / PHASES_CSV
        phase_rows = [stats.to_dict(self.nvml_scope) for stats in self.phases]
        phase_columns = list(phase_rows[0]) if phase_rows else ["name", "calls"]
        _write_csv(paths["phases_csv"], phase_columns, phase_rows)

        if self.samples:
            paths["timeline_csv"] = out / TIMELINE_CSV
            rows = [dataclasses.asdict(sample) for sample in self.samples]
            _write_csv(paths["timeline_csv"], list(rows[0]), rows)

        if plot:
            from .plot import plot_report

            paths["png"] = plot_report(self, out / PLOT_NAME)
        return paths


def _table(title: str, columns: list[tuple[str, list[Any], Any]]) -> Any:
    """A rich table of the columns that have at least one value (None cells print as "-")."""
    from rich.table import Table

    kept = [c for c in columns if any(v is not None for v in c[1])]
    table = Table(title=title)
    for header, _, _ in kept:
        table.add_column(header, justify="left" if header in ("phase", "name") else "right")
    for i in range(len(kept[0][1]) if kept else 0):
        table.add_row(*("-" if values[i] is None else fmt(values[i]) for _, values, fmt in kept))
    return table


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
