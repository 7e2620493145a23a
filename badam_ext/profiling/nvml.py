"""NVML readings for one GPU: device-wide used/total memory and this process's own usage.

NVML sees memory that torch's caching allocator does not (the CUDA context, NCCL buffers, cuBLAS
workspaces, other libraries), so the profiler reports it beside torch's figures.

Device mapping. NVML numbers GPUs in PCI bus order over the whole machine; torch numbers the GPUs
that ``CUDA_VISIBLE_DEVICES`` leaves visible. The NVML device is found, in order:

1. by the UUID torch reports for the device (exact, whatever ``CUDA_DEVICE_ORDER`` is);
2. through ``CUDA_VISIBLE_DEVICES``: an integer list ``"2,3"`` maps torch index 1 to NVML index 3;
   a full UUID entry (``GPU-...``/``MIG-...``) is looked up by UUID. Partial UUIDs, which CUDA
   accepts, cannot be resolved by NVML; like CUDA, parsing stops at the first invalid entry.
   Integer lists assume ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (CUDA's default order, fastest first,
   can differ from NVML's on machines with mixed GPU models).

Per-process usage comes from ``nvmlDeviceGetComputeRunningProcesses`` matched against
``os.getpid()``. Inside containers the list is often empty or holds host-namespace pids; then the
reading falls back to device-wide figures, and ``NvmlReading.scope`` / ``note`` say so.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

logger = logging.getLogger("badam_ext.profiling")

_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Log ``message`` as a warning the first time ``key`` is seen in this process."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    logger.warning(message)


@dataclass(frozen=True)
class NvmlReading:
    """One NVML memory reading, in bytes.

    ``scope`` is ``"process"`` when this process's own usage was found, else ``"device"`` (then
    ``used`` is the whole device's usage, other processes included, and ``note`` says why).
    """

    device_used: int
    device_total: int
    process_used: int | None
    scope: str
    note: str | None

    @property
    def used(self) -> int:
        """The figure of record: this process's usage when known, else the device's."""
        if self.scope == "process" and self.process_used is not None:
            return self.process_used
        return self.device_used


def parse_visible_devices(value: str | None) -> list[int | str] | None:
    """Parse ``CUDA_VISIBLE_DEVICES`` into integers and UUID strings; None when it is unset."""
    if value is None:
        return None
    entries: list[int | str] = []
    for raw in value.split(","):
        item = raw.strip()
        if item.startswith(("GPU-", "MIG-")):
            entries.append(item)
            continue
        try:
            index = int(item)
        except ValueError:
            break  # CUDA ignores everything from the first invalid entry on
        if index < 0:
            break
        entries.append(index)
    return entries


def nvml_target(torch_index: int, visible: str | None = None) -> int | str:
    """NVML index (int) or UUID (str) of torch's ``cuda:torch_index``, from ``CUDA_VISIBLE_DEVICES``.

    ``visible`` defaults to the environment variable.
    """
    if isinstance(torch_index, bool) or not isinstance(torch_index, int) or torch_index < 0:
        raise ValueError(f"torch device index must be an int >= 0, got {torch_index!r}")
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    entries = parse_visible_devices(visible)
    if entries is None:
        return torch_index
    if torch_index >= len(entries):
        raise ValueError(
            f"torch device cuda:{torch_index} is not in CUDA_VISIBLE_DEVICES={visible!r} "
            f"({len(entries)} usable entries)"
        )
    return entries[torch_index]


def _import_pynvml() -> ModuleType:
    return importlib.import_module("pynvml")


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlDevice:
    """An initialised NVML handle for the GPU behind one torch CUDA device."""

    def __init__(self, nvml: ModuleType, handle: Any, torch_index: int, target: int | str,
                 matched_by: str) -> None:
        self._nvml = nvml
        self._handle = handle
        self.torch_index = torch_index
        self.target = target
        self.matched_by = matched_by
        self._closed = False
        try:
            self.name = _decode(nvml.nvmlDeviceGetName(handle))
        except nvml.NVMLError:
            self.name = "unknown"

    @classmethod
    def open(cls, torch_index: int, uuid: str | None = None) -> tuple[NvmlDevice | None, str | None]:
        """Initialise NVML for ``cuda:torch_index``.

        Returns ``(device, None)``, or ``(None, reason)`` when NVML cannot be used (package missing,
        no driver, device not found); the caller decides how to tell the user.
        """
        try:
            nvml = _import_pynvml()
        except ImportError as exc:
            return None, f"nvidia-ml-py (pynvml) is not importable ({exc})"
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            return None, f"nvmlInit failed: {type(exc).__name__}: {exc}"
        try:
            handle, target, matched_by = cls._find_handle(nvml, torch_index, uuid)
        except (nvml.NVMLError, ValueError) as exc:
            nvml.nvmlShutdown()
            return None, f"no NVML device for cuda:{torch_index}: {exc}"
        return cls(nvml, handle, torch_index, target, matched_by), None

    @staticmethod
    def _find_handle(nvml: ModuleType, torch_index: int, uuid: str | None) -> tuple[Any, int | str, str]:
        if uuid:
            for candidate in (uuid, f"GPU-{uuid}"):
                try:
                    return nvml.nvmlDeviceGetHandleByUUID(candidate), candidate, "uuid"
                except nvml.NVMLError:
                    continue
        target = nvml_target(torch_index)
        if isinstance(target, str):
            return nvml.nvmlDeviceGetHandleByUUID(target), target, "CUDA_VISIBLE_DEVICES uuid"
        return nvml.nvmlDeviceGetHandleByIndex(target), target, "CUDA_VISIBLE_DEVICES index"

    def read(self) -> NvmlReading:
        """Read device memory and this process's usage (falls back to device scope, with a note)."""
        if self._closed:
            raise RuntimeError("NvmlDevice.read() after close()")
        nvml = self._nvml
        info = nvml.nvmlDeviceGetMemoryInfo(self._handle)
        process_used, note = self._process_usage()
        scope = "process" if process_used is not None else "device"
        return NvmlReading(int(info.used), int(info.total), process_used, scope, note)

    def _process_usage(self) -> tuple[int | None, str | None]:
        nvml = self._nvml
        try:
            processes = nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except nvml.NVMLError as exc:
            return None, f"process query failed ({type(exc).__name__}): device-wide figures"
        if not processes:
            return None, "NVML process list is empty (common in containers): device-wide figures"
        pid = os.getpid()
        for proc in processes:
            if int(proc.pid) == pid:
                used = getattr(proc, "usedGpuMemory", None)
                if used is None:
                    return None, "driver reports no per-process usage: device-wide figures"
                return int(used), None
        return None, (f"pid {pid} not in NVML's process list (PID namespace of a container?): "
                      "device-wide figures")

    def close(self) -> None:
        """Release this handle's reference on NVML (NVML init/shutdown are reference counted)."""
        if not self._closed:
            self._closed = True
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass


def open_nvml_or_warn(torch_index: int, uuid: str | None = None) -> tuple[NvmlDevice | None, str | None]:
    """``NvmlDevice.open``, logging one line per process when NVML cannot be used."""
    device, reason = NvmlDevice.open(torch_index, uuid)
    if device is None:
        warn_once("nvml", f"VRAM profiler: NVML unavailable ({reason}); reporting torch CUDA "
                          "figures only")
    return device, reason
