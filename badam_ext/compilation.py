"""torch.compile under BAdam: compile each layer of the layer stack, not the whole model.

A block switch changes which parameters require grad, and torch.compile guards on that: a model
compiled as a whole gets a new graph at every switch, and past the recompile limit (8 by default) it
runs eagerly. Compiled per layer ("regional compilation"), every layer runs the same code, so the
compiled graphs are shared by all layers and depend only on a layer's role in the current step:
below the active block (no grad at all), the active block (its parameters require grad), above it
(its input requires grad). That makes a handful of graphs, whatever the number of blocks.

    model.config.use_cache = False    # training: no KV cache (it would specialise every layer)
    badam_ext.compile_layers(model)   # = for layer in model.model.layers: layer.compile()
    opt = BlockAdam(model, ...)

Non-reentrant gradient checkpointing is traced inside the compiled region (see
:class:`TracedCheckpoint`), so its recompute is part of the compiled backward.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import torch
import torch.utils.checkpoint
from torch import nn

from .introspection import COMPILE_WRAPPER, find_layer_container

_COMPILED_ATTR = "_badam_layers_compiled"
# checkpoint() keywords dynamo's checkpoint higher-order op takes as they are
_TRACEABLE_KEYWORDS = frozenset({"use_reentrant", "preserve_rng_state", "determinism_check"})


def compile_layers(model: nn.Module, *, traced_checkpoint: bool = True, **compile_kwargs: Any) -> int:
    """``layer.compile(**compile_kwargs)`` for every layer of ``model``'s layer stack; returns how many.

    The layers are compiled in place (``nn.Module.compile``), so parameter names do not change.
    Keyword arguments go to ``torch.compile`` (``backend``, ``mode``, ``dynamic``, ...). Call it on
    the uncompiled model, before or after building the optimizer and enabling checkpointing. With
    gradient checkpointing on torch 2.13, one global torch setting is changed (see
    ``_allow_checkpointed_frozen_layers``). ``traced_checkpoint=False`` leaves a non-reentrant
    checkpoint outside the compiled layer where the model puts it there (diagnostics only: see
    :class:`TracedCheckpoint`).
    """
    if isinstance(getattr(model, COMPILE_WRAPPER, None), nn.Module):
        raise ValueError("compile_layers needs the uncompiled model: pass model._orig_mod, not the "
                         "torch.compile(model) wrapper (whole-model compilation recompiles at every block switch)")
    container = find_layer_container(model)
    if container is None:
        raise ValueError(f"{type(model).__name__} has no repeated layer stack (an nn.ModuleList of layers) "
                         "to compile layer by layer; compile its repeated submodules yourself")
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False) and model.training:
        warnings.warn("model.config.use_cache is True: the KV cache a training forward builds makes torch "
                      "compile every layer apart (and hit the recompile limit); set model.config.use_cache "
                      "= False for training", stacklevel=2)
    _refuse_offloaded_checkpoints(container.layers)
    _allow_checkpointed_frozen_layers()
    for layer in container.layers:
        layer.compile(**compile_kwargs)
    setattr(model, _COMPILED_ATTR, True)
    if traced_checkpoint:
        _trace_checkpoints(model, container.layers, torch.compile(_checkpoint_region, **compile_kwargs))
    return len(container.layers)


def _checkpoint_region(checkpoint: Callable[..., Any], function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    # One function (one code object) for every layer: dynamo shares its graphs between the layers, as
    # for the layers' own forward; the layer comes in through ``function`` (its bound __call__).
    return checkpoint(function, *args, **kwargs)


def _traceable(fn: Any) -> bool:
    """A plain non-reentrant ``functools.partial(torch.utils.checkpoint.checkpoint, ...)`` (what
    Hugging Face's ``gradient_checkpointing_enable`` sets), nothing wrapped around it."""
    return (type(fn) is functools.partial and fn.func is torch.utils.checkpoint.checkpoint and not fn.args
            and fn.keywords.get("use_reentrant") is False and set(fn.keywords) <= _TRACEABLE_KEYWORDS)


class TracedCheckpoint:
    """A layer's non-reentrant checkpoint function, run inside one compiled region with the layer.

    Hugging Face layers before transformers 5.23 call ``self._gradient_checkpointing_func(partial(
    super().__call__, **kwargs), *args)`` from an overridden ``__call__``, outside ``forward``: the
    checkpoint then runs eagerly around the compiled layer, and its backward recomputes by calling the
    compiled layer again, through dynamo's cache. Whatever runs there must save exactly the tensors the
    forward's graph saved, or torch.utils.checkpoint raises "A different number of tensors was saved
    during the original forward and recomputation" (issue 12: H200, transformers 5.17, right after the
    first block switch). Nothing ensures it: on CUDA the recompute runs on the autograd device thread,
    whose intra-op thread count (a dynamo guard) can differ, so it needs graphs of its own; past the
    recompile limit (roles x threads x ...) it runs eagerly (reproduced on CPU with a backward at
    another thread count). Traced by dynamo instead (its checkpoint
    higher-order op, as under whole-model compilation and transformers 5.23's checkpointed
    ``forward``), the recompute is part of the compiled backward: no cache lookup in backward at all.

    Anything other than a plain non-reentrant ``checkpoint`` partial underneath (reentrant
    checkpointing) runs as before, eagerly; checkpoint offload is refused on compiled layers.
    """

    wraps_checkpoint = True  # the pruner and the offloader see the checkpoint function underneath

    def __init__(self, inner: Callable[..., Any], region: Callable[..., Any]) -> None:
        self.inner = inner
        self.region = region

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if _traceable(self.inner):
            return self.region(self.inner, function, *args, **kwargs)
        return self.inner(function, *args, **kwargs)


def _checkpoints_outside_forward(layer: nn.Module) -> bool:
    """The layer's class calls its checkpoint function around ``nn.Module.__call__`` (transformers
    before 5.23), so outside what ``layer.compile()`` compiles; from 5.23 ``forward`` calls it."""
    return type(layer).__call__ is not nn.Module.__call__


def _trace_checkpoints(model: nn.Module, layers: tuple[nn.Module, ...], region: Callable[..., Any]) -> None:
    """Wrap the layers' checkpoint functions in :class:`TracedCheckpoint`, now and again before every
    forward of the layer stack's owner: ``gradient_checkpointing_enable()`` after compile_layers sets
    new functions (the owner's pre-hook also runs when only the decoder is called)."""
    layers = tuple(layer for layer in layers if _checkpoints_outside_forward(layer))
    if not layers:
        return

    def wrap(*_: Any) -> None:
        _refuse_offloaded_checkpoints(layers)
        for layer in layers:
            fn = layer.__dict__.get("_gradient_checkpointing_func")
            if _traceable(fn):
                layer._gradient_checkpointing_func = TracedCheckpoint(fn, region)
            elif isinstance(fn, TracedCheckpoint):
                fn.region = region  # compile_layers again: its compile options

    wrap()
    owner = _owner_of(model, layers[0])
    handle = getattr(owner, "_badam_traced_checkpoint_hook", None)
    if handle is not None:  # compile_layers again: the new region replaces the old one
        handle.remove()
    owner._badam_traced_checkpoint_hook = owner.register_forward_pre_hook(wrap)


def _refuse_offloaded_checkpoints(layers: tuple[nn.Module, ...]) -> None:
    """Checkpoint offload wraps a layer's checkpoint eagerly, around the compiled layer: its recompute
    then fails after a block switch (CheckpointError on the H200), so compiled layers refuse it."""
    from .memory.offload import offloading_of

    for layer in layers:
        if offloading_of(layer.__dict__.get("_gradient_checkpointing_func")) is not None:
            raise ValueError("checkpoint offload wraps the checkpoints of layers compiled by compile_layers, which "
                             "compiled layers cannot run under: call compile_layers first, then apply_memory_savings "
                             "(it leaves offload off for compiled layers), or pass offload_checkpoints=False")


def layers_compiled(model: nn.Module) -> bool:
    """True when ``compile_layers`` compiled ``model``'s layers (their checkpoints then belong to the
    compiled regions: nothing may wrap them eagerly)."""
    return bool(getattr(model, _COMPILED_ATTR, False))


def _owner_of(model: nn.Module, layer: nn.Module) -> nn.Module:
    """The module whose child ModuleList holds ``layer`` (``model.model`` for a causal LM)."""
    for module in model.modules():
        for child in module.children():
            if isinstance(child, nn.ModuleList) and any(c is layer for c in child):
                return module
    return model


def _allow_checkpointed_frozen_layers() -> None:
    """Turn off AOTAutograd's activation-checkpoint rematerialisation of forward-loss-backward graphs
    (torch 2.13; absent in 2.11). Under gradient checkpointing, a compiled layer below the active block
    (nothing requires grad) is such a graph, and the pass refuses it for the RNG op of
    scaled_dot_product_attention ("does not support RNG ops in recompute regions"). Those layers run
    no backward, so the pass has nothing to save there; the joint graphs of trainable layers use the
    partitioner and are unaffected."""
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "remat_using_tags_for_fwd_loss_bwd_graph"):
        functorch_config.remat_using_tags_for_fwd_loss_bwd_graph = False
