"""VramProfiler: time and memory per phase and per block of a block-wise optimizer run.

Usage::

    prof = VramProfiler()                    # device from attach(), or cuda:current, or CPU
    prof.attach(optimizer)                   # switches are marked automatically (see below)
    for batch in loader:
        with prof.phase("forward"):
            loss = model(**batch).loss
        with prof.phase("backward"):
            loss.backward()
        with prof.phase("step"):
            optimizer.step()
    prof.report().save("vram_profile")       # JSON, CSV and PNG; .print() for tables

Phases. A phase is attributed to the block active when it starts; a phase named ``"switch"`` is
attributed to the block that became active during it (the block being loaded). On CUDA each phase
resets torch's peak counters at its start (``torch.cuda.reset_peak_memory_stats``) and reads the
allocator's peak at its end (no sync); nested phases are handled, but other code that reads torch's
peak counters sees them reset. Durations come from CUDA events resolved lazily (completed events
are collected without waiting; ``report()`` waits for the rest), so the hot loop never syncs unless
``sync=True``. On other devices durations come from ``time.perf_counter``. Host cost per phase:
about 0.1 ms on CUDA, plus about 0.1 ms for the NVML reading (``nvml_every_phase=False`` skips it).

Switch-hook protocol (duck-typed; ``attach`` uses it when the optimizer, or a wrapper's
``.optimizer``, has it)::

    handle = optimizer.add_switch_hook(hook)
    # hook(old_index: int | None, new_index: int, info: dict) is called after each switch;
    # info holds "name", "num_params", "arena_bytes", "grad_bytes" (missing keys are fine).
    # The optimizer should call hook(None, current_index, info) at registration when a block is
    # already active, so the profiler knows the first block. `handle.remove()`, when the returned
    # object has it, unregisters the hook (used by VramProfiler.detach).

Host timestamps (timeline, switch marks) are taken when the host issues the work; with
asynchronous CUDA they can run ahead of the GPU.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch

from .memory import (
    TorchCudaStats,
    build_snapshot,
    peak_process_rss,
    process_rss,
    read_torch_cuda,
    resolve_device,
)
from .nvml import NvmlDevice, NvmlReading, open_nvml_or_warn, warn_once
from .report import ProfileReport
from .sampler import Sampler
from .stats import BlockStats, PhaseRecord, PhaseStats, Peaks, Sample, SwitchEvent

# Beyond this many unresolved CUDA phase timings, the oldest are resolved by waiting on them.
_MAX_PENDING = 10_000
_BLOCK_INFO_KEYS = ("name", "num_params", "arena_bytes", "grad_bytes")


@dataclass
class _Frame:
    name: str
    block: int | None
    start_s: float
    start_event: Any
    allocated_start: int | None
    peak_allocated: int | None
    peak_reserved: int | None


def _check_index(index: Any) -> int:
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"block index must be an int, got {type(index).__name__}")
    if index < 0:
        raise ValueError(f"block index must be >= 0, got {index}")
    return index


def _check_count(label: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{label} must be an int or None, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{label} must be >= 0, got {value}")
    return value


def _check_positive_int(label: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{label} must be an int >= 1, got {value!r}")
    return value


class VramProfiler:
    """Records time and memory per phase and per block; ``report()`` summarises.

    Args:
        device: what to profile: a device, ``"cuda:1"``, a CUDA index, a module or an optimizer.
            None: the device of the optimizer given to ``attach``, else the current CUDA device,
            else CPU.
        sample_interval_s: when set, a background thread samples memory at this interval into a
            timeline (started on first use or by ``start()``, ended by ``stop()``).
        max_samples: timeline samples kept (the oldest are dropped).
        max_phase_records: per-call phase records kept for the JSON report and the plot.
        sync: synchronize the device at phase boundaries (exact host-side figures, slower).
        use_nvml: read NVML on CUDA devices.
        nvml_every_phase: read NVML at every phase end (per-block NVML peaks without a sampler).
    """

    def __init__(self, device: Any = None, sample_interval_s: float | None = None, *,
                 max_samples: int = 100_000, max_phase_records: int = 100_000,
                 sync: bool = False, use_nvml: bool = True, nvml_every_phase: bool = True) -> None:
        self._device: torch.device | None = resolve_device(device) if device is not None else None
        self._device_explicit = device is not None
        self._sampler = Sampler(self._sample, sample_interval_s) if sample_interval_s is not None else None
        self.sample_interval_s = sample_interval_s
        self.sync = bool(sync)
        self.use_nvml = bool(use_nvml)
        self.nvml_every_phase = bool(nvml_every_phase)
        max_samples = _check_positive_int("max_samples", max_samples)
        max_phase_records = _check_positive_int("max_phase_records", max_phase_records)

        self._t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._started = False
        self._closed = False
        self._nvml: NvmlDevice | None = None
        self._nvml_reason: str | None = None
        self._last_nvml: NvmlReading | None = None
        self._scopes_seen: set[str] = set()
        self._notes: list[str] = []
        self._memory_savings: Any = None

        self._current_block: int | None = None
        self._blocks: dict[int, BlockStats] = {}
        self._phases: dict[str, PhaseStats] = {}
        self._peaks = Peaks()
        self._open: list[_Frame] = []
        self._pending: deque[tuple[Any, Any, PhaseRecord, PhaseStats, PhaseStats | None]] = deque()
        self._switches: deque[SwitchEvent] = deque(maxlen=max_phase_records)
        self._switch_count = 0
        self._event_count = 0
        self._samples: deque[Sample] = deque(maxlen=max_samples)
        self._sample_count = 0
        self._records: deque[PhaseRecord] = deque(maxlen=max_phase_records)
        self._hook_handles: list[Any] = []
        self._attached: list[int] = []

    # ----------------------------------------------------------------- setup
    @property
    def device(self) -> torch.device:
        """The profiled device (fixed at the first measurement)."""
        self._ensure_started()
        assert self._device is not None
        return self._device

    @property
    def current_block(self) -> int | None:
        return self._current_block

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    def _ensure_started(self) -> None:
        if self._started:
            return
        if self._closed:
            raise RuntimeError("VramProfiler used after close()")
        if self._device is None:
            self._device = resolve_device(None)
        device = self._device
        if device.type != "cuda":
            why = "CUDA is not available" if not torch.cuda.is_available() else f"profiling {device}"
            warn_once("no-cuda", f"VRAM profiler: {why}; no NVML or torch CUDA figures, reporting "
                                 "process RSS (host memory) only")
        if device.type == "cuda":
            if self.use_nvml:
                self._open_nvml(device)
            else:
                self._notes.append("NVML disabled (use_nvml=False): torch CUDA figures only")
        else:
            self._notes.append(f"device {device}: no torch allocator statistics; figures are the "
                               "process RSS (psutil) and its peak")
        self._started = True

    def _open_nvml(self, device: torch.device) -> None:
        uuid = None
        try:
            uuid = str(torch.cuda.get_device_properties(device).uuid)
        except (AttributeError, RuntimeError):
            pass  # older torch without .uuid: map through CUDA_VISIBLE_DEVICES instead
        self._nvml, self._nvml_reason = open_nvml_or_warn(device.index, uuid)
        if self._nvml is None:
            self._notes.append(f"NVML unavailable: {self._nvml_reason}")

    def attach(self, optimizer: Any) -> bool:
        """Take the device from ``optimizer`` (unless given explicitly) and register a switch hook.

        Returns True when the optimizer (or a wrapper's ``.optimizer``) has ``add_switch_hook``.
        Attaching the same optimizer twice does nothing the second time.
        """
        if not self._device_explicit and not self._started:
            try:
                self._device = resolve_device(optimizer)
            except (TypeError, ValueError):
                pass  # no parameters to look at: keep the default device
        target = optimizer
        for _ in range(4):
            if target is None or callable(getattr(target, "add_switch_hook", None)):
                break
            target = getattr(target, "optimizer", None)
        if target is None or not callable(getattr(target, "add_switch_hook", None)):
            return False
        if id(target) in self._attached:
            return True
        self._attached.append(id(target))
        handle = target.add_switch_hook(self._on_switch)
        if handle is not None and callable(getattr(handle, "remove", None)):
            self._hook_handles.append(handle)
        return True

    def attach_memory_savings(self, savings: Any) -> None:
        """Report what ``badam_ext.apply_memory_savings`` did: bytes offloaded, the loss working set."""
        if not callable(getattr(savings, "stats", None)):
            raise TypeError(f"expected the handle apply_memory_savings returns, got {type(savings).__name__}")
        self._memory_savings = savings

    def detach(self) -> None:
        """Remove the switch hooks registered by ``attach`` (where the optimizer returned handles)."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        self._attached.clear()

    def _on_switch(self, old_index: int | None, new_index: int, info: Mapping[str, Any] | None) -> None:
        if info is not None and not isinstance(info, Mapping):
            raise TypeError(f"switch hook info must be a mapping, got {type(info).__name__}")
        meta = {k: info[k] for k in _BLOCK_INFO_KEYS if info and info.get(k) is not None}
        self.mark_switch(new_index, **meta)

    def start(self) -> VramProfiler:
        """Fix the device, open NVML and start the sampler (when configured)."""
        self._ensure_started()
        if self._sampler is not None:
            self._sampler.start()
        return self

    def stop(self) -> None:
        """Stop and join the sampler thread; the recorded data stays."""
        if self._sampler is not None:
            self._sampler.stop()

    def close(self) -> None:
        """Stop sampling, remove hooks and release NVML."""
        self.stop()
        self.detach()
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None
        self._closed = True

    def __enter__(self) -> VramProfiler:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---------------------------------------------------------------- blocks
    def describe_block(self, index: int, *, name: str | None = None, num_params: int | None = None,
                       arena_bytes: int | None = None, grad_bytes: int | None = None) -> None:
        """Set a block's description without making it active."""
        index = _check_index(index)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"block name must be a str, got {type(name).__name__}")
        num_params = _check_count("num_params", num_params)
        arena_bytes = _check_count("arena_bytes", arena_bytes)
        grad_bytes = _check_count("grad_bytes", grad_bytes)
        with self._lock:
            block = self._block(index)
            if name is not None:
                block.name = name
            if num_params is not None:
                block.num_params = num_params
            if arena_bytes is not None:
                block.arena_bytes = arena_bytes
            if grad_bytes is not None:
                block.grad_bytes = grad_bytes

    def set_block(self, index: int, **info: Any) -> None:
        """Describe block ``index`` and make it active; a change of block is marked as a switch."""
        self.describe_block(index, **info)
        if index != self._current_block:
            self.mark_switch(index)

    def mark_switch(self, new_index: int, **info: Any) -> None:
        """Mark a switch to block ``new_index`` (always recorded, even to the same block)."""
        self.describe_block(new_index, **info)
        self._ensure_started()
        self._maybe_start_sampler()
        now = self._now()
        with self._lock:
            self._block(new_index).activations += 1
            self._switches.append(SwitchEvent(now, self._current_block, new_index))
            self._event_count += 1
            if self._current_block is not None:  # the first activation is not a switch
                self._switch_count += 1
            self._current_block = new_index

    def _block(self, index: int) -> BlockStats:
        block = self._blocks.get(index)
        if block is None:
            block = self._blocks[index] = BlockStats(index)
        return block

    # ---------------------------------------------------------------- phases
    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time and measure the enclosed code as phase ``name``."""
        self.begin(name)
        try:
            yield
        finally:
            self.end(name)

    def begin(self, name: str) -> None:
        """Open phase ``name`` (for callers that cannot use ``with phase(...)``)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"phase name must be a non-empty str, got {name!r}")
        self._ensure_started()
        self._maybe_start_sampler()
        device = self._device
        start_event = None
        allocated = None
        if device.type == "cuda":
            if self.sync:
                torch.cuda.synchronize(device)
            allocated = self._fold_cuda_peaks().allocated
            torch.cuda.reset_peak_memory_stats(device)
            start_event = torch.cuda.Event(enable_timing=True)
            start_event.record(torch.cuda.current_stream(device))
        self._open.append(_Frame(name, self._current_block, 0.0, start_event, allocated,
                                 allocated, None))
        self._open[-1].start_s = self._now()  # last, so profiler overhead stays outside the phase

    def end(self, name: str | None = None) -> None:
        """Close the innermost open phase (``name``, when given, must match it)."""
        end_s = self._now()
        if not self._open:
            raise RuntimeError(f"end({name!r}) without an open phase")
        frame = self._open[-1]
        if name is not None and name != frame.name:
            raise RuntimeError(f"end({name!r}) but the innermost open phase is {frame.name!r}")
        device = self._device
        end_event = None
        if device.type == "cuda":
            end_event = torch.cuda.Event(enable_timing=True)
            end_event.record(torch.cuda.current_stream(device))
            if self.sync:
                torch.cuda.synchronize(device)
        cuda = self._fold_cuda_peaks()
        self._open.pop()
        allocated_end = cuda.allocated if cuda is not None else None
        nvml = self._read_nvml() if self.nvml_every_phase else None
        rss = process_rss() if device.type != "cuda" else None

        block = frame.block
        if frame.name == "switch" and self._current_block is not None:
            block = self._current_block  # the block loaded by this switch
        peak_delta = None
        if frame.peak_allocated is not None and frame.allocated_start is not None:
            peak_delta = frame.peak_allocated - frame.allocated_start
        record = PhaseRecord(frame.name, block, frame.start_s, end_s, frame.allocated_start,
                             allocated_end, frame.peak_allocated, nvml.used if nvml else None, rss)
        observed = dict(allocated=frame.peak_allocated, reserved=frame.peak_reserved,
                        nvml_process=nvml.process_used if nvml else None,
                        nvml_device=nvml.device_used if nvml else None, rss=rss)
        with self._lock:
            stats = self._phases.get(frame.name)
            if stats is None:
                stats = self._phases[frame.name] = PhaseStats(frame.name)
            targets = [stats]
            block_stats = None
            if block is not None:
                owner = self._block(block)
                owner.peaks.observe(**observed)
                block_stats = owner.phase(frame.name)
                targets.append(block_stats)
            for target in targets:
                target.calls += 1
                target.peaks.observe(**observed)
                target.observe_delta(peak_delta)
            self._peaks.observe(**observed)
            self._records.append(record)
            if end_event is None:
                record.duration_s = end_s - frame.start_s
                for target in targets:
                    target.timing.add(record.duration_s)
            else:
                self._pending.append((frame.start_event, end_event, record, stats, block_stats))
        if end_event is not None:
            self._resolve_pending(wait=self.sync)

    def _fold_cuda_peaks(self) -> TorchCudaStats | None:
        """Read torch's allocator stats and fold its peak counters into every open phase and the
        session peak (call before each reset). None on non-CUDA devices."""
        device = self._device
        if device is None or device.type != "cuda":
            return None
        cuda = read_torch_cuda(device)
        for frame in self._open:
            frame.peak_allocated = max(frame.peak_allocated or 0, cuda.max_allocated)
            frame.peak_reserved = max(frame.peak_reserved or 0, cuda.max_reserved)
        with self._lock:
            self._peaks.observe(allocated=cuda.max_allocated, reserved=cuda.max_reserved)
        return cuda

    def _resolve_pending(self, wait: bool) -> None:
        """Turn recorded CUDA event pairs into durations: completed ones always, all when ``wait``."""
        while self._pending:
            start_event, end_event, record, stats, block_stats = self._pending[0]
            if not (wait or len(self._pending) > _MAX_PENDING or end_event.query()):
                return
            end_event.synchronize()
            seconds = start_event.elapsed_time(end_event) / 1000.0
            self._pending.popleft()
            with self._lock:
                record.duration_s = seconds
                stats.timing.add(seconds)
                if block_stats is not None:
                    block_stats.timing.add(seconds)

    # --------------------------------------------------------------- readings
    def _read_nvml(self) -> NvmlReading | None:
        nvml = self._nvml
        if nvml is None:
            return None
        try:
            reading = nvml.read()
        except Exception as exc:  # noqa: BLE001 - NVML errors must not stop training
            warn_once("nvml-read", f"VRAM profiler: NVML read failed ({type(exc).__name__}: {exc}); "
                                   "NVML figures are missing from here on")
            self._nvml = None
            self._notes.append(f"NVML read failed mid-run: {type(exc).__name__}: {exc}")
            return None
        self._last_nvml = reading
        self._scopes_seen.add(reading.scope)
        return reading

    def _maybe_start_sampler(self) -> None:
        if self._sampler is not None and not self._sampler.running and not self._closed:
            self._sampler.start()

    def _sample(self) -> None:
        device = self._device
        now = self._now()
        block = self._current_block
        allocated = reserved = None
        cuda = read_torch_cuda(device)
        if cuda is not None:
            allocated, reserved = cuda.allocated, cuda.reserved
        nvml = self._read_nvml()
        rss = process_rss()
        sample = Sample(now, block, allocated, reserved, nvml.used if nvml else None,
                        nvml.device_used if nvml else None, rss)
        observed = dict(allocated=allocated, reserved=reserved,
                        nvml_process=nvml.process_used if nvml else None,
                        nvml_device=nvml.device_used if nvml else None, rss=rss)
        with self._lock:
            self._samples.append(sample)
            self._sample_count += 1
            self._peaks.observe(**observed)
            if block is not None:
                self._block(block).peaks.observe(**observed)

    def sample_now(self) -> None:
        """Take one timeline sample on the calling thread."""
        self._ensure_started()
        self._sample()

    # ----------------------------------------------------------------- report
    def report(self) -> ProfileReport:
        """Wait for pending CUDA timings, take a final snapshot and return the summary.

        The profiler keeps recording afterwards; the report is an independent copy.
        """
        self._ensure_started()
        self._resolve_pending(wait=True)
        device = self._device
        cuda = self._fold_cuda_peaks()
        nvml = self._read_nvml()
        rss = process_rss()
        peak_rss = max(rss, peak_process_rss() or 0)  # ru_maxrss can lag the current RSS
        with self._lock:
            self._peaks.observe(rss=peak_rss,
                                nvml_process=nvml.process_used if nvml else None,
                                nvml_device=nvml.device_used if nvml else None)
            if cuda is not None:
                # torch's counters restart at every phase: report the session's peaks instead.
                cuda = dataclasses.replace(cuda, max_allocated=self._peaks.allocated or cuda.max_allocated,
                                           max_reserved=self._peaks.reserved or cuda.max_reserved)
            snapshot = build_snapshot(self._now(), device, cuda, nvml, rss, peak_rss)
            notes = list(self._notes)
            if self._open:
                notes.append(f"phases still open at report time (not counted): "
                             f"{[frame.name for frame in self._open]}")
            if nvml is not None and nvml.note:
                notes.append(f"NVML scope is device-wide: {nvml.note}")
            if len(self._scopes_seen) > 1:
                notes.append("NVML scope changed during the run (the process appears in NVML's list "
                             "only once its CUDA context exists); peaks use the final scope where "
                             "available")
            if self._event_count > len(self._switches):
                notes.append(f"only the last {len(self._switches)} of {self._event_count} switch events kept")
            if self._sample_count > len(self._samples):
                notes.append(f"only the last {len(self._samples)} of {self._sample_count} samples kept")
            return ProfileReport(
                device=str(device),
                device_name=self._device_name(device),
                nvml_available=self._nvml is not None,
                nvml_scope=nvml.scope if nvml else None,
                nvml_match=(f"{self._nvml.matched_by}: {self._nvml.target}" if self._nvml else None),
                nvml_unavailable_reason=self._nvml_reason,
                snapshot=snapshot,
                peaks=copy.deepcopy(self._peaks),
                phases=copy.deepcopy(list(self._phases.values())),
                blocks=copy.deepcopy([self._blocks[i] for i in sorted(self._blocks)]),
                switches=list(self._switches),
                total_switches=self._switch_count,
                samples=list(self._samples),
                phase_records=copy.deepcopy(list(self._records)),
                current_block=self._current_block,
                sample_interval_s=self.sample_interval_s,
                elapsed_s=self._now(),
                notes=notes,
                memory_savings=None if self._memory_savings is None else dict(self._memory_savings.stats()),
            )

    def _device_name(self, device: torch.device) -> str:
        if self._nvml is not None:
            return self._nvml.name
        if device.type == "cuda":
            return torch.cuda.get_device_name(device)
        return device.type

