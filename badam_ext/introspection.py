"""Model introspection: where a model keeps its layer stack and its input / output embeddings, and
the names ``torch.compile`` wrappers add. Read-only questions about a module; the partition
builders (``partition.py``), the backward pruner and the memory planner ask them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import nn

# Fallback when only names are known: the outermost `<container>.<index>.` in a name.
_LAYER_NAME_RE = re.compile(r"^((?:.*?\.)?(?:layers|h|layer|block|blocks))\.(\d+)\.")

#: The attribute under which ``torch.compile`` wraps a module (``OptimizedModule._orig_mod``).
COMPILE_WRAPPER = "_orig_mod"


def strip_compile_prefix(name: str) -> str:
    """``name`` without the ``_orig_mod`` components of ``torch.compile`` wrappers.

    ``_orig_mod.model.layers.0.mlp.weight`` and ``model.layers.0._orig_mod.mlp.weight`` both become
    ``model.layers.0.mlp.weight``.
    """
    if COMPILE_WRAPPER not in name:
        return name
    return ".".join(part for part in name.split(".") if part != COMPILE_WRAPPER)


@dataclass(frozen=True)
class LayerContainer:
    """The repeated-layer stack of a model: its name prefix (``model.layers``) and its layers."""

    prefix: str
    layers: tuple[nn.Module, ...]


def _is_layer_like(m: nn.Module) -> bool:
    return any(True for _ in m.children()) and any(True for _ in m.parameters())


def find_layer_container(model: nn.Module) -> LayerContainer | None:
    """The ``nn.ModuleList`` of repeated layers holding the most parameter elements.

    Candidates are ModuleLists whose entries are all composite modules with parameters, not nested
    inside another candidate (MoE expert lists inside a layer are skipped). None when there is none.
    """
    candidates: list[tuple[str, nn.ModuleList]] = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and all(_is_layer_like(c) for c in m)
    ]
    top = [(n, m) for n, m in candidates
           if not any(o != n and (o == "" or n.startswith(o + ".")) for o, _ in candidates)]
    if not top:
        return None

    def size(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    best_name, best = max(top, key=lambda nm: size(nm[1]))  # max keeps the first of equals
    return LayerContainer(prefix=strip_compile_prefix(best_name), layers=tuple(best))


def layer_groups_from_names(params: Mapping[str, torch.Tensor]) -> tuple[str, list[int]] | None:
    """Fallback: the name container (``x.layers``) with the most elements, and its indices."""
    sizes: dict[str, int] = {}
    indices: dict[str, set[int]] = {}
    for name, p in params.items():
        m = _LAYER_NAME_RE.match(name)
        if m:
            sizes[m.group(1)] = sizes.get(m.group(1), 0) + p.numel()
            indices.setdefault(m.group(1), set()).add(int(m.group(2)))
    if not sizes:
        return None
    best = max(sizes, key=lambda k: sizes[k])
    return best, sorted(indices[best])


def module_prefix(model: nn.Module, target: Any) -> str | None:
    """The name of submodule ``target`` in ``model`` (compile wrappers stripped); None when absent."""
    if not isinstance(target, nn.Module):
        return None
    for name, m in model.named_modules():
        if m is target:
            return strip_compile_prefix(name)
    return None


def io_embeddings(model: nn.Module | None) -> tuple[str | None, str | None, bool]:
    """Prefixes of the input and output embedding modules, and whether their weights are tied."""
    if model is None:
        return None, None, False

    def get(attr: str) -> Any:
        fn = getattr(model, attr, None)
        if not callable(fn):
            return None
        try:
            return fn()
        except (NotImplementedError, AttributeError):
            return None

    inp, out = get("get_input_embeddings"), get("get_output_embeddings")
    w_in, w_out = getattr(inp, "weight", None), getattr(out, "weight", None)
    tied = w_in is not None and w_in is w_out
    return module_prefix(model, inp), module_prefix(model, out), tied


def layer_index_map(model: nn.Module, container: LayerContainer | None = None) -> dict[int, int]:
    """``id(parameter) -> layer index`` for the parameters of the layer stack (lowest index wins)."""
    container = container if container is not None else find_layer_container(model)
    if container is None:
        return {}
    out: dict[int, int] = {}
    for i, layer in enumerate(container.layers):
        for p in layer.parameters():
            out.setdefault(id(p), i)
    return out


def lowest_trainable_layer(params: Iterable[torch.Tensor], layer_of: Mapping[int, int]) -> int | None:
    """The lowest layer index holding any of ``params`` (None when none lies in the layer stack)."""
    found = [layer_of[id(p)] for p in params if id(p) in layer_of]
    return min(found) if found else None
