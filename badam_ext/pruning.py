"""Stop backward at the lowest trainable layer.

With only one block trainable, backward needs to run from the loss down to the lowest layer that
holds a trainable parameter, not further. Two things get in the way with Hugging Face models:

1. ``gradient_checkpointing_enable()`` (transformers 5.x, models fed ``input_ids``) calls
   ``enable_input_require_grads()``: a forward hook makes the input embeddings' *output* require
   grad, so every backward runs through every layer. :func:`remove_input_require_grads` undoes it.
2. Reentrant checkpointing (``use_reentrant=True``) only runs a checkpointed layer's backward when
   one of its tensor inputs requires grad; a trainable layer whose input does not would get no
   gradient. The pruner wraps the checkpoint function of the lowest trainable layer only, so the
   hidden state entering it requires grad (as a fresh leaf) and the layers below stay out of
   backward. Layers above get inputs that require grad through the trainable layer.

Non-reentrant checkpointing and no checkpointing need nothing beyond (1): autograd then skips every
node with no path to a trainable parameter.

Hugging Face layers call ``self._gradient_checkpointing_func(fn, hidden_states, ...)`` outside the
checkpoint (transformers 4.5x overrides ``__call__``, 5.x wraps ``forward``; both read the function
from the instance), so wrapping that instance attribute works for both; a forward pre-hook would run
inside the checkpoint under 4.5x-style layers and come too late.
"""
from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.utils.checkpoint
from torch import nn

from .introspection import LayerContainer, find_layer_container, layer_index_map, lowest_trainable_layer
from .partition import BlockPartition

logger = logging.getLogger(__name__)

_HOOK_ATTRS = ("_require_grads_hooks", "_require_grads_hook")


def remove_input_require_grads(model: nn.Module) -> bool:
    """Remove Hugging Face's ``enable_input_require_grads`` hooks from ``model`` and its submodules.

    Handles transformers 5.23 (a list in ``_require_grads_hooks`` plus ``_require_grads_hook``) and
    earlier versions (``_require_grads_hook`` only), and hooks no attribute tracks any more: calling
    ``gradient_checkpointing_enable()`` twice registers a second hook and overwrites the record of the
    first, which ``disable_input_require_grads()`` then never removes (the 8B bench's compiled variant
    did so, and its backward ran through all 32 layers whatever the active block). Returns True when
    a hook was removed.
    """
    removed = False
    for m in model.modules():
        removed |= _remove_untracked_hooks(m)
        hooks = list(getattr(m, "_require_grads_hooks", None) or [])
        single = getattr(m, "_require_grads_hook", None)
        if single is not None and all(single is not h for h in hooks):
            hooks.append(single)
        if not hooks:
            continue
        disable = getattr(m, "disable_input_require_grads", None)
        if callable(disable):
            try:
                disable()
            except AttributeError:  # an older bookkeeping layout; the handles are removed below anyway
                pass
        for h in hooks:  # idempotent: a removed handle ignores a second remove()
            h.remove()
        for attr in _HOOK_ATTRS:
            if attr in m.__dict__:
                delattr(m, attr)
        removed = True
    return removed


def _is_input_grads_hook(hook: Any) -> bool:
    """Hugging Face's ``make_inputs_require_grads`` closure (its name is the same from 4.x to 5.x)."""
    return (getattr(hook, "__name__", None) == "make_inputs_require_grads"
            and "enable_input_require_grads" in getattr(hook, "__qualname__", ""))


def _remove_untracked_hooks(module: nn.Module) -> bool:
    """Remove ``module``'s input-grad hooks that may be tracked by no attribute; True when any was."""
    keys = [k for k, hook in module._forward_hooks.items() if _is_input_grads_hook(hook)]
    for key in keys:
        del module._forward_hooks[key]
        module._forward_hooks_with_kwargs.pop(key, None)
        module._forward_hooks_always_called.pop(key, None)
    return bool(keys)


@dataclass(frozen=True)
class CheckpointingInfo:
    """Whether gradient checkpointing is on, and whether it is reentrant.

    ``reentrant`` is None when checkpointing is off, or when a layer's checkpoint function is not a
    ``functools.partial`` with readable arguments (then it is treated as reentrant, the safe side).
    """

    enabled: bool
    reentrant: bool | None
    checkpointed_modules: int


def _unwrap(fn: Any) -> Any:
    while isinstance(fn, _InputGradCheckpoint):
        fn = fn.inner
    return fn


def _is_reentrant(fn: Any) -> bool | None:
    while getattr(fn, "wraps_checkpoint", False):  # ours and other wrappers (checkpoint offload)
        fn = fn.inner
    if isinstance(fn, functools.partial):
        value = fn.keywords.get("use_reentrant")
        # torch.utils.checkpoint treats a missing use_reentrant as True (with a warning).
        return True if value is None else bool(value)
    if fn is torch.utils.checkpoint.checkpoint:
        return True
    return None


def checkpointing_info(model: nn.Module) -> CheckpointingInfo:
    """Inspect the ``gradient_checkpointing`` flags and checkpoint functions Hugging Face sets."""
    modes: set[bool | None] = set()
    count = 0
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is True:
            count += 1
            modes.add(_is_reentrant(getattr(m, "_gradient_checkpointing_func", None)))
    if not count:
        return CheckpointingInfo(False, None, 0)
    reentrant: bool | None
    if modes == {False}:
        reentrant = False
    elif True in modes:
        reentrant = True
    else:
        reentrant = None
    return CheckpointingInfo(True, reentrant, count)


