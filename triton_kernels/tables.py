"""Per-switch launch tables of one launch group: weight pointers, arena offsets, numels, decay flags
and the chunk map (program id -> tensor, chunk), plus the per-step gradient pointer table."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton.language as tl

from ..contract import (
    check_decay,
    check_grads,
    check_offsets,
    check_weights,
)
from ..states.spec import check_states
from .launch_config import (
    BLOCK_LOAD,
    FUSED_STEP,
    GRAD_SQ_NORM,
    STEP_KERNELS,
    check_block_size,
    check_launch_device,
    check_prefetch,
    default_block_size,
    default_max_registers,
    default_num_warps,
    default_prefetch,
    supports_l2_prefetch,
)

#: weight / gradient dtypes the kernels accept, with their Triton element types
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
#: a base address divisible by this many bytes allows 16-byte vector loads and stores
VECTOR_BYTES = 16

# meta table columns (int64 [n, 4])
META_WEIGHT, META_OFFSET, META_NUMEL, META_DECAY = range(4)
META_COLS = 4


def _h2d(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor, without a host sync (pinned buffer, async copy)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype)
    host = torch.tensor(values, dtype=dtype, pin_memory=True)
    return host.to(device, non_blocking=True)


def _chunk_table(counts: torch.Tensor, total: int) -> torch.Tensor:
    """int32 ``[total, 2]``: (tensor index, chunk index within the tensor) per program, built on the
    counts' device (``output_size`` spares repeat_interleave a host sync)."""
    tensors = torch.arange(counts.numel(), device=counts.device)
    tensor_index = torch.repeat_interleave(tensors, counts, output_size=total)
    first_chunk = torch.cumsum(counts, 0) - counts
    chunk_index = torch.arange(total, device=counts.device) - first_chunk[tensor_index]
    return torch.stack([tensor_index, chunk_index], dim=1).to(torch.int32)


def _aligned(ptrs: Sequence[int]) -> bool:
    return all(p % VECTOR_BYTES == 0 for p in ptrs)


def align_hint(aligned: bool, dtype: torch.dtype, vector_elems: int = 4) -> int:
    """Byte divisibility a kernel may assume for a table pointer: ``vector_elems`` elements, <= 16 B.

    Kernels that mix fp32 and 16-bit streams use 4 elements for both, so every access shares one
    register layout: 8-element 16-bit vectors would force layout conversions through shared memory.
    """
    if not aligned:
        return 0
    return min(VECTOR_BYTES, vector_elems * dtype.itemsize)


