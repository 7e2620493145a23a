"""BAdam-aware offload of gradient-checkpointed layer inputs to host memory.

Under Hugging Face gradient checkpointing each decoder layer keeps only its input hidden state for
the backward recompute. With one BAdam block active, only the layers at or above the lowest trainable
layer need it: below, nothing requires grad, autograd records nothing and the layer saves nothing
(:class:`CheckpointOffloader` does not even watch those). Above, ``seq x hidden`` bytes per layer
pile up: 256 KiB per token for the Llama-3-8B shape with block 0 active.

With offload on, each saved input is copied during forward, on a side stream, into a slice of one
host buffer owned by the C++ extension (:class:`badam_ext._C.HostBuffer`, pinned on CUDA, allocated
once and reset every step). In backward the inputs come back in reverse layer order: unpacking layer
``i`` starts the copy of layer ``i - 1`` on the side stream, so one transfer is always in flight while
the current layer recomputes and device memory holds about two layers' inputs.

The hook point is each layer's ``_gradient_checkpointing_func`` (what Hugging Face calls around the
layer's forward): inside it, the tensors the checkpoint itself saves (its inputs, for reentrant and
non-reentrant checkpointing alike) pass through ``torch.autograd.graph.saved_tensors_hooks``; what
the layer saves for the recompute runs under the checkpoint's own, inner hooks, untouched.
"""
from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..introspection import find_layer_container

logger = logging.getLogger("badam_ext")

DEFAULT_MIN_BYTES = 1 << 20  # smaller saved tensors stay where they are (rotary tables, masks)


class _Saved:
    """One offloaded tensor: its host copy, the copy's event, and a prefetched device copy."""

    __slots__ = ("index", "host", "device", "copied", "prefetched", "ready", "__weakref__")

    def __init__(self, index: int, host: torch.Tensor, device: torch.device, copied: Any) -> None:
        self.index = index
        self.host = host
        self.device = device
        self.copied = copied  # CUDA event: the device-to-host copy is done (None on CPU)
        self.prefetched: Optional[torch.Tensor] = None
        self.ready: Any = None


class OffloadingCheckpoint:
    """A layer's checkpoint function that offloads what the checkpoint saves (see the module doc)."""

    wraps_checkpoint = True  # lets the backward pruner see the checkpoint function underneath

    def __init__(self, inner: Callable[..., Any], offloader: "CheckpointOffloader", layer: nn.Module) -> None:
        self.inner = inner
        self._offloader = weakref.ref(offloader)
        self._params = tuple(layer.parameters())

    def _needs_saving(self, args: tuple) -> bool:
        if not torch.is_grad_enabled():
            return False
        if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return True
        return any(p.requires_grad for p in self._params)

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        offloader = self._offloader()
        if offloader is None or not offloader.active or not self._needs_saving(args):
            return self.inner(function, *args, **kwargs)
        with torch.autograd.graph.saved_tensors_hooks(offloader.pack, offloader.unpack):
            return self.inner(function, *args, **kwargs)


def offloading_of(fn: Any) -> Optional[OffloadingCheckpoint]:
    """The OffloadingCheckpoint in a chain of checkpoint wrappers, or None."""
    while fn is not None:
        if isinstance(fn, OffloadingCheckpoint):
            return fn
        fn = getattr(fn, "inner", None) if getattr(fn, "wraps_checkpoint", False) else None
    return None


