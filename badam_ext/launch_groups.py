"""Launch groups: the active block's tensors split by (param group, weight dtype).

One fused launch covers one launch group, so a block of one dtype in one param group costs one launch
per step. The tables (pointers, arena offsets, chunk map) are built once per block switch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass
class LaunchGroup:
    """Tensors of the active block that share a param group and a weight dtype."""

    group_index: int
    names: list[str]
    params: list[torch.nn.Parameter]
    tables: Any
    # parameter or gradient -> the tensor the kernels see (FSDP2: this rank's local shard)
    local: Callable[[torch.Tensor], torch.Tensor] = _identity
    # (address, dtype) of each weight when the tables were built: the kernels write there
    storage: list[tuple[int, torch.dtype]] = field(init=False)

    def __post_init__(self) -> None:
        self.storage = [(self.local(p).data_ptr(), p.dtype) for p in self.params]

    def check_storage(self) -> None:
        """Raise if a weight was re-allocated since the tables were built (the step would write to
        orphaned memory): e.g. ``model.to(dtype)`` or ``model.half()`` after the optimizer was made."""
        for name, param, (ptr, dtype) in zip(self.names, self.params, self.storage):
            if self.local(param).data_ptr() != ptr or param.dtype != dtype:
                raise RuntimeError(
                    f"parameter {name} was re-allocated after BlockAdam was built (its storage or dtype "
                    "changed, e.g. by model.to(...) or model.half()): move or cast the model first, then "
                    "build the optimizer"
                )

    def grads(self) -> list[torch.Tensor]:
        """The current gradients, in table order; a missing one is an error, never skipped."""
        grads = []
        missing = []
        for name, param in zip(self.names, self.params):
            if param.grad is None:
                missing.append(name)
            grads.append(None if param.grad is None else self.local(param.grad))
        if missing:
            raise RuntimeError(
                f"no gradient for {len(missing)} parameter(s) of the active block: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}. Call backward() before step(), and make sure "
                "these parameters take part in the loss (BlockAdam does not skip parameters silently)."
            )
        return grads


def build_launch_groups(
    names: Sequence[str],
    params: Sequence[torch.nn.Parameter],
    offsets: Sequence[int],
    group_of: Callable[[torch.nn.Parameter], int],
    decays: Callable[[str, torch.nn.Parameter], bool],
    build_tables: Callable[..., Any],
    local: Callable[[torch.Tensor], torch.Tensor] = _identity,
) -> list[LaunchGroup]:
    """Split the active tensors by (param group, dtype) and build each group's tables.

    ``local`` maps a parameter (and its gradient) to the tensor the kernels work on.
    """
    buckets: dict[tuple[int, torch.dtype], list[int]] = {}
    for i, param in enumerate(params):
        buckets.setdefault((group_of(param), param.dtype), []).append(i)
    groups = []
    for (group_index, _dtype), idx in sorted(buckets.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        sel_params = [params[i] for i in idx]
        sel_names = [names[i] for i in idx]
        tables = build_tables(
            [local(p).detach() for p in sel_params],
            [offsets[i] for i in idx],
            [decays(n, p) for n, p in zip(sel_names, sel_params)],
        )
        groups.append(LaunchGroup(group_index, sel_names, sel_params, tables, local))
    return groups
