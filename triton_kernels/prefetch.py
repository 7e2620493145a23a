"""Prefetching into L2 by the bulk-copy unit: a program asks for the bytes a later program will read.

The 8-bit step spends its time on table gathers and arithmetic between its loads and its stores,
so a one-warp program cannot keep enough loads in flight to hide DRAM latency (H200: 84% of its
bytes without a prefetch). A program that starts the DRAM reads of the program ``PREFETCH`` chunks
ahead, with no register and no wait, lets that program's loads hit L2 (bench/RESULTS.md, round 11).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .launch_config import GPU_BUILD


@triton.jit
def prefetch_l2(ptr, NBYTES: tl.constexpr):
    """Ask for the ``NBYTES`` (a multiple of 16) from ``ptr`` rounded down to 16 bytes to be brought
    into L2 (``cp.async.bulk.prefetch.L2``, sm_90 and later); the program's first thread issues it
    and nothing waits for it. ``[ptr & ~15, (ptr & ~15) + NBYTES)`` must lie in the allocation. A
    no-op in the interpreter."""
    if GPU_BUILD:
        tl.inline_asm_elementwise(
            "{ .reg .pred first; .reg .u32 t; .reg .u64 a; mov.u32 t, %tid.x; setp.eq.u32 first, t, 0; "
            "and.b64 a, $1, -16; @first cp.async.bulk.prefetch.L2.global [a], $2; mov.u32 $0, 0; }",
            "=r,l,r", [ptr.to(tl.int64), tl.full((), NBYTES, tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
        )


@triton.jit
def prefetch_chunk(ptrs, start, numel, BLOCK: tl.constexpr, PREFETCH: tl.constexpr):
    """Prefetch into L2 the ``BLOCK`` elements of each pointer in ``ptrs`` (a tuple of one tensor's
    streams) that the program ``PREFETCH`` chunks after this one reads, when that chunk is still a
    whole chunk of the same tensor (``numel`` elements; this chunk starts at ``start``). Nothing
    when ``PREFETCH`` is 0."""
    if PREFETCH > 0:
        ahead = start + PREFETCH * BLOCK
        # In bounds: ahead >= BLOCK >= 64 elements, so rounding down by at most 15 bytes stays inside
        # the tensor, and the range ends at or below element ahead + BLOCK <= numel.
        if ahead + BLOCK <= numel:
            for i in tl.static_range(len(ptrs)):
                prefetch_l2(ptrs[i] + ahead, BLOCK * (ptrs[i].dtype.element_ty.primitive_bitwidth // 8))