class _InputGradCheckpoint:
    """A checkpoint function whose first positional tensor is made to require grad when it does not."""

    wraps_checkpoint = True

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner = inner
        self.leaves_made = 0
        self.warned = False

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            first = args[0] if args else None
            if isinstance(first, torch.Tensor) and first.is_floating_point():
                if not first.requires_grad:
                    # A detached leaf: the caller's tensor keeps requires_grad=False and nothing below
                    # this layer joins the graph.
                    args = (first.detach().requires_grad_(True), *args[1:])
                    self.leaves_made += 1
            elif not self.warned:
                self.warned = True
                warnings.warn("reentrant checkpointing: the lowest trainable layer got no positional "
                              "floating-point hidden state, so its gradients may be missing", stacklevel=2)
        return self.inner(function, *args, **kwargs)


class BackwardPruner:
    """Keep backward from running below the lowest trainable layer of a BAdam block.

    Construct it after gradient checkpointing is configured; call :meth:`on_switch` with the new
    active block index at every block switch (it also re-inspects the model, so calling it after
    re-enabling checkpointing is enough). :meth:`remove` undoes the wrapper.

    Args:
        model: the model whose parameters ``partition`` holds.
        partition: the block partition in use.
        active_index: when given, :meth:`on_switch` runs for it at once.
    """

    def __init__(self, model: nn.Module, partition: BlockPartition, active_index: int | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        model_params = {id(p) for p in model.parameters()}
        foreign = [n for n, p in partition.params.items() if id(p) not in model_params]
        if foreign:
            raise ValueError(f"the partition holds tensors that are not this model's parameters, e.g. {foreign[:3]}")
        self.model = model
        self.partition = partition
        self.container: LayerContainer | None = find_layer_container(model)
        self._layer_of = layer_index_map(model, self.container)
        self.removed_input_hook = False
        self.checkpointing = CheckpointingInfo(False, None, 0)
        self.active_index: int | None = None
        self.lowest_layer: int | None = None
        self.input_grad_layer: int | None = None
        self._wrapped: tuple[nn.Module, _InputGradCheckpoint] | None = None
        self._key: tuple | None = None
        if active_index is not None:
            self.on_switch(active_index)

    def _state_key(self) -> tuple:
        """What on_switch depends on, cheaply: the top model's input-grad hooks and each layer's
        checkpointing flag and function (a new function means checkpointing was re-enabled)."""
        top = self.model
        layers = self.container.layers if self.container is not None else ()
        return (
            bool(getattr(top, "_require_grads_hooks", None)),
            getattr(top, "_require_grads_hook", None) is not None,
            tuple((getattr(m, "gradient_checkpointing", None), id(m.__dict__.get("_gradient_checkpointing_func")))
                  for m in layers),
        )

    def refresh(self) -> None:
        """Re-prune only if checkpointing or the input-grad hooks changed since the last switch.

        Meant to run before every forward (e.g. HF Trainer enables checkpointing after the optimizer
        exists); costs one pass over the layer list instead of a walk over every module.
        """
        if self.active_index is not None and self._state_key() != self._key:
            self.on_switch(self.active_index)

    def on_switch(self, active_index: int) -> None:
        """Re-inspect the model and prune for block ``active_index``."""
        trainable = [p for _, p in self.partition.trainable_params(active_index)]
        if remove_input_require_grads(self.model):
            self.removed_input_hook = True
            logger.info("removed enable_input_require_grads hook: backward now stops at the lowest trainable layer")
        self.checkpointing = checkpointing_info(self.model)
        self.active_index = active_index
        self.lowest_layer = lowest_trainable_layer(trainable, self._layer_of)
        self._unwrap_layer()
        if self.lowest_layer is not None and self.checkpointing.enabled and self.checkpointing.reentrant is not False:
            assert self.container is not None  # a lowest layer implies a layer stack
            self._wrap_layer(self.container.layers[self.lowest_layer], self.lowest_layer)
        self._key = self._state_key()

    def _wrap_layer(self, layer: nn.Module, index: int) -> None:
        inner = layer.__dict__.get("_gradient_checkpointing_func")
        if inner is None:
            return  # the layer is not checkpointed itself: plain autograd gives its input no need of grad
        wrapper = _InputGradCheckpoint(_unwrap(inner))
        layer._gradient_checkpointing_func = wrapper
        self._wrapped = (layer, wrapper)
        self.input_grad_layer = index

    def _unwrap_layer(self) -> None:
        if self._wrapped is not None:
            layer, wrapper = self._wrapped
            # Leave a function Hugging Face has set since (checkpointing re-enabled) in place.
            if layer.__dict__.get("_gradient_checkpointing_func") is wrapper:
                layer._gradient_checkpointing_func = wrapper.inner
        self._wrapped = None
        self.input_grad_layer = None

    def remove(self) -> None:
        """Restore the wrapped checkpoint function (the input-grad hook stays removed)."""
        self._unwrap_layer()

    def describe(self) -> dict[str, Any]:
        """What the pruner found and did, for logs."""
        return {
            "layer_stack": self.container.prefix if self.container else None,
            "removed_input_require_grads_hook": self.removed_input_hook,
            "checkpointing": self.checkpointing.enabled,
            "reentrant": self.checkpointing.reentrant,
            "active_block": self.active_index,
            "lowest_trainable_layer": self.lowest_layer,
            "input_grad_layer": self.input_grad_layer,
        }
