"""Leaner decoder layers: Liger-Kernel's RMSNorm and SwiGLU autograd functions, patched per instance.

Under gradient checkpointing every layer runs its forward twice and keeps, during its backward, what
autograd saved in the recompute. Hugging Face's Llama-style RMSNorm saves an fp32 copy of its input
and its SwiGLU MLP saves three intermediate-size tensors (``gate``, ``silu(gate)``, ``up``), then
allocates three more gradients of that size in backward: about 240 KB per token for the Llama-3-8B
shape. Liger-Kernel's ``LigerRMSNormFunction`` saves the input and one fp32 scale per row, and
``LigerSiLUMulFunction`` saves ``gate`` and ``up`` and writes their gradients in place; each is one
Triton kernel where Hugging Face launches several.

The patch replaces ``forward`` on the module instances only (``LigerRMSNorm.forward`` and
``LigerSwiGLUMLP.forward`` are not bound; Liger's own ``apply_liger_kernel_to_*`` also swaps module
globals, which would reach every other model of the process). :meth:`LayerKernelsPatch.remove`
restores the modules. Numerics: Liger's kernels round like Hugging Face's forward (the RMSNorm's
``"llama"`` casting mode) but compute in fp32 registers, so gradients differ from Hugging Face's in
the last bf16 bit of some elements.
"""
from __future__ import annotations

import importlib.util
import types
from typing import Any, Callable, Optional

import torch
from torch import nn

# Architectures whose RMSNorm is Llama's (weight * normalized, eps inside the rsqrt, only the
# normalization in fp32) and whose MLP is down(silu(gate(x)) * up(x)).
LAYER_KERNEL_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
LAYER_KERNEL_CHOICES = ("auto", True, False)


class LayerKernelsUnavailable(RuntimeError):
    """The layer kernels cannot be used for this model or on this machine."""


def why_unavailable(model: nn.Module) -> Optional[str]:
    """Why the layer kernels cannot serve ``model`` here (None when they can)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYER_KERNEL_MODEL_TYPES:
        return (f"layer kernels: model type {model_type!r} is not one with Llama's RMSNorm and SwiGLU MLP "
                f"(supported: {sorted(LAYER_KERNEL_MODEL_TYPES)})")
    if importlib.util.find_spec("liger_kernel") is None:
        return "layer kernels need Liger-Kernel: pip install 'badam-ext[liger]'"
    device = next(model.parameters()).device
    if device.type != "cuda":
        return f"layer kernels run on CUDA (Liger-Kernel's Triton kernels), the model is on {device.type}"
    return None


def _liger_functions() -> tuple[Callable[..., Any], Callable[..., Any]]:
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return LigerRMSNormFunction.apply, LigerSiLUMulFunction.apply


def _is_llama_rms_norm(module: nn.Module) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor)
            and module.weight.dim() == 1 and hasattr(module, "variance_epsilon"))


def _is_swiglu_mlp(module: nn.Module, hidden_act: Optional[str]) -> bool:
    return (hidden_act in ("silu", "swish")
            and all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")))


class LayerKernelsPatch:
    """Liger's RMSNorm / SwiGLU functions in every matching module of ``model``; :meth:`remove` undoes it.

    Args:
        model: a Llama-family causal LM (see :data:`LAYER_KERNEL_MODEL_TYPES`) on a CUDA device.
        functions: ``(rms_norm, silu_mul)`` with the signatures of ``LigerRMSNormFunction.apply`` and
            ``LigerSiLUMulFunction.apply``; Liger's by default (tests pass stand-ins).
    """

    def __init__(self, model: nn.Module, functions: Optional[tuple[Callable[..., Any], Callable[..., Any]]] = None):
        if functions is None:
            if why := why_unavailable(model):
                raise LayerKernelsUnavailable(why)
            functions = _liger_functions()
        rms_norm, silu_mul = functions
        hidden_act = getattr(model.config, "hidden_act", None)
        self.norms: list[nn.Module] = []
        self.mlps: list[nn.Module] = []
        self._installed: dict[int, Any] = {}

        def norm_forward(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
            # in_place=False: dY may be read again by the residual branch's gradient
            return rms_norm(hidden_states, module.weight, module.variance_epsilon, 0.0, "llama", False)

        def mlp_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return module.down_proj(silu_mul(module.gate_proj(x), module.up_proj(x)))

        for module in model.modules():
            if "forward" in module.__dict__:
                continue  # someone patched this instance already: leave it alone
            if _is_llama_rms_norm(module):
                self._install(module, norm_forward)
                self.norms.append(module)
            elif _is_swiglu_mlp(module, hidden_act):
                self._install(module, mlp_forward)
                self.mlps.append(module)
        if not self.norms and not self.mlps:
            raise LayerKernelsUnavailable(f"layer kernels: no Llama-style RMSNorm or SwiGLU MLP in {type(model).__name__}")

    def _install(self, module: nn.Module, forward: Callable[..., Any]) -> None:
        bound = types.MethodType(forward, module)
        module.forward = bound
        self._installed[id(module)] = bound

    def remove(self) -> None:
        """Give every patched module its class's forward back."""
        for module in (*self.norms, *self.mlps):
            if module.__dict__.get("forward") is self._installed.get(id(module)):
                del module.forward
        self.norms, self.mlps, self._installed = [], [], {}

    def stats(self) -> dict[str, int]:
        return {"layer_kernel_norms": len(self.norms), "layer_kernel_mlps": len(self.mlps)}