class CheckpointOffloader:
    """Offload the checkpointed inputs of ``model``'s layer stack to one reusable host buffer.

    Args:
        model: a model whose layers Hugging Face checkpoints (``gradient_checkpointing_enable()``);
            checkpointing may be enabled before or after, :meth:`refresh` re-installs the wrappers.
        reserve_bytes: host bytes to allocate now (from the memory plan); 0 allocates at the first
            offloaded step, sized for that step's inputs.
        min_bytes: saved tensors smaller than this stay on the device.

    ``active`` switches offloading per step (the "auto" policy sets it before each forward).
    ``stats()`` reports the bytes offloaded in the last forward and the host buffer's allocations.
    """

    def __init__(self, model: nn.Module, *, reserve_bytes: int = 0, min_bytes: int = DEFAULT_MIN_BYTES) -> None:
        from .. import _C

        container = find_layer_container(model)
        if container is None:
            raise ValueError(f"{type(model).__name__} has no repeated layer stack to offload checkpoints from")
        self.model = model
        self.layers = container.layers
        self.min_bytes = int(min_bytes)
        self.device = next(model.parameters()).device
        self.active = True
        pinned = self.device.type == "cuda"
        self.buffer = _C.HostBuffer(int(reserve_bytes), pinned)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._records: list[weakref.ref] = []  # this forward's saved tensors, in order (weak)
        self._live: "weakref.WeakSet[_Saved]" = weakref.WeakSet()
        self.offloaded_bytes = 0  # in the current / last forward
        self.peak_offloaded_bytes = 0
        self._skipping = False  # this forward keeps its checkpoints on the device (see begin_forward)
        self._warned_live = False
        self.refresh()

    # ------------------------------------------------------------------ wrappers
    def refresh(self) -> None:
        """Wrap every checkpointed layer's function (again, after checkpointing was re-enabled)."""
        for layer in self.layers:
            fn = layer.__dict__.get("_gradient_checkpointing_func")
            if fn is None or offloading_of(fn) is not None:
                continue
            if getattr(fn, "wraps_checkpoint", False):  # the pruner's wrapper: offload underneath it
                fn.inner = OffloadingCheckpoint(fn.inner, self, layer)
            else:
                layer._gradient_checkpointing_func = OffloadingCheckpoint(fn, self, layer)

    def remove(self) -> None:
        """Unwrap every layer and free the host buffer."""
        for layer in self.layers:
            holder, fn = layer, layer.__dict__.get("_gradient_checkpointing_func")
            while fn is not None and getattr(fn, "wraps_checkpoint", False):
                if isinstance(fn, OffloadingCheckpoint):
                    if holder is layer:
                        layer._gradient_checkpointing_func = fn.inner
                    else:
                        holder.inner = fn.inner
                    break
                holder, fn = fn, fn.inner
        self._records = []
        if not self.buffer.released:
            self.buffer.release()

    # ---------------------------------------------------------------- per step
    def begin_forward(self, reserve_bytes: int = 0) -> bool:
        """Start a forward: the buffer is reused from offset 0, which needs every tensor offloaded by an
        earlier forward released (its backward done, its graph dropped).

        Returns False, and leaves this forward's checkpoints on the device, while an earlier forward's
        are still held (``retain_graph=True``, or an output kept across steps): the host buffer never
        grows with the number of graphs alive.
        """
        self.offloaded_bytes = 0
        if len(self._live) > 0:
            if not self._warned_live:
                self._warned_live = True
                logger.warning("checkpoint offload: tensors offloaded by an earlier forward are still held "
                               "(retain_graph, or an output kept alive); this forward keeps its checkpoints "
                               "on the device")
            self._skipping = True
            return False
        self._skipping = False
        self.buffer.reset()
        self._records = []
        if reserve_bytes:
            self.buffer.reserve(int(reserve_bytes))
        return True

    def pack(self, tensor: torch.Tensor) -> Any:
        nbytes = tensor.numel() * tensor.element_size()
        small = nbytes < max(self.min_bytes, 1)
        if self._skipping or small or not tensor.is_contiguous() or tensor.device != self.device:
            return tensor
        host = self.buffer.acquire(nbytes).view(tensor.dtype).view(tensor.shape)
        copied = None
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                host.copy_(tensor, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self._stream)
            tensor.record_stream(self._stream)  # its memory is not reused before the copy is done
        else:
            host.copy_(tensor)
        saved = _Saved(len(self._records), host, tensor.device, copied)
        self._records.append(weakref.ref(saved))
        self._live.add(saved)
        self.offloaded_bytes += nbytes
        self.peak_offloaded_bytes = max(self.peak_offloaded_bytes, self.offloaded_bytes)
        return saved

    def unpack(self, saved: Any) -> torch.Tensor:
        if not isinstance(saved, _Saved):
            return saved
        if self._stream is None:
            return saved.host.clone()
        current = torch.cuda.current_stream(self.device)
        if saved.prefetched is not None:
            tensor, saved.prefetched = saved.prefetched, None
            current.wait_event(saved.ready)
            tensor.record_stream(current)
        else:
            current.wait_event(saved.copied)
            tensor = saved.host.to(saved.device, non_blocking=True)
        self._prefetch(saved.index - 1)
        return tensor

    def _prefetch(self, index: int) -> None:
        """Start copying record ``index`` back to the device on the side stream."""
        if index < 0 or index >= len(self._records):
            return
        saved = self._records[index]()
        if saved is None or saved.prefetched is not None:
            return
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(saved.copied)
            saved.prefetched = saved.host.to(saved.device, non_blocking=True)
            saved.ready = torch.cuda.Event()
            saved.ready.record(self._stream)

    def stats(self) -> dict[str, Any]:
        """Bytes offloaded in the last forward, host buffer size and allocation count."""
        return {
            "active": self.active,
            "offloaded_bytes": self.offloaded_bytes,
            "peak_offloaded_bytes": self.peak_offloaded_bytes,
            "host_capacity_bytes": self.buffer.capacity_bytes if not self.buffer.released else 0,
            "host_allocations": self.buffer.allocations,
            "pinned": self.buffer.pinned,
            "records_live": len(self._live),
        }
