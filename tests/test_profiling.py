"""Tests of badam_ext.profiling: phases, per-block attribution, NVML paths, outputs, HF callback."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from badam_ext.profiling import (
    NON_TORCH_LABEL,
    NvmlDevice,
    VramProfiler,
    format_bytes,
    nvml_target,
    resolve_device,
)
from badam_ext.profiling import nvml as nvml_mod
from badam_ext.profiling.memory import TorchCudaStats, build_snapshot
from badam_ext.profiling.nvml import NvmlReading, open_nvml_or_warn, parse_visible_devices
from badam_ext.profiling.sampler import Sampler

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MiB = 1024**2


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees the one-line warnings as if for the first time."""
    monkeypatch.setattr(nvml_mod, "_WARNED", set())


def _train_iteration(prof: VramProfiler, model: torch.nn.Module, opt: torch.optim.Optimizer,
                     gen: torch.Generator) -> None:
    x = torch.randn(7, 13, generator=gen)
    with prof.phase("forward"):
        loss = model(x).square().mean()
    with prof.phase("backward"):
        loss.backward()
    with prof.phase("step"):
        opt.step()
        opt.zero_grad()


def _tiny() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Generator]:
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 11), torch.nn.GELU(), torch.nn.Linear(11, 5))
    return model, torch.optim.SGD(model.parameters(), lr=0.01), gen


# --------------------------------------------------------------------- phases and attribution
def test_phases_attributed_per_block_on_cpu() -> None:
    model, opt, gen = _tiny()
    prof = VramProfiler(device="cpu")
    prof.set_block(0, name="layer0", num_params=156, arena_bytes=4096, grad_bytes=1024)
    for _ in range(3):
        _train_iteration(prof, model, opt, gen)
    prof.mark_switch(1, name="layer1", num_params=60, arena_bytes=2048)
    for _ in range(2):
        _train_iteration(prof, model, opt, gen)
    prof.set_block(0)  # back to block 0: a second activation
    _train_iteration(prof, model, opt, gen)
    prof.set_block(0)  # same block: no new switch
    report = prof.report()

    assert report.total_switches == 2
    assert [(e.old_block, e.new_block) for e in report.switches] == [(None, 0), (0, 1), (1, 0)]
    b0, b1 = report.block(0), report.block(1)
    assert (b0.name, b0.num_params, b0.arena_bytes, b0.grad_bytes) == ("layer0", 156, 4096, 1024)
    assert (b1.name, b1.num_params, b1.arena_bytes, b1.grad_bytes) == ("layer1", 60, 2048, None)
    assert (b0.activations, b1.activations) == (2, 1)
    for name in ("forward", "backward", "step"):
        assert b0.phases[name].calls == 4 and b1.phases[name].calls == 2
        phase = report.phase(name)
        assert phase.calls == 6 == phase.timing.count
        # per-block times add up to the phase's total
        block_total = b0.phases[name].timing.total_s + b1.phases[name].timing.total_s
        assert math.isclose(block_total, phase.timing.total_s, rel_tol=1e-12)
        assert phase.timing.min_s > 0 and phase.timing.max_s >= phase.timing.mean_s >= phase.timing.min_s
        assert phase.peaks.allocated is None  # no allocator statistics on CPU
        assert phase.peaks.rss is not None and phase.peaks.rss > 0
    assert "switch" not in b0.phases
    blocks_in_order = [r.block for r in report.phase_records if r.name == "step"]
    assert blocks_in_order == [0, 0, 0, 1, 1, 0]
    assert report.current_block == 0
    rows = {row["index"]: row for row in report.block_rows()}
    assert rows[0]["step_count"] == 4 and rows[1]["forward_count"] == 2 and rows[1]["switch_count"] == 0
    assert rows[0]["step_mean_s"] == pytest.approx(b0.phases["step"].timing.mean_s)


