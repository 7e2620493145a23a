"""Launch configuration: interpreter detection, elements per program and warps per program, per device."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ContextManager, Iterator, Optional

import torch
import triton
import triton.language as tl

from . import tuning_cache

try:  # the interpreter's function class; present in every supported triton
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # pragma: no cover - defensive, triton without an interpreter
    _InterpretedFunction = ()


@triton.jit
def _probe(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr))


def interpreted() -> bool:
    """True when this module's kernels run in the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return isinstance(_probe, _InterpretedFunction) if _InterpretedFunction else False


#: inside kernels: compiled to PTX for a GPU, so CUDA intrinsics and inline PTX are there (the
#: interpreter takes the other branch, which computes what the torch twin does)
GPU_BUILD = tl.constexpr(not interpreted())


# GPU: 2048 elements per program at 8 warps (8 elements per thread, two 16-byte fp32 vectors per
# stream) ran the Llama-3-8B layer step at 98% of the H100's copy bandwidth; 4096 at 8 warps
# (16 per thread, 158 registers, one program per SM) reached 93%. Other GPUs differ (on an H200
# the flat AdamW probe peaks at 1024 / 4 warps and the 2048 / 8 step reaches 92.5%), so a
# configuration measured on the device (``python -m badam_ext.kernels.tune``, cached on disk)
# wins over this default. Interpreter: the cost is per program (~4-5 ms), so programs are made large.
GPU_BLOCK_SIZE = 2048
INTERPRETER_BLOCK_SIZE = 16384
MIN_BLOCK_SIZE = 64
MAX_BLOCK_SIZE = 1 << 16

#: kernels with a launch configuration of their own; the step's block size sets the chunk tables
#: (BlockTables), the other kernels reuse those tables and tune only their warps. The step over
#: 8-bit moments has its own entry: bound by instructions rather than bytes, it prefers other
#: programs than the fp32 step (on the H200 a quantization block per one-warp program).
FUSED_STEP, BLOCK_LOAD, GRAD_SQ_NORM = "fused_adamw", "block_load", "grad_sq_norm"
FUSED_STEP_8BIT = "fused_adamw_8bit"
KERNELS = (FUSED_STEP, BLOCK_LOAD, GRAD_SQ_NORM, FUSED_STEP_8BIT)
#: the step kernel of each state format (``BlockAdam(states=...)``)
STEP_KERNELS = {"fp32": FUSED_STEP, "8bit": FUSED_STEP_8BIT}
#: ``BLOCKxWARPS`` (e.g. ``1024x4``) for every kernel, without a register cap or a prefetch, or ``builtin``
#: to ignore the cache
LAUNCH_ENV = "BADAM_EXT_LAUNCH"


@dataclass(frozen=True)
class LaunchConfig:
    """Elements per program and warps per program of one kernel on one device."""

    block_size: int
    num_warps: int
    source: str = field(default="builtin", compare=False)  # builtin | cache | env | override | interpreter
    #: cap on registers per thread (Triton's ``maxnreg``), None: the compiler's choice. Trades spills
    #: for occupancy: the 8-bit step, latency-bound on its table gathers, runs faster at 64 on an H200.
    max_registers: Optional[int] = None
    #: the step's L2 prefetch distance in programs (``cp.async.bulk.prefetch``; 0: none): each program
    #: asks for the bytes of the program this many chunks ahead, so a step whose programs hold too few
    #: loads in flight finds them in L2 (the 8-bit step on an H200). sm_90 and later only.
    prefetch: int = 0


#: the bulk-copy prefetch (``cp.async.bulk.prefetch.L2``) needs this compute capability (Hopper)
L2_PREFETCH_MIN_CAPABILITY = 90


