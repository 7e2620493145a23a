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
"""
from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from .introspection import COMPILE_WRAPPER, find_layer_container


def compile_layers(model: nn.Module, **compile_kwargs: Any) -> int:
    """``layer.compile(**compile_kwargs)`` for every layer of ``model``'s layer stack; returns how many.

    The layers are compiled in place (``nn.Module.compile``), so parameter names do not change.
    Keyword arguments go to ``torch.compile`` (``backend``, ``mode``, ``dynamic``, ...). Call it on
    the uncompiled model, before or after building the optimizer. With gradient checkpointing on
    torch 2.13, one global torch setting is changed (see ``_allow_checkpointed_frozen_layers``).
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
    _allow_checkpointed_frozen_layers()
    for layer in container.layers:
        layer.compile(**compile_kwargs)
    return len(container.layers)


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
