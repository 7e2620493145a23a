"""Count the bytes of live tensor storages created while a block of code runs (CPU or any device).

A ``TorchDispatchMode`` records the storage of every tensor an op returns and drops it once the
storage is freed; ``peak`` is the largest total seen after any op. Storages made before the mode
(weights, the arena) are not counted: what remains is activations, gradients and temporaries, the
dynamic part of a training step's memory.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as live: ...``; then ``live.peak`` (bytes) and ``live.current``."""

    def __init__(self) -> None:
        super().__init__()
        self._storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0
        self.marks: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # an output sharing an input's storage (a view, an in-place op) allocated nothing
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in inputs and key not in self._storages:
                    self._storages[key] = (StorageWeakRef(storage), storage.nbytes())
        self._sweep()
        return out

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self._storages.items() if ref.expired()]:
            del self._storages[key]
        self.current = sum(n for _, n in self._storages.values())
        self.peak = max(self.peak, self.current)

    def mark(self, name: str) -> None:
        """Remember the current live bytes under ``name``."""
        self._sweep()
        self.marks[name] = self.current

    def largest(self, count: int = 10) -> list[int]:
        """Sizes of the largest live storages, bytes (debugging)."""
        self._sweep()
        return sorted((n for _, n in self._storages.values()), reverse=True)[:count]
