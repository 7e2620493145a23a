"""badam_ext: fused kernels and a block arena for Block Adam (BAdam) full-parameter finetuning.

Public API::

    from badam_ext import BlockAdam            # the optimizer
    from badam_ext import BlockOptimizer       # drop-in constructor with the reference BAdam's arguments
    from badam_ext import BlockArena           # the C++ arena that owns the active block's buffers
    from badam_ext import kernels              # the Triton kernels and their launchers
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["BlockAdam", "BlockOptimizer", "BlockArena", "infer_partition", "__version__"]


def __getattr__(name: str):
    # Imported lazily: `import badam_ext` stays cheap (no triton / C++ import) for the CLI and profiler.
    if name == "BlockAdam":
        from .optimizer import BlockAdam

        return BlockAdam
    if name == "BlockOptimizer":
        from .compat import BlockOptimizer

        return BlockOptimizer
    if name == "BlockArena":
        from .arena import BlockArena

        return BlockArena
    if name == "infer_partition":
        from .partition import infer_partition

        return infer_partition
    if name == "kernels":
        import importlib

        return importlib.import_module(".kernels", __name__)
    raise AttributeError(f"module 'badam_ext' has no attribute {name!r}")
