"""Device-side reading of the launch tables: which tensor and which elements a program owns."""
from __future__ import annotations

import triton
import triton.language as tl

from ..contract import OFFSET_ALIGN
from .tables import META_COLS, META_DECAY, META_NUMEL, META_OFFSET, META_WEIGHT

_META_COLS = tl.constexpr(META_COLS)
_WEIGHT = tl.constexpr(META_WEIGHT)
_OFFSET = tl.constexpr(META_OFFSET)
_NUMEL = tl.constexpr(META_NUMEL)
_DECAY = tl.constexpr(META_DECAY)
_OFFSET_ALIGN = tl.constexpr(OFFSET_ALIGN)


@triton.jit
def program_chunk(meta_ptr, chunk_ptr, BLOCK: tl.constexpr):
    """(tensor index, first element, weight address, arena offset, numel, decay flag) of this program.

    All int64: element indices of tensors over 2^31 elements must not wrap.
    """
    return chunk_at(meta_ptr, chunk_ptr, tl.program_id(0).to(tl.int64), BLOCK)


@triton.jit
def chunk_at(meta_ptr, chunk_ptr, chunk, BLOCK: tl.constexpr):
    """:func:`program_chunk` of chunk number ``chunk`` (int64) of the tables."""
    tid = tl.load(chunk_ptr + 2 * chunk).to(tl.int64)
    start = tl.load(chunk_ptr + 2 * chunk + 1).to(tl.int64) * BLOCK
    row = meta_ptr + tid * _META_COLS
    w_addr = tl.load(row + _WEIGHT)
    offset = tl.multiple_of(tl.load(row + _OFFSET), _OFFSET_ALIGN)
    numel = tl.load(row + _NUMEL)
    decay = tl.load(row + _DECAY)
    return tid, start, w_addr, offset, numel, decay


@triton.jit
def as_pointer(addr, DTYPE: tl.constexpr, ALIGN: tl.constexpr):
    """Typed pointer from an int64 address, promised to be a multiple of ALIGN bytes (0: no promise).

    The launchers check the promise on the host; it is what lets loads and stores vectorize.
    """
    ptr = addr.to(tl.pointer_type(DTYPE))
    if ALIGN > 1:
        ptr = tl.multiple_of(ptr, ALIGN)
    return ptr
