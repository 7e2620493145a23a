"""badam_ext: fused kernels and a block arena for Block Adam (BAdam) full-parameter finetuning.

Public API::

    from badam_ext import BlockAdam            # the optimizer
    from badam_ext import BlockOptimizer       # drop-in constructor with the reference BAdam's arguments
    from badam_ext import BlockArena           # the C++ arena that owns the active block's buffers
    from badam_ext import kernels              # the Triton kernels and their launchers
    from badam_ext import compile_layers       # torch.compile per layer, bounded recompiles under BAdam
    import badam_ext; badam_ext.hf             # Hugging Face Trainer / TRL glue (badam_ext.hf)
    from badam_ext import apply_memory_savings # fused loss + checkpoint offload on a HF causal LM
    from badam_ext import plan_memory          # predicted peak memory of a step, from a config

Submodules load on first use: ``import badam_ext`` imports neither torch, triton nor the C++ extension.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys

__version__ = "0.1.0"

__all__ = ["BlockAdam", "BlockOptimizer", "BlockArena", "infer_partition", "compile_layers",
           "apply_memory_savings", "plan_memory", "__version__"]

# name -> (module, attribute); attribute None: the module itself
_LAZY: dict[str, tuple[str, str | None]] = {
    "BlockAdam": (".optimizer", "BlockAdam"),
    "BlockOptimizer": (".compat", "BlockOptimizer"),
    "BlockArena": (".arena", "BlockArena"),
    "infer_partition": (".partition", "infer_partition"),
    "compile_layers": (".compilation", "compile_layers"),
    "apply_memory_savings": (".memory", "apply_memory_savings"),
    "plan_memory": (".memory", "plan_memory"),
    "memory": (".memory", None),
    "kernels": (".kernels", None),
    "hf": (".hf", None),
    "integrations": (".integrations", None),
    "profiling": (".profiling", None),
}


def __getattr__(name: str):
    # Imported lazily: `import badam_ext` stays cheap (no torch / triton / C++ import) for the CLI and profiler.
    if name not in _LAZY:
        raise AttributeError(f"module 'badam_ext' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name, __name__)
    return module if attr is None else getattr(module, attr)


class _TorchBeforeExtension(importlib.abc.MetaPathFinder):
    """Import torch before ``badam_ext._C`` loads: the extension links against torch's libc10.so,
    which the dynamic loader finds only once torch is imported. Finds nothing itself."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - importlib's signature
        if fullname == f"{__name__}._C":
            import torch  # noqa: F401 - loads libc10 / libtorch for the extension

        return None


if not any(isinstance(f, _TorchBeforeExtension) for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchBeforeExtension())
