"""Benchmark variants for the long-sequence work (registered beside bench_e2e's SETUPS).

* ``ours_saved``: BlockAdam + ``apply_memory_savings`` (fused loss, layer kernels where Liger-Kernel
  is installed, checkpoint offload "auto" for the budget given as ``args.budget_gib``, else the
  device's memory); ``BADAM_LAYER_KERNELS=0`` in the environment keeps Hugging Face's layers (to
  measure the loss alone); ``ours_saved_8bit``: the same with ``BlockAdam(states="8bit")``;
* ``ours_offload``: the same with offload forced on;
* ``ours_liger`` / ``ref_liger``: BlockAdam / the reference with Liger-Kernel's Llama patches applied
  by hand (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy), as a user assembles it today.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
from typing import Any, Callable

import torch


def liger_missing() -> str | None:
    """Why Liger-Kernel cannot be used here (None when it is importable)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "not installed: liger-kernel is not importable"
    return None


def _apply_liger(model: torch.nn.Module) -> None:
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(model=model)


def make_setups(setups: dict[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
    """The memory variants, built on bench_e2e's ``setup_ours`` / ``setup_ref``."""
    setup_ours, setup_ref = setups["ours"], setups["ref"]

    def saved(offload: Any, states: str = "fp32") -> Callable[[torch.nn.Module, argparse.Namespace], Any]:
        def setup(model: torch.nn.Module, args: argparse.Namespace) -> Any:
            from badam_ext import apply_memory_savings

            harness = setup_ours(model, args, states=states)
            layer_kernels = "auto" if os.environ.get("BADAM_LAYER_KERNELS", "auto") != "0" else False
            savings = apply_memory_savings(model, offload_checkpoints=offload, layer_kernels=layer_kernels,
                                           budget_gib=getattr(args, "budget_gib", None))
            harness.notes.update(memory_savings=savings.stats())
            harness.savings = savings  # the handle lives as long as the harness
            return harness
        return setup

    def liger(base: Callable[..., Any]) -> Callable[[torch.nn.Module, argparse.Namespace], Any]:
        def setup(model: torch.nn.Module, args: argparse.Namespace) -> Any:
            if why := liger_missing():
                raise RuntimeError(why)
            _apply_liger(model)
            harness = base(model, args)
            harness.notes.update(liger=True)
            return harness
        return setup

    return {"ours_saved": saved("auto"), "ours_saved_8bit": saved("auto", "8bit"), "ours_offload": saved(True),
            "ours_liger": liger(setup_ours), "ref_liger": liger(setup_ref)}
