"""Records and output of the training-step benchmarks: the environment of a record, plain-JSON
lines, log lines on stderr and tables (thin layers over ``_common``)."""
from __future__ import annotations

import importlib.metadata
import math
import platform
import sys
from typing import Any, Sequence

import torch

import _common

_GIB = float(2**30)


def log(msg: str) -> None:
    """A progress line on stderr (stdout carries a child's result line)."""
    print(msg, file=sys.stderr, flush=True)


def first_line(text: str, limit: int = 400) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:limit]


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
        info.update(device=props.name, total_gib=round(props.total_memory / _GIB, 3))
    return info


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