# Configurations measured on a device model (name substring), per kernel, used when the cache has
# none; a kernel without an entry of its own takes the device's FUSED_STEP entry.
MEASURED: dict[str, dict[str, LaunchConfig]] = {
    "H100": {FUSED_STEP: LaunchConfig(2048, 8, "builtin")},  # fused step 98.2%, block load 94.6% of copy bandwidth
    "H200": {
        # three runs (2026-12-02): fused step 96.2-96.6%, block load 93.0-93.9% of copy bandwidth
        # (2048 x 8: 92.5%, 91%); the tuner's cache can still refine it per kernel. The step at
        # 97.7% with its loads cached in L2 only (2026-12-03). No L2 prefetch: 1024 programs ahead
        # ran 1.474 ms against 1.462, 2048 ahead 1.753 (2026-12-04)
        FUSED_STEP: LaunchConfig(512, 4, "builtin"),
        # the 8-bit step (2026-12-02): 1.398 ms at 256 x 1 against 1.655 at 512 x 2 and 1.815 at 512 x 4;
        # 64 registers (a few spills, 32 one-warp programs per SM instead of 20): 1.174 ms, against
        # 1.252 at 80, 1.202 at 56, 1.297 at 48. With the codebook read by inline PTX (2026-12-03):
        # 0.996 ms at 256 x 1 / 64, against 1.069 at 80, 1.159 at 96; 1.096 at 512 x 2 / 64. With fewer
        # instructions (2026-12-03, round 9): 0.981 ms at 64, against 0.982 at 72, 1.036 at 56, 1.023 at 80.
        # An L2 prefetch 2048 programs ahead (2026-12-04, round 11): 0.949-0.954 ms against 0.966-0.968
        # without; 1024-3584 ahead within 0.3%, 512: 0.959, 6144: 0.991, 12288: 1.215 (L2 evicts the
        # lines before their programs run). With it, 72 registers: 0.933 ms against 0.953 at 64 and
        # 0.992 at 56 (one sweep; 0.936 against 0.965-0.977 at 64, 0.970 at 80, 1.004 at 96 in round 12).
        # With the streams' loads L2-only (round 12): 0.914 ms at 64 and 1024 ahead, against 0.917 at 2048,
        # 0.927 at 4096, 0.955 without; 72: 0.929-0.932; 80: 0.966-0.970. With the weight stored before
        # the encoders: 0.873-0.877 ms at 64, against 0.915 at 72
        FUSED_STEP_8BIT: LaunchConfig(256, 1, "builtin", max_registers=64, prefetch=1024),
        # the block load over the 8-bit step's 256-element chunks, 8 chunks a program (2026-12-03, round
        # 10): 0.435 ms (94.1%) at one warp, against 0.447 at 2, 0.446 at 4, 0.444 at 8. Over the fp32
        # step's 512-element tables the block size differs and the heuristic's 4 warps apply (0.757 ms,
        # 94.2%, against 0.759 at 1 and 0.771 at 2)
        BLOCK_LOAD: LaunchConfig(256, 1, "builtin"),
    },
}

_overrides: list[LaunchConfig] = []
_cache_entries: dict[Path, dict[str, tuning_cache.CachedConfig]] = {}


