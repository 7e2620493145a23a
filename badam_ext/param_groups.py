"""What BlockAdam's ``params`` argument may be, and a clear error for what it cannot take.

BlockAdam needs parameter *names* (blocks are found by name and by module structure), so it takes a
module or ``(name, parameter)`` pairs. torch-style inputs (bare tensors, or param-group dicts, which
is what ``transformers.Trainer(optimizer_cls_and_kwargs=...)`` hands an optimizer class) carry no
names; they are refused with the routes that work.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

ROUTES = (
    "pass the model: BlockAdam(model, ...); with Trainer(optimizer_cls_and_kwargs=(BlockAdam, kwargs)) put "
    "the model in the kwargs, {'model': model, 'lr': ...} (Trainer then hands it to BlockAdam), or call "
    "badam_ext.hf.use_block_adam(trainer, ...) once the trainer exists (TRL with a model id included)"
)


def named_parameter_pairs(params: Iterable[Any]) -> list[tuple[str, torch.Tensor]]:
    """``params`` as a list of ``(name, tensor)`` pairs; TypeError naming the routes otherwise."""
    if isinstance(params, (str, bytes, dict)):
        raise TypeError(f"BlockAdam got a {type(params).__name__} as params; {ROUTES}")
    items = list(params)
    for item in items:
        if isinstance(item, dict):
            raise TypeError(
                "BlockAdam got torch param groups (dicts of 'params'), which carry no parameter names; "
                f"{ROUTES}. Per-group hyper-parameters go in BlockAdam(model, param_groups=[...])"
            )
        if isinstance(item, torch.Tensor):
            raise TypeError(f"BlockAdam got bare tensors (e.g. model.parameters()), which carry no names; {ROUTES}")
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise TypeError(
                "BlockAdam expects an nn.Module or (name, parameter) pairs like model.named_parameters(), "
                f"got an item of type {type(item).__name__}"
            )
    return items
