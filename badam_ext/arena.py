"""The block arena: one device allocation for the active block's fp32 optimizer state.

``BlockArena``, ``ArenaLayout`` and ``required_capacity`` come from the C++ extension
``badam_ext._C``; see ARCHITECTURE.md for the contract. ``arena_for_blocks`` sizes an arena for
the largest block of a partition.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

try:
    from badam_ext._C import ArenaLayout, BlockArena, required_capacity
except ImportError as exc:  # no silent fallback: the arena is the point of the package
    raise ImportError(
        "badam_ext._C (the C++ block arena) is not built or does not load; build it from the "
        "repository root with `pip install --no-build-isolation -e .`"
    ) from exc

__all__ = ["ArenaLayout", "BlockArena", "arena_for_blocks", "required_capacity"]


def arena_for_blocks(
    blocks: Sequence[Sequence[torch.Tensor]],
    device: Union[torch.device, str],
    with_grad: bool = False,
    alignment_bytes: int = 256,
) -> BlockArena:
    """A BlockArena on ``device`` just large enough for the largest of ``blocks``.

    Each block is the sequence of its parameters in the order they will be laid out.
    """
    if len(blocks) == 0:
        raise ValueError("arena_for_blocks: no blocks given")
    capacity = 0
    for b, block in enumerate(blocks):
        numels = []
        for i, tensor in enumerate(block):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"arena_for_blocks: block {b} item {i} is a {type(tensor).__name__}, "
                    "not a torch.Tensor"
                )
            numels.append(tensor.numel())
        try:
            need = required_capacity(numels, alignment_bytes)
        except ValueError as exc:
            raise ValueError(f"arena_for_blocks: block {b}: {exc}") from exc
        capacity = max(capacity, need)
    return BlockArena(capacity, device, with_grad=with_grad, alignment_bytes=alignment_bytes)