def test_switch_phase_goes_to_incoming_block_and_nesting() -> None:
    prof = VramProfiler(device="cpu")
    prof.set_block(3)
    with prof.phase("step"):
        with prof.phase("switch"):
            prof.mark_switch(4, name="next")
    with prof.phase("forward"):
        pass
    report = prof.report()
    assert report.block(4).phases["switch"].calls == 1
    assert "switch" not in report.block(3).phases
    # the step started on block 3, so it stays there although block 4 became active inside it
    assert report.block(3).phases["step"].calls == 1
    assert report.block(4).phases["forward"].calls == 1
    outer = report.phase("step").timing.total_s
    inner = report.phase("switch").timing.total_s
    assert outer >= inner > 0


def test_phase_without_block_counts_globally_only() -> None:
    prof = VramProfiler(device="cpu")
    with prof.phase("forward"):
        pass
    report = prof.report()
    assert report.phase("forward").calls == 1
    assert report.blocks == []


def test_bad_inputs_raise_clear_errors() -> None:
    prof = VramProfiler(device="cpu")
    with pytest.raises(ValueError, match="phase name"):
        prof.begin("")
    with pytest.raises(RuntimeError, match="without an open phase"):
        prof.end("forward")
    prof.begin("forward")
    with pytest.raises(RuntimeError, match="innermost open phase is 'forward'"):
        prof.end("backward")
    prof.end("forward")
    with pytest.raises(TypeError, match="block index must be an int"):
        prof.set_block("0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block index must be >= 0"):
        prof.mark_switch(-1)
    with pytest.raises(ValueError, match="arena_bytes must be >= 0"):
        prof.describe_block(0, arena_bytes=-5)
    with pytest.raises(TypeError, match="num_params must be an int"):
        prof.describe_block(0, num_params=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        prof.set_block(0, colour="red")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="sample_interval_s must be > 0"):
        VramProfiler(device="cpu", sample_interval_s=0)
    with pytest.raises(ValueError, match="max_samples"):
        VramProfiler(device="cpu", max_samples=0)
    with pytest.raises(TypeError, match="device must be"):
        VramProfiler(device=3.5)
    closed = VramProfiler(device="cpu")
    closed.close()
    with pytest.raises(RuntimeError, match="after close"):
        closed.begin("forward")


def test_phase_records_exception_and_still_closes() -> None:
    prof = VramProfiler(device="cpu")
    with pytest.raises(ZeroDivisionError):
        with prof.phase("forward"):
            1 / 0
    assert prof.report().phase("forward").calls == 1
    prof.begin("backward")  # the stack is clean: a new phase opens and closes normally
    prof.end()


def test_resolve_device() -> None:
    model, opt, _ = _tiny()
    assert resolve_device(model) == torch.device("cpu")
    assert resolve_device(opt) == torch.device("cpu")
    assert resolve_device(types.SimpleNamespace(optimizer=opt)) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="no parameters or buffers"):
        resolve_device(torch.nn.ReLU())
    with pytest.raises(TypeError, match="got bool"):
        resolve_device(True)
    with pytest.raises(TypeError, match="got list"):
        resolve_device([1])


def test_format_bytes() -> None:
    assert format_bytes(None) == "n/a"
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * MiB // 2) == "1.50 MiB"
    assert format_bytes(-2 * 1024**3) == "-2.00 GiB"
    assert format_bytes(5 * 1024**4) == "5120.00 GiB"