class BlockTables:
    """Launch tables of one launch group (one param group, one weight dtype); build once per switch.

    Device tensors: ``meta`` (int64 ``[n, 4]``: weight address, arena offset, numel, decay flag) and
    ``chunks`` (int32 ``[num_chunks, 2]``: tensor index, chunk index within that tensor). The tables
    keep the weights alive; gradient addresses are gathered per step by :meth:`grad_pointers`.
    """

    def __init__(
        self,
        weights: tuple[torch.Tensor, ...],
        offsets: tuple[int, ...],
        decay: tuple[bool, ...],
        block_size: int,
        num_warps: int,
        meta: torch.Tensor,
        chunks: torch.Tensor,
        kernel_warps: Optional[dict[str, int]] = None,
        step_max_registers: Optional[int] = None,
        step_prefetch: int = 0,
    ) -> None:
        self.weights = weights
        self.offsets = offsets
        self.decay = decay
        self.numels = tuple(w.numel() for w in weights)
        self.shapes = tuple(w.shape for w in weights)
        self.device = weights[0].device
        self.dtype = weights[0].dtype
        self.block_size = block_size
        # kernel name -> warps per program; the step's is ``num_warps``, the others default to it
        self.kernel_warps = {FUSED_STEP: num_warps, **(kernel_warps or {})}
        #: register cap of the step's compilation (None: the compiler's choice)
        self.step_max_registers = step_max_registers
        self._step_prefetch = 0
        self.step_prefetch = step_prefetch
        self.meta = meta
        self.chunks = chunks
        self.span = max(o + n for o, n in zip(offsets, self.numels))
        self.weights_aligned = _aligned([w.data_ptr() for w in weights])
        self._grad_key: Optional[tuple[int, ...]] = None
        self._grad_table: Optional[torch.Tensor] = None

    @classmethod
    def build(
        cls,
        weights: Sequence[torch.Tensor],
        offsets: Sequence[int],
        decay: Sequence[bool],
        block_size: Optional[int] = None,
        min_block_size: int = 1,
        states: str = "fp32",
    ) -> "BlockTables":
        """Tables for ``weights`` stored at arena ``offsets`` (elements), decayed where ``decay`` is true.

        ``min_block_size`` raises the configured block size to at least that (a power of two): 8-bit
        moments need programs of whole quantization blocks. ``states`` names the format whose step
        these tables launch (``"fp32"`` or ``"8bit"``): each has its own launch configuration.
        """
        step_kernel = STEP_KERNELS[check_states(states)]
        weights = tuple(weights)
        device, _ = check_weights(weights)
        check_launch_device(device)
        numels = [w.numel() for w in weights]
        offs = check_offsets(offsets, numels)
        decay = check_decay(decay, len(weights))
        dtype = weights[0].dtype
        block = (check_block_size(block_size) if block_size is not None
                 else default_block_size(device, step_kernel, dtype))
        block = max(block, check_block_size(min_block_size) if min_block_size > 1 else 1)

        counts = [-(-n // block) for n in numels]
        if max(counts) >= 2**31:
            raise ValueError(f"a tensor of {max(numels)} elements needs more than 2^31 chunks of {block}")
        meta_rows: list[int] = []
        for w, off, n, d in zip(weights, offs, numels, decay):
            meta_rows += [w.data_ptr(), off, n, int(d)]
        meta = _h2d(meta_rows, torch.int64, device).view(len(weights), META_COLS)
        chunk_table = _chunk_table(_h2d(counts, torch.int64, device), sum(counts))
        # The step's block size sets the chunks every kernel shares; each kernel its own warps for it.
        warps = {k: default_num_warps(block, device, k, dtype) for k in (BLOCK_LOAD, GRAD_SQ_NORM)}
        warps[FUSED_STEP] = default_num_warps(block, device, step_kernel, dtype)
        cap = default_max_registers(block, warps[FUSED_STEP], device, step_kernel, dtype)
        prefetch = default_prefetch(block, warps[FUSED_STEP], device, step_kernel, dtype)
        return cls(weights, offs, decay, block, warps[FUSED_STEP], meta, chunk_table, kernel_warps=warps,
                   step_max_registers=cap, step_prefetch=prefetch)

    @property
    def step_prefetch(self) -> int:
        """The step's L2 prefetch distance in programs (0: none; see ``LaunchConfig.prefetch``)."""
        return self._step_prefetch

    @step_prefetch.setter
    def step_prefetch(self, value: int) -> None:
        check_prefetch(value)
        if value and not supports_l2_prefetch(self.device):
            raise ValueError(f"an L2 prefetch (step_prefetch={value}) needs a GPU of compute capability 9.0 or "
                             f"later (cp.async.bulk.prefetch); {self.device} is not one: use 0")
        self._step_prefetch = value

    def warps_for(self, kernel: str) -> int:
        """Warps per program of ``kernel`` (a name of ``launch_config.KERNELS``) over these tables."""
        return self.kernel_warps.get(kernel, self.kernel_warps[FUSED_STEP])

    @property
    def num_warps(self) -> int:
        """Warps per program of the fused step."""
        return self.kernel_warps[FUSED_STEP]

    @num_warps.setter
    def num_warps(self, value: int) -> None:
        if value != self.kernel_warps[FUSED_STEP]:
            # a cap and a prefetch distance were measured for the old program shape
            self.step_max_registers = None
            self.step_prefetch = 0
        self.kernel_warps[FUSED_STEP] = value

    @property
    def num_tensors(self) -> int:
        return len(self.weights)

    @property
    def num_chunks(self) -> int:
        """Programs per launch; ``grad_sq_norm`` writes this many partial sums."""
        return self.chunks.shape[0]

    def gather_grads(self, grads: Sequence[Optional[torch.Tensor]]) -> tuple[torch.Tensor, torch.dtype, bool]:
        """Check ``grads`` against the weights; return (address table, grad dtype, 16-byte aligned)."""
        grads = list(grads)
        dtype = check_grads(grads, self.shapes, self.device)
        key = tuple(g.data_ptr() for g in grads)
        if key != self._grad_key:
            # Same addresses as last step (the caching allocator often hands them back): reuse the table.
            self._grad_table = _h2d(list(key), torch.int64, self.device)
            self._grad_key = key
        return self._grad_table, dtype, _aligned(key)

    def grad_pointers(self, grads: Sequence[Optional[torch.Tensor]]) -> tuple[torch.Tensor, torch.dtype]:
        """Device int64 table of the gradients' addresses, and their common dtype (checked)."""
        table, dtype, _ = self.gather_grads(grads)
        return table, dtype

    def __repr__(self) -> str:
        return (f"BlockTables(tensors={self.num_tensors}, numel={sum(self.numels)}, dtype={self.dtype}, "
                f"device={self.device}, block_size={self.block_size}, chunks={self.num_chunks})")
