"""Which layers backward ran through: an identity autograd probe on each layer's outputs.

A probe's backward runs exactly when autograd executes that part of the layer (in the recomputation,
under reentrant checkpointing), so the recorded set is the set of layers backward went through.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from badam_ext.introspection import find_layer_container


class _Probe(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, record: set, index: int) -> torch.Tensor:
        ctx.record, ctx.index = record, index
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        ctx.record.add(ctx.index)
        return grad, None, None


def add_probes(model: nn.Module) -> set[int]:
    record: set[int] = set()
    container = find_layer_container(model)
    assert container is not None

    def hook(index: int, module: nn.Module, args: Any, out: Any) -> Any:
        if isinstance(out, torch.Tensor):
            return _Probe.apply(out, record, index)
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
            return (_Probe.apply(out[0], record, index), *out[1:])
        return None

    for i, layer in enumerate(container.layers):
        for child in layer.children():
            if any(True for _ in child.parameters()):
                child.register_forward_hook(functools.partial(hook, i))
    return record