# ------------------------------------------------------------------------------ degradation
def test_cpu_degradation_warns_once_and_reports_rss(caplog: pytest.LogCaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    caplog.set_level(logging.WARNING, logger="badam_ext.profiling")
    for _ in range(2):
        prof = VramProfiler()  # no device given, no CUDA: CPU
        with prof.phase("forward"):
            torch.ones(1000).sum()
        report = prof.report()
    lines = [r for r in caplog.records if r.name == "badam_ext.profiling"]
    assert len(lines) == 1 and "CUDA is not available" in lines[0].getMessage()
    assert report.device == "cpu" and not report.nvml_available and report.nvml_scope is None
    assert report.snapshot.rss_bytes > 0
    assert report.snapshot.peak_rss_bytes >= report.snapshot.rss_bytes
    assert report.snapshot.torch_allocated_bytes is None and report.snapshot.non_torch_bytes is None
    assert report.peaks.rss >= report.snapshot.rss_bytes
    assert any("process RSS" in note for note in report.notes)


@pytest.mark.parametrize("failure", ["missing", "library_not_found"])
def test_nvml_unavailable_warns_once(failure: str, caplog: pytest.LogCaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    if failure == "missing":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
        expected = "not importable"
    else:
        import pynvml

        def fail() -> None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

        monkeypatch.setattr(pynvml, "nvmlInit", fail)
        expected = "NVMLError_LibraryNotFound"
    caplog.set_level(logging.WARNING, logger="badam_ext.profiling")
    for _ in range(3):
        device, reason = open_nvml_or_warn(0)
        assert device is None and expected in reason
    lines = [r.getMessage() for r in caplog.records if r.name == "badam_ext.profiling"]
    assert len(lines) == 1 and "NVML unavailable" in lines[0] and expected in lines[0]


# ------------------------------------------------------------------------------ mocked NVML
class _FakeNvml(types.ModuleType):
    """A stand-in for pynvml with one 80 GiB GPU per index and a configurable process list."""

    class NVMLError(Exception):
        pass

    def __init__(self, processes: Any = (), uuids: tuple[str, ...] = ()) -> None:
        super().__init__("pynvml")
        self.processes = processes
        self.uuids = uuids
        self.init_calls = 0
        self.shutdown_calls = 0
        self.opened: list[Any] = []

    def nvmlInit(self) -> None:
        self.init_calls += 1

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> tuple[str, int]:
        self.opened.append(index)
        return ("index", index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> tuple[str, str]:
        if uuid not in self.uuids:
            raise self.NVMLError(f"no device {uuid}")
        self.opened.append(uuid)
        return ("uuid", uuid)

    def nvmlDeviceGetName(self, handle: Any) -> bytes:
        return b"Fake GPU"

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        return types.SimpleNamespace(used=30 * 1024**3, total=80 * 1024**3, free=50 * 1024**3)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> Any:
        if isinstance(self.processes, Exception):
            raise self.processes
        return list(self.processes)


def _proc(pid: int, used: int | None) -> Any:
    return types.SimpleNamespace(pid=pid, usedGpuMemory=used)


def _open_fake(monkeypatch: pytest.MonkeyPatch, fake: _FakeNvml, index: int = 0,
               uuid: str | None = None, visible: str | None = None) -> NvmlDevice:
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    device, reason = NvmlDevice.open(index, uuid)
    assert device is not None, reason
    return device


def test_nvml_process_found(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeNvml([_proc(os.getpid() + 1, 5 * MiB), _proc(os.getpid(), 700 * MiB)])
    device = _open_fake(monkeypatch, fake)
    reading = device.read()
    assert reading.scope == "process" and reading.note is None
    assert reading.process_used == 700 * MiB and reading.used == 700 * MiB
    assert reading.device_used == 30 * 1024**3 and reading.device_total == 80 * 1024**3
    assert device.name == "Fake GPU"
    device.close()
    device.close()
    assert (fake.init_calls, fake.shutdown_calls) == (1, 1)
    with pytest.raises(RuntimeError, match="after close"):
        device.read()


@pytest.mark.parametrize("processes, note", [
    ([], "empty"),
    ([_proc(1, 5 * MiB)], "not in NVML's process list"),
    ([_proc(os.getpid(), None)], "no per-process usage"),
    (_FakeNvml.NVMLError("not supported"), "process query failed"),
])
def test_nvml_falls_back_to_device_scope(monkeypatch: pytest.MonkeyPatch, processes: Any,
                                         note: str) -> None:
    if isinstance(processes, list) and processes and processes[0].pid == 1 and os.getpid() == 1:
        pytest.skip("this process is pid 1")
    device = _open_fake(monkeypatch, _FakeNvml(processes))
    reading = device.read()
    assert reading.scope == "device" and note in reading.note
    assert reading.process_used is None and reading.used == reading.device_used == 30 * 1024**3


def test_nvml_device_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeNvml(uuids=("GPU-aaaa", "GPU-bbbb", "GPU-1234-torch"))
    assert _open_fake(monkeypatch, fake, index=1).target == 1  # no CUDA_VISIBLE_DEVICES
    mapped = _open_fake(monkeypatch, fake, index=1, visible="3, 2")
    assert (mapped.target, mapped.matched_by) == (2, "CUDA_VISIBLE_DEVICES index")
    by_uuid = _open_fake(monkeypatch, fake, index=1, visible="GPU-aaaa,GPU-bbbb")
    assert (by_uuid.target, by_uuid.matched_by) == ("GPU-bbbb", "CUDA_VISIBLE_DEVICES uuid")
    # torch's own UUID (without the "GPU-" prefix) wins over the environment
    torch_uuid = _open_fake(monkeypatch, fake, index=0, uuid="1234-torch", visible="3,2")
    assert (torch_uuid.target, torch_uuid.matched_by) == ("GPU-1234-torch", "uuid")
    assert fake.opened == [1, 2, "GPU-bbbb", "GPU-1234-torch"]
    # an index past CUDA_VISIBLE_DEVICES: no device, a reason, and NVML shut down again
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    device, reason = NvmlDevice.open(2)
    assert device is None and "not in CUDA_VISIBLE_DEVICES" in reason
    assert fake.shutdown_calls == 1


def test_parse_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_visible_devices(None) is None
    assert parse_visible_devices("") == []
    assert parse_visible_devices("0, 2,x,3") == [0, 2]  # CUDA stops at the first invalid entry
    assert parse_visible_devices("1,-1,0") == [1]
    assert parse_visible_devices("GPU-ab-cd,MIG-ef") == ["GPU-ab-cd", "MIG-ef"]
    assert nvml_target(1, "5,7") == 7
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert nvml_target(3) == 3  # unset: torch's index is NVML's
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert nvml_target(1) == 6
    with pytest.raises(ValueError, match="not in CUDA_VISIBLE_DEVICES"):
        nvml_target(2, "5,7")
    with pytest.raises(ValueError, match="index must be an int"):
        nvml_target(-1, "0")


def test_snapshot_gap_between_nvml_and_torch_reserved() -> None:
    cuda = TorchCudaStats(allocated=1000 * MiB, reserved=1200 * MiB, max_allocated=1100 * MiB,
                          max_reserved=1300 * MiB)
    process = NvmlReading(device_used=9000 * MiB, device_total=80_000 * MiB, process_used=1700 * MiB,
                          scope="process", note=None)
    snap = build_snapshot(1.0, torch.device("cpu"), cuda, process, rss=123, peak_rss=456)
    assert snap.nvml_used_bytes == 1700 * MiB and snap.non_torch_bytes == 500 * MiB
    assert snap.nvml_scope == "process" and snap.torch_max_reserved_bytes == 1300 * MiB
    device_wide = NvmlReading(9000 * MiB, 80_000 * MiB, None, "device", "empty list")
    snap = build_snapshot(1.0, torch.device("cpu"), cuda, device_wide, rss=123, peak_rss=None)
    assert snap.nvml_used_bytes == 9000 * MiB and snap.non_torch_bytes == 7800 * MiB
    assert build_snapshot(0.0, torch.device("cpu"), None, device_wide, 1, None).non_torch_bytes is None
    assert NON_TORCH_LABEL.startswith("non-torch: CUDA context, NCCL")


def test_report_carries_nvml_scope_and_block_peaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML figures flow into blocks, peaks, notes and JSON (fake NVML on a CPU profiler)."""
    fake = _FakeNvml([])
    prof = VramProfiler(device="cpu")
    prof.start()
    prof._nvml = _open_fake(monkeypatch, fake)  # device-wide first: the process is not listed yet
    prof.set_block(0)
    with prof.phase("forward"):
        pass
    fake.processes = [_proc(os.getpid(), 640 * MiB)]
    prof.set_block(1)
    with prof.phase("forward"):
        pass
    report = prof.report()
    assert report.nvml_scope == "process"
    assert report.block(0).peaks.nvml_process is None
    assert report.block(0).peaks.nvml("process") == 30 * 1024**3  # only device figures seen
    assert report.block(1).peaks.nvml("process") == 640 * MiB
    assert report.snapshot.nvml_process_used_bytes == 640 * MiB
    assert any("scope changed" in note for note in report.notes)
    data = json.loads(report.to_json())
    assert data["nvml_scope"] == "process"
    assert data["blocks"][1]["peak_nvml_bytes"] == 640 * MiB
    assert data["blocks"][0]["peak_nvml_device_bytes"] == 30 * 1024**3


# --------------------------------------------------------------------------------- outputs
def _profiled_report(sample_interval_s: float | None) -> Any:
    model, opt, gen = _tiny()
    prof = VramProfiler(device="cpu", sample_interval_s=sample_interval_s)
    for block in range(3):
        prof.set_block(block, name=f"layer{block}", num_params=100 + block,
                       arena_bytes=(block + 1) * 4096, grad_bytes=1024)
        for _ in range(2):
            _train_iteration(prof, model, opt, gen)
    if sample_interval_s is not None:
        prof.sample_now()  # at least one sample however slow the machine is
    prof.stop()
    return prof.report()


@pytest.mark.parametrize("sampled", [False, True])
def test_save_writes_parseable_json_csv_png(tmp_path: Path, sampled: bool) -> None:
    report = _profiled_report(0.001 if sampled else None)
    paths = report.save(tmp_path / "out")

    data = json.loads(paths["json"].read_text())
    assert data["device"]["device"] == "cpu" and data["total_switches"] == 2
    assert [b["index"] for b in data["blocks"]] == [0, 1, 2]
    assert data["blocks"][2]["arena_bytes"] == 3 * 4096
    assert data["blocks"][1]["phases"]["step"]["calls"] == 2
    assert {p["name"]: p["calls"] for p in data["phases"]} == {"forward": 6, "backward": 6, "step": 6}
    assert data["memory"]["rss_bytes"] > 0 and data["non_torch_label"] == NON_TORCH_LABEL
    assert len(data["phase_records"]) == 18

    with paths["blocks_csv"].open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["index"]) for r in rows] == [0, 1, 2]
    assert [int(r["forward_count"]) for r in rows] == [2, 2, 2]
    assert [int(r["arena_bytes"]) for r in rows] == [4096, 8192, 12288]
    assert float(rows[0]["step_mean_s"]) == pytest.approx(report.block(0).phases["step"].timing.mean_s)
    assert rows[0]["switch_mean_s"] == "" and rows[0]["name"] == "layer0"
    with paths["phases_csv"].open(newline="") as handle:
        assert {r["name"] for r in csv.DictReader(handle)} == {"forward", "backward", "step"}

    if sampled:
        with paths["timeline_csv"].open(newline="") as handle:
            timeline = list(csv.DictReader(handle))
        assert len(timeline) == len(report.samples) >= 1
        assert all(int(r["rss_bytes"]) > 0 for r in timeline)
        assert len(data["timeline"]) == len(timeline)
    else:
        assert "timeline_csv" not in paths and not (tmp_path / "out" / "vram_timeline.csv").exists()

    png = paths["png"].read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 1000


def test_save_with_nothing_recorded(tmp_path: Path) -> None:
    report = VramProfiler(device="cpu").report()
    paths = report.save(tmp_path)
    assert json.loads(paths["json"].read_text())["blocks"] == []
    with paths["blocks_csv"].open(newline="") as handle:
        assert list(csv.DictReader(handle)) == []
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC


def test_print_tables() -> None:
    from rich.console import Console

    report = _profiled_report(None)
    console = Console(record=True, width=200)
    report.print(console)
    text = console.export_text()
    assert "Blocks (2 switches)" in text and "layer2" in text and "forward ms (n)" in text
    assert "12.00 KiB" in text  # block 2's arena
    assert "process RSS" in text


# --------------------------------------------------------------------------------- sampler
def _wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_sampler_thread_collects_and_stops() -> None:
    prof = VramProfiler(device="cpu", sample_interval_s=0.001, max_samples=5)
    prof.set_block(2)  # starts the sampler
    _wait_for(lambda: prof._sample_count >= 12)
    prof.stop()
    assert not any(t.name == "vram-profiler-sampler" and t.is_alive() for t in threading.enumerate())
    count = prof._sample_count
    time.sleep(0.02)
    assert prof._sample_count == count  # stopped for good
    report = prof.report()
    assert len(report.samples) == 5  # capped: the last five kept
    assert all(s.block == 2 and s.rss_bytes > 0 and s.allocated_bytes is None for s in report.samples)
    times = [s.time_s for s in report.samples]
    assert times == sorted(times)
    assert any("only the last 5" in note for note in report.notes)
    assert report.block(2).peaks.rss is not None


def test_sampler_survives_failing_reads(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def flaky() -> None:
        calls.append(1)
        raise OSError("read failed")

    caplog.set_level(logging.WARNING, logger="badam_ext.profiling")
    sampler = Sampler(flaky, 0.001)
    sampler.start()
    _wait_for(lambda: len(calls) >= 3)
    sampler.stop()
    assert not sampler.running
    assert sum("a sample failed" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(TypeError, match="must be a number"):
        Sampler(flaky, "1")  # type: ignore[arg-type]


# ------------------------------------------------------------------ switch hooks (protocol)
class _Handle:
    def __init__(self, hooks: list[Any], hook: Any) -> None:
        self._hooks, self._hook = hooks, hook

    def remove(self) -> None:
        self._hooks.remove(self._hook)


class _SwitchingSGD(torch.optim.SGD):
    """SGD over "blocks" (one per param tensor group) that switches every ``every`` steps."""

    def __init__(self, params: Any, num_blocks: int, every: int, lr: float = 0.01) -> None:
        super().__init__(params, lr=lr)
        self.num_blocks, self.every = num_blocks, every
        self.active, self.steps = 0, 0
        self.hooks: list[Any] = []

    def _info(self, index: int) -> dict[str, Any]:
        return {"name": f"block{index}", "num_params": 10 * (index + 1),
                "arena_bytes": 1000 * (index + 1), "grad_bytes": 400}

    def add_switch_hook(self, hook: Any) -> _Handle:
        self.hooks.append(hook)
        hook(None, self.active, self._info(self.active))
        return _Handle(self.hooks, hook)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        out = super().step(closure)
        self.steps += 1
        if self.steps % self.every == 0:
            old, self.active = self.active, (self.active + 1) % self.num_blocks
            for hook in list(self.hooks):
                hook(old, self.active, self._info(self.active))
        return out


def test_attach_marks_switches_through_hook() -> None:
    model, _, gen = _tiny()
    opt = _SwitchingSGD(model.parameters(), num_blocks=2, every=3)
    prof = VramProfiler()
    assert prof.attach(opt) is True
    assert prof.attach(types.SimpleNamespace(optimizer=opt)) is True  # wrapper: no second hook
    assert len(opt.hooks) == 1
    for _ in range(7):
        _train_iteration(prof, model, opt, gen)
    report = prof.report()
    assert report.device == "cpu"  # taken from the optimizer
    assert [(e.old_block, e.new_block) for e in report.switches] == [(None, 0), (0, 1), (1, 0)]
    assert report.total_switches == 2
    b0, b1 = report.block(0), report.block(1)
    assert (b0.phases["step"].calls, b1.phases["step"].calls) == (4, 3)
    assert (b1.name, b1.num_params, b1.arena_bytes, b1.grad_bytes) == ("block1", 20, 2000, 400)
    prof.detach()
    assert opt.hooks == []
    for _ in range(3):
        _train_iteration(prof, model, opt, gen)
    assert prof.report().total_switches == 2  # no longer notified
    assert VramProfiler(device="cpu").attach(torch.optim.SGD(model.parameters(), lr=0.1)) is False


# ------------------------------------------------------------------------ HF Trainer callback
def test_hf_callback_with_tiny_llama(tmp_path: Path) -> None:
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from badam_ext.profiling import VramProfilerCallback

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (12, 9), generator=gen)
    dataset = [{"input_ids": row, "labels": row.clone()} for row in ids]
    opt = _SwitchingSGD(model.parameters(), num_blocks=2, every=2)
    prof = VramProfiler(sample_interval_s=0.01)
    callback = VramProfilerCallback(prof, print_report=False)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=5, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, optimizers=(opt, None),
                      callbacks=[callback])
    trainer.train()

    report = callback.report
    assert report is not None and report.device == "cpu"
    assert report.phase("train_step").calls == 5 == report.phase("train_step").timing.count
    assert [(e.old_block, e.new_block) for e in report.switches] == [(None, 0), (0, 1), (1, 0)]
    assert report.block(0).phases["train_step"].calls == 3  # steps 1, 2 and 5
    assert report.block(1).phases["train_step"].calls == 2
    assert not prof._sampler.running
    folder = tmp_path / "run" / "vram_profile"
    assert callback.saved["json"] == folder / "vram_report.json"
    data = json.loads((folder / "vram_report.json").read_text())
    assert data["phases"][0]["name"] == "train_step" and data["total_switches"] == 2
    assert (folder / "vram_report.png").read_bytes()[:8] == PNG_MAGIC
    with (folder / "vram_blocks.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["train_step_count"]) for r in rows] == [3, 2]


# ---------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_and_nvml_figures(tmp_path: Path) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    size = 256 * MiB
    prof = VramProfiler(device=device, sample_interval_s=0.005)
    prof.set_block(0, name="alloc", arena_bytes=size)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    with prof.phase("outer"):
        with prof.phase("alloc"):
            x = torch.empty(size, dtype=torch.uint8, device=device)
            x.fill_(1)
        with prof.phase("free"):
            y = torch.empty(size // 2, dtype=torch.uint8, device=device)
            del y
    prof.sample_now()
    report = prof.report()
    prof.close()

    snap = report.snapshot
    assert snap.torch_allocated_bytes - before >= size
    assert report.phase("alloc").peak_delta_bytes >= size
    # the outer phase's peak covers the inner ones although each inner phase reset the counters
    assert report.phase("outer").peaks.allocated >= before + size + size // 2
    assert report.phase("outer").timing.count == 1 and report.phase("outer").timing.total_s > 0
    assert snap.torch_max_allocated_bytes >= before + size + size // 2
    assert report.block(0).peaks.allocated >= before + size + size // 2
    if report.nvml_available:
        assert report.nvml_scope in ("process", "device")
        assert snap.nvml_used_bytes >= snap.torch_reserved_bytes
        assert snap.non_torch_bytes == snap.nvml_used_bytes - snap.torch_reserved_bytes
        assert snap.nvml_device_total_bytes >= snap.nvml_device_used_bytes > 0
        assert report.block(0).peaks.nvml(report.nvml_scope) >= size
    else:
        pytest.fail(f"NVML unavailable on a CUDA machine: {report.nvml_unavailable_reason}")
    assert report.samples and all(s.allocated_bytes is not None for s in report.samples)
    paths = report.save(tmp_path)
    assert json.loads(paths["json"].read_text())["memory"]["torch_allocated_bytes"] >= size
    del x