def heuristic_num_warps(block_size: int) -> int:
    """8 elements per thread (256 per warp), clamped to [4, 16]: the configuration before tuning."""
    return max(4, min(16, block_size // 256))


def dtype_class(dtype: Optional[torch.dtype]) -> str:
    """``"16bit"`` or ``"32bit"`` weights (a step's bytes per element differ); None means 16-bit."""
    if dtype is None:
        return "16bit"
    return f"{8 * dtype.itemsize}bit"


@functools.lru_cache(maxsize=None)
def _device_key(index: int) -> tuning_cache.DeviceKey:
    major, minor = torch.cuda.get_device_capability(index)
    return tuning_cache.DeviceKey(torch.cuda.get_device_name(index), f"sm{major}{minor}", triton.__version__)


def device_key(device: torch.device) -> tuning_cache.DeviceKey:
    """GPU name, compute capability and triton version of a CUDA device (the cache key's device part)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_key(index)


def parse_launch_env(text: str) -> Optional[LaunchConfig]:
    """The value of ``$BADAM_EXT_LAUNCH``: ``BLOCKxWARPS``, or ``builtin`` (None: skip the cache)."""
    text = text.strip().lower()
    if text == "builtin":
        return None
    try:
        block_text, warps_text = text.split("x")
        block, warps = int(block_text), int(warps_text)
        check_block_size(block)
        if warps not in tuning_cache.VALID_WARPS:
            raise ValueError(f"warps must be one of {tuning_cache.VALID_WARPS}")
    except ValueError as exc:
        raise ValueError(f"{LAUNCH_ENV}={text!r}: expected BLOCKxWARPS such as 1024x4 (block a power of two in "
                         f"[{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}]) or 'builtin' ({exc})") from None
    return LaunchConfig(block, warps, "env")


def _cached(device: torch.device, kernel: str, dtype: Optional[torch.dtype]) -> Optional[LaunchConfig]:
    path = tuning_cache.cache_path()
    if path not in _cache_entries:
        _cache_entries[path] = tuning_cache.read(path)
    found = tuning_cache.lookup(_cache_entries[path], device_key(device), kernel, dtype_class(dtype))
    if found is None:
        return None
    return LaunchConfig(found.block_size, found.num_warps, "cache", found.max_registers, found.prefetch)


def _measured(device: torch.device, kernel: str) -> Optional[LaunchConfig]:
    """The :data:`MEASURED` entry of ``kernel`` itself on this device model, if any."""
    name = device_key(device).name
    for fragment, configs in MEASURED.items():
        if fragment in name:
            return configs.get(kernel)
    return None


def _builtin(device: torch.device) -> LaunchConfig:
    """The device model's FUSED_STEP entry, else the H100 default."""
    return _measured(device, FUSED_STEP) or LaunchConfig(GPU_BLOCK_SIZE, heuristic_num_warps(GPU_BLOCK_SIZE), "builtin")


def launch_config(device: torch.device, kernel: str = FUSED_STEP, dtype: Optional[torch.dtype] = None
                  ) -> LaunchConfig:
    """The launch configuration of ``kernel`` for weights of ``dtype`` on ``device``.

    Interpreter or CPU: large programs, as always. CUDA, first match wins: an :func:`override`
    in effect, ``$BADAM_EXT_LAUNCH`` (``BLOCKxWARPS``: no register cap, no prefetch; ``builtin``: the kernel's
    own :data:`MEASURED` entry, else the fp32 step's), the on-disk cache written by the tuner, the
    kernel's own :data:`MEASURED` entry, then the fp32 step's :data:`MEASURED` entry (the 8-bit step
    first takes the fp32 step's cache entry, for its block and warps only), the H100 default.
    Nothing is measured here: tuning is an explicit run of the tuner.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    device = torch.device(device)
    if interpreted() or device.type != "cuda":
        return LaunchConfig(INTERPRETER_BLOCK_SIZE, heuristic_num_warps(INTERPRETER_BLOCK_SIZE), "interpreter")
    if _overrides:
        return _overrides[-1]
    env = os.environ.get(LAUNCH_ENV, "")
    if env:
        from_env = parse_launch_env(env)
        if from_env is not None:
            return from_env
        return _measured(device, kernel) or _borrowed(kernel, _builtin(device))
    own = _cached(device, kernel, dtype) or _measured(device, kernel)
    if own is not None:
        return own
    if kernel == FUSED_STEP_8BIT:  # the chunk size of the fp32 step's tables, if tuned
        return _borrowed(kernel, _cached(device, FUSED_STEP, dtype) or _builtin(device))
    return _builtin(device)


def _borrowed(kernel: str, config: LaunchConfig) -> LaunchConfig:
    """The fp32 step's ``config`` lent to ``kernel``: a register cap and a prefetch distance belong to
    the kernel they were measured for, so the 8-bit step takes the shape only."""
    if kernel == FUSED_STEP_8BIT:
        return dataclasses.replace(config, max_registers=None, prefetch=0)
    return config


def default_block_size(device: torch.device, kernel: str = FUSED_STEP, dtype: Optional[torch.dtype] = None) -> int:
    """Elements per program for ``device`` (large in the interpreter, the measured or default one on a GPU)."""
    return launch_config(device, kernel, dtype).block_size


def check_block_size(block_size: int) -> int:
    """Validate a user block size: a power of two in [64, 65536]."""
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise ValueError(
            f"block_size must be a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}], got {block_size}"
        )
    return block_size


def _config_of_shape(block_size: int, num_warps: int, device: torch.device, kernel: str,
                     dtype: Optional[torch.dtype]) -> Optional[LaunchConfig]:
    """``kernel``'s configuration on a GPU when it is ``block_size`` x ``num_warps``, else None: a
    register cap or a prefetch distance is measured for one shape of program."""
    if interpreted() or torch.device(device).type != "cuda":
        return None
    config = launch_config(device, kernel, dtype)
    return config if (config.block_size, config.num_warps) == (block_size, num_warps) else None


def default_max_registers(block_size: int, num_warps: int, device: torch.device, kernel: str = FUSED_STEP,
                          dtype: Optional[torch.dtype] = None) -> Optional[int]:
    """The configured register cap of ``kernel`` when its configuration is ``block_size`` x ``num_warps``,
    else None."""
    config = _config_of_shape(block_size, num_warps, device, kernel, dtype)
    return None if config is None else config.max_registers


def supports_l2_prefetch(device: torch.device) -> bool:
    """Whether the step may prefetch into L2 on ``device``: a GPU of compute capability 9.0 or later,
    or the interpreter (where the prefetch is a no-op, so its code path can be tested on the CPU)."""
    device = torch.device(device)
    if interpreted() or device.type != "cuda":
        return True
    return int(device_key(device).capability.removeprefix("sm")) >= L2_PREFETCH_MIN_CAPABILITY


def default_prefetch(block_size: int, num_warps: int, device: torch.device, kernel: str = FUSED_STEP,
                     dtype: Optional[torch.dtype] = None) -> int:
    """The configured L2 prefetch distance of ``kernel`` (programs ahead) when its configuration is
    ``block_size`` x ``num_warps``, else 0 (none); always 0 off a GPU and before sm_90."""
    config = _config_of_shape(block_size, num_warps, device, kernel, dtype)
    return config.prefetch if config is not None and supports_l2_prefetch(device) else 0


def default_num_warps(block_size: int, device: Optional[torch.device] = None, kernel: str = FUSED_STEP,
                      dtype: Optional[torch.dtype] = None) -> int:
    """Warps per program for programs of ``block_size`` elements.

    On a GPU (``device``, or the current CUDA device when None) the configured warps when its
    configured block size is ``block_size``; otherwise 8 elements per thread, clamped to [4, 16].
    """
    if not interpreted() and (device is not None or torch.cuda.is_available()):
        device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        if device.type == "cuda":
            config = launch_config(device, kernel, dtype)
            if config.block_size == block_size:
                return config.num_warps
    return heuristic_num_warps(block_size)


@contextlib.contextmanager
def override(block_size: int, num_warps: int, max_registers: Optional[int] = None, prefetch: int = 0
             ) -> Iterator[LaunchConfig]:
    """Every CUDA lookup in this process returns ``block_size`` / ``num_warps`` inside the block (the
    tuner's sweep); ``max_registers`` then caps every fused step compiled for that shape, and
    ``prefetch`` is their L2 prefetch distance."""
    check_block_size(block_size)
    if num_warps not in tuning_cache.VALID_WARPS:
        raise ValueError(f"num_warps must be one of {tuning_cache.VALID_WARPS}, got {num_warps}")
    if max_registers is not None and not tuning_cache.valid_max_registers(max_registers):
        raise ValueError(f"max_registers must be in [{tuning_cache.MIN_REGISTERS}, {tuning_cache.MAX_REGISTERS}], "
                         f"got {max_registers}")
    check_prefetch(prefetch)
    config = LaunchConfig(block_size, num_warps, "override", max_registers, prefetch)
    _overrides.append(config)
    try:
        yield config
    finally:
        _overrides.remove(config)


def check_prefetch(prefetch: int) -> int:
    """Validate an L2 prefetch distance: an int in [0, tuning_cache.MAX_PREFETCH]."""
    if not tuning_cache.valid_prefetch(prefetch):
        raise ValueError(f"prefetch must be an int in [0, {tuning_cache.MAX_PREFETCH}] (programs ahead; 0: none), "
                         f"got {prefetch!r}")
    return prefetch


def reload_cache() -> None:
    """Forget the cache file's entries read so far (the next lookup reads the file again)."""
    _cache_entries.clear()


def device_guard(device: torch.device) -> ContextManager:
    """Make ``device`` current for a launch (Triton launches on the current CUDA device)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def check_launch_device(device: torch.device) -> None:
    """Fail clearly where a Triton launch cannot work: CPU without the interpreter, CUDA inside it."""
    if device.type == "cuda":
        if interpreted():
            raise RuntimeError(
                "the Triton kernels were imported with TRITON_INTERPRET=1, which runs them on the host: "
                "CUDA tensors cannot be used there (their pointers are device addresses). Unset "
                "TRITON_INTERPRET for CUDA tensors, or use CPU tensors in the interpreter."
            )
        return
    if device.type == "cpu":
        if not interpreted():
            raise RuntimeError(
                "the Triton kernels need a CUDA device; for CPU tensors set TRITON_INTERPRET=1 in the "
                "environment before triton is first imported (it runs the kernels in Triton's interpreter), "
                "or use the torch backend (badam_ext.ops.get_backend('torch', device))."
            )
        return
    raise RuntimeError(f"the Triton kernels support CUDA (and CPU in the interpreter), not {device.type!r} tensors")
