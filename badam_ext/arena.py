"""The block arena: the device memory for the active block's optimizer state.

``BlockArena``, ``ArenaLayout`` and ``StateSpec`` come from the C++ extension ``badam_ext._C``; see
ARCHITECTURE.md for the contract and :mod:`badam_ext.states` for the formats. ``required_capacity``
defaults to the fp32 format.
"""
from __future__ import annotations

from typing import Optional, Sequence

try:
    from badam_ext import _C
    from badam_ext._C import ArenaLayout, BlockArena, StateSpec
except ImportError as exc:  # no silent fallback: the arena is the point of the package
    raise ImportError(
        "badam_ext._C (the C++ block arena) is not built or does not load; build it from the "
        "repository root with `pip install --no-build-isolation -e .`"
    ) from exc

__all__ = ["ArenaLayout", "BlockArena", "StateSpec", "required_capacity"]


def required_capacity(numels: Sequence[int], spec: Optional[StateSpec] = None) -> int:
    """Padded element total of a block with these parameter numels under ``spec`` (default fp32):
    the smallest ``capacity_numel`` of an arena that holds it."""
    return _C.required_capacity(list(numels), spec if spec is not None else StateSpec.fp32())

