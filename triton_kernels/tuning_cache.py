"""The on-disk cache of measured launch configurations (one JSON file, plain Python, no triton).

An entry is keyed by ``device name | compute capability | triton version | kernel | dtype class``
and holds ``block_size`` and ``num_warps`` (and, where measured, ``max_registers``, a cap on
registers per thread, and ``prefetch``, the step's L2 prefetch distance in programs) plus how it
was measured. The file lives in
``$BADAM_EXT_CACHE`` (a directory), else ``$XDG_CACHE_HOME/badam_ext``, else ``~/.cache/badam_ext``.

Readers never fail on a bad file: they warn once and behave as if it were absent. Writers replace
the file atomically, so a reader never sees half a file.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

CACHE_ENV = "BADAM_EXT_CACHE"
FILE_NAME = "launch_configs.json"
FORMAT_VERSION = 1
VALID_WARPS = (1, 2, 4, 8, 16, 32)
MIN_BLOCK, MAX_BLOCK = 64, 1 << 16


class CacheFormatError(ValueError):
    """The cache file exists but is not a launch-configuration cache this version understands."""


@dataclass(frozen=True)
class DeviceKey:
    """What a measurement depends on besides the kernel: the GPU model and the compiler."""

    name: str
    capability: str  # e.g. "sm90"
    triton: str

    def entry_key(self, kernel: str, dtype_class: str) -> str:
        return "|".join((self.name, self.capability, f"triton {self.triton}", kernel, dtype_class))


#: register caps a cache entry may carry (``max_registers``; absent: the compiler's choice)
MIN_REGISTERS, MAX_REGISTERS = 24, 255
#: the largest L2 prefetch distance an entry may carry (``prefetch``, programs ahead; absent: 0)
MAX_PREFETCH = 1 << 20


def valid_max_registers(value: Any) -> bool:
    """Whether ``value`` is a register cap: an int in [MIN_REGISTERS, MAX_REGISTERS]."""
    return not isinstance(value, bool) and isinstance(value, int) and MIN_REGISTERS <= value <= MAX_REGISTERS


def valid_prefetch(value: Any) -> bool:
    """Whether ``value`` is an L2 prefetch distance: an int in [0, MAX_PREFETCH] (programs ahead)."""
    return not isinstance(value, bool) and isinstance(value, int) and 0 <= value <= MAX_PREFETCH


@dataclass(frozen=True)
class CachedConfig:
    block_size: int
    num_warps: int
    max_registers: Optional[int] = None
    prefetch: int = 0


def cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where the cache lives (see the module docstring)."""
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV]).expanduser()
    if environ.get("XDG_CACHE_HOME"):
        return Path(environ["XDG_CACHE_HOME"]).expanduser() / "badam_ext"
    return Path.home() / ".cache" / "badam_ext"


def cache_path(environ: Mapping[str, str] = os.environ) -> Path:
    return cache_dir(environ) / FILE_NAME


def _check_config(key: str, value: Any) -> CachedConfig:
    if not isinstance(value, dict):
        raise CacheFormatError(f"entry {key!r} is not an object")
    block, warps = value.get("block_size"), value.get("num_warps")
    for name, v in (("block_size", block), ("num_warps", warps)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise CacheFormatError(f"entry {key!r}: {name} must be an int, got {v!r}")
    if block < MIN_BLOCK or block > MAX_BLOCK or block & (block - 1):
        raise CacheFormatError(f"entry {key!r}: block_size {block} is not a power of two in [{MIN_BLOCK}, {MAX_BLOCK}]")
    if warps not in VALID_WARPS:
        raise CacheFormatError(f"entry {key!r}: num_warps {warps} is not one of {VALID_WARPS}")
    cap = value.get("max_registers")
    if cap is not None and not valid_max_registers(cap):
        raise CacheFormatError(f"entry {key!r}: max_registers {cap!r} is not an int in [{MIN_REGISTERS}, {MAX_REGISTERS}]")
    prefetch = value.get("prefetch", 0)
    if not valid_prefetch(prefetch):
        raise CacheFormatError(f"entry {key!r}: prefetch {prefetch!r} is not an int in [0, {MAX_PREFETCH}]")
    return CachedConfig(block, warps, cap, prefetch)


def parse(text: str) -> dict[str, CachedConfig]:
    """The entries of a cache file's text; :class:`CacheFormatError` says what is wrong with it."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CacheFormatError(f"not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        raise CacheFormatError('expected an object with an "entries" object')
    if data.get("version") != FORMAT_VERSION:
        raise CacheFormatError(f"format version {data.get('version')!r}, this version reads {FORMAT_VERSION}")
    return {key: _check_config(key, value) for key, value in data["entries"].items()}


def read(path: Path) -> dict[str, CachedConfig]:
    """The entries at ``path``: empty when the file is missing; a warning (and empty) when it is invalid."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        warnings.warn(f"badam_ext: cannot read the launch-configuration cache {path} ({exc}); using defaults",
                      RuntimeWarning, stacklevel=3)
        return {}
    try:
        return parse(text)
    except CacheFormatError as exc:
        warnings.warn(f"badam_ext: ignoring the launch-configuration cache {path}: {exc}. Re-run "
                      f"`python -m badam_ext.kernels.tune` to rewrite it, or delete it.",
                      RuntimeWarning, stacklevel=3)
        return {}


def write(path: Path, entries: Mapping[str, Mapping[str, Any]]) -> None:
    """Merge ``entries`` (key -> {block_size, num_warps, ...measurement fields}) into the file at ``path``.

    An existing invalid file is replaced (with a warning); entries of other keys are kept.
    """
    for key, value in entries.items():
        _check_config(key, dict(value))
    existing: dict[str, Any] = {}
    if path.exists():
        try:
            parse(path.read_text())
            existing = json.loads(path.read_text())["entries"]
        except (CacheFormatError, OSError) as exc:
            warnings.warn(f"badam_ext: replacing the invalid launch-configuration cache {path}: {exc}",
                          RuntimeWarning, stacklevel=2)
    existing.update({k: dict(v) for k, v in entries.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".launch_configs.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump({"version": FORMAT_VERSION, "entries": existing}, fh, indent=1, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def lookup(entries: Mapping[str, CachedConfig], device: DeviceKey, kernel: str, dtype_class: str
           ) -> Optional[CachedConfig]:
    return entries.get(device.entry_key(kernel, dtype_class))
