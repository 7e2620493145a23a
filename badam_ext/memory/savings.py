"""``apply_memory_savings``: a fused loss and BAdam-aware checkpoint offload on one model."""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Optional, Union

import torch
from torch import nn

from ..compilation import layers_compiled
from ..pruning import checkpointing_info
from .causal_lm import FusedLossPatch, UnsupportedModelError
from .layer_kernels import LAYER_KERNEL_CHOICES, LayerKernelsPatch, why_unavailable
from .offload import DEFAULT_MIN_BYTES, CheckpointOffloader
from .planner import GIB, ModelShape, checkpoint_host_bytes, model_shape, plan_memory

logger = logging.getLogger("badam_ext")
OFFLOAD_CHOICES = ("auto", True, False)
_HANDLE_ATTR = "_badam_memory_savings"
_MAX_DECISIONS = 64


def device_budget_gib(device: torch.device) -> Optional[float]:
    """What torch may allocate on ``device``: its memory times the per-process fraction (None on CPU)."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = float(get_fraction(device)) if callable(get_fraction) else 1.0
    return total * min(fraction, 1.0) / GIB


class MemorySavings:
    """What :func:`apply_memory_savings` installed; :meth:`remove` undoes all of it.

    Attributes:
        loss: the fused-loss patch (None when off).
        layers: the layer-kernels patch (None when off).
        offloader: the checkpoint offloader (None when off).
        decisions: ``(batch, seq, states, master) -> bool``, what ``"auto"`` chose per input shape and
            optimizer-state format.
    """

    def __init__(self, model: nn.Module, *, fused_loss: bool, offload_checkpoints: Union[bool, str],
                 budget_gib: Optional[float], loss_backend: str, min_offload_bytes: int,
                 batch_size: Optional[int], seq_len: Optional[int], layer_kernels: Union[bool, str] = False) -> None:
        if layer_kernels not in LAYER_KERNEL_CHOICES:
            raise ValueError(f"layer_kernels must be 'auto', True or False, got {layer_kernels!r}")
        if offload_checkpoints not in OFFLOAD_CHOICES:
            raise ValueError(f"offload_checkpoints must be 'auto', True or False, got {offload_checkpoints!r}")
        if budget_gib is not None and not budget_gib > 0:
            raise ValueError(f"budget_gib must be > 0, got {budget_gib!r}")
        if getattr(model, _HANDLE_ATTR, None) is not None:
            raise ValueError("apply_memory_savings was already applied to this model; call .remove() on its "
                             "handle (model._badam_memory_savings) first")
        self.model = model
        self.device = next(model.parameters()).device
        self.mode = offload_checkpoints
        self.budget_gib = budget_gib if budget_gib is not None else device_budget_gib(self.device)
        self.decisions: "OrderedDict[tuple[int, int, str, bool], bool]" = OrderedDict()
        self._shape = None
        self.loss: Optional[FusedLossPatch] = None
        self.layers: Optional[LayerKernelsPatch] = None
        self.offloader: Optional[CheckpointOffloader] = None
        try:
            self.loss = FusedLossPatch(model, loss_backend) if fused_loss else None
            if layer_kernels is True:
                self.layers = LayerKernelsPatch(model)
            elif layer_kernels == "auto":
                why = why_unavailable(model)
                if why is None:
                    self.layers = LayerKernelsPatch(model)
                else:
                    logger.info("memory savings: Hugging Face's own layers (%s)", why)
            if offload_checkpoints is not False and layers_compiled(model):
                if offload_checkpoints is True:
                    raise ValueError("offload_checkpoints=True cannot run with compile_layers: its checkpoints "
                                     "belong to the compiled layers; pass offload_checkpoints=False")
                logger.info("memory savings: no checkpoint offload (the layers are compiled by compile_layers)")
                self.mode = False
            elif offload_checkpoints is not False:
                reserve = 0
                if batch_size and seq_len and self._wants_offload(batch_size, seq_len):
                    reserve = checkpoint_host_bytes(model, batch_size, seq_len)
                self.offloader = CheckpointOffloader(model, reserve_bytes=reserve, min_bytes=min_offload_bytes)
        except BaseException:
            for patch in (self.layers, self.loss):  # a failed set-up leaves the model as it was
                if patch is not None:
                    patch.remove()
            raise
        self._hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        setattr(model, _HANDLE_ATTR, self)

    def _wants_offload(self, batch: int, seq: int) -> bool:
        if self.mode != "auto":
            return bool(self.mode)
        if self.budget_gib is None:
            return False  # no device budget to protect (CPU)
        states, master = self._state_format()  # the optimizer may come (or change) after the first plan
        key = (batch, seq, states, master)
        if key in self.decisions:  # every step after the first of a shape: no walk over the modules
            self.decisions.move_to_end(key)
            return self.decisions[key]
        if not checkpointing_info(self.model).enabled:
            return False  # nothing checkpointed to offload (not remembered: Trainer may enable it later)
        plan = plan_memory(self.model.config, batch_size=batch, seq_len=seq, budget_gib=self.budget_gib,
                           fused_loss=self.loss is not None, offload="auto", shape=self._model_shape(),
                           limits=False, layer_kernels=self.layers is not None, loss_backend=self._loss_backend(),
                           states=states, master=master)
        needed = bool(plan.auto_offload)
        logger.info("memory savings: %d x %d tokens, predicted peak %.2f GiB of %.2f: offload %s",
                    batch, seq, plan.peak_bytes / GIB, self.budget_gib, "on" if needed else "off")
        self.decisions[key] = needed
        if len(self.decisions) > _MAX_DECISIONS:  # dynamic padding: keep the recent shapes only
            self.decisions.popitem(last=False)
        return needed

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.offloader is None:
            return
        self.offloader.refresh()  # Trainer may have (re-)enabled checkpointing since
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2 or not (module.training and torch.is_grad_enabled()):
            self.offloader.active = False
            return
        batch, seq = int(tokens.shape[0]), int(tokens.shape[1])
        self.offloader.active = self._wants_offload(batch, seq)
        if self.offloader.active:
            self.offloader.begin_forward(checkpoint_host_bytes(self.model, batch, seq))

    def _state_format(self) -> tuple[str, bool]:
        """The arena format of the BlockAdam training this model (fp32 with a master if none is open)."""
        from ..optimizer import _owner

        for p in self.model.parameters():  # an open BlockAdam claims every parameter: the first answers
            opt = _owner(p)
            if opt is not None:
                entry = opt._states_entry()
                return entry["states"], entry["master"]
        return "fp32", True

    def _model_shape(self) -> ModelShape:
        if self._shape is None:
            self._shape = model_shape(self.model.config, dtype=next(self.model.parameters()).dtype)
        return self._shape

    def _loss_backend(self) -> str:
        return self.loss.backend if self.loss is not None else "auto"

    def _planned_loss_bytes(self) -> Optional[int]:
        """The planner's loss working set for the last fused call's token count."""
        if self.loss is None or not self.loss.tokens:
            return None
        from .planner import loss_bytes

        head_trainable = self.model.get_output_embeddings().weight.requires_grad
        return loss_bytes(self._model_shape(), self.loss.tokens, fused=True, head_trainable=head_trainable,
                          layer_kernels=self.layers is not None, backend=self.loss.backend)

    def stats(self) -> dict[str, Any]:
        """Fused-loss calls and offload figures, for logs and the profiler."""
        out: dict[str, Any] = {"fused_loss": self.loss is not None, "offload_mode": self.mode,
                               "budget_gib": self.budget_gib, "layer_kernels": self.layers is not None}
        if self.layers is not None:
            out.update(self.layers.stats())
        if self.loss is not None:
            out.update(loss_backend=self.loss.backend, fused_loss_calls=self.loss.calls,
                       loss_held_bytes=self.loss.held_bytes, loss_planned_bytes=self._planned_loss_bytes())
        if self.offloader is not None:
            out.update(self.offloader.stats())
        return out

    def remove(self) -> None:
        """Restore the model's forward and checkpoint functions; free the host buffer."""
        self._hook.remove()
        if getattr(self.model, _HANDLE_ATTR, None) is self:
            delattr(self.model, _HANDLE_ATTR)
        if self.loss is not None:
            self.loss.remove()
        if self.layers is not None:
            self.layers.remove()
        if self.offloader is not None:
            self.offloader.remove()


def apply_memory_savings(model: nn.Module, *, fused_loss: bool = True,
                         offload_checkpoints: Union[bool, str] = "auto", budget_gib: Optional[float] = None,
                         loss_backend: str = "auto", min_offload_bytes: int = DEFAULT_MIN_BYTES,
                         batch_size: Optional[int] = None, seq_len: Optional[int] = None,
                         layer_kernels: Union[bool, str] = "auto") -> MemorySavings:
    """Shrink a Hugging Face causal LM's training-step memory; returns a handle with ``.remove()``.

    Args:
        model: a ``*ForCausalLM`` (Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, ...), tied or untied.
        fused_loss: compute the training loss with a fused linear cross-entropy (no tokens x vocab
            logits); gradients reach the lm_head only when it requires grad (its block is active).
        offload_checkpoints: move gradient-checkpointed layer inputs to pinned host memory during
            forward (``True``), never (``False``), or when the memory plan says the step would not fit
            the budget otherwise (``"auto"``, decided once per input shape). Needs gradient
            checkpointing to matter; layers below the active block save nothing either way.
        budget_gib: the device memory the step may use (default: the device's memory times torch's
            per-process fraction; none on CPU, where ``"auto"`` stays off).
        loss_backend: ``"auto"`` (torch's ``linear_cross_entropy`` on torch >= 2.13, else
            Liger-Kernel), ``"torch"`` or ``"liger"``.
        min_offload_bytes: saved tensors below this size stay on the device.
        batch_size, seq_len: the expected step shape, to allocate the host buffer now instead of at
            the first offloaded step.
        layer_kernels: run the decoder's RMSNorms and SwiGLU MLPs with Liger-Kernel's kernels (less
            recompute memory per token, fewer launches; gradients differ from Hugging Face's in the
            last bf16 bit). ``"auto"``: where they apply (Llama, Mistral, Qwen2/3 on CUDA with
            Liger-Kernel installed); ``True`` raises where they do not.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_memory_savings expects an nn.Module, got {type(model).__name__}")
    return MemorySavings(model, fused_loss=fused_loss, offload_checkpoints=offload_checkpoints,
                         budget_gib=budget_gib, loss_backend=loss_backend, min_offload_bytes=min_offload_bytes,
                         batch_size=batch_size, seq_len=seq_len, layer_kernels=layer_kernels)


def default_memory_savings(model: nn.Module, **options: Any) -> MemorySavings:
    """What the CLI and the Trainer helper turn on by default: :func:`apply_memory_savings` with
    ``options``, reusing a handle already on the model, and without the fused loss (with a warning)
    for an architecture it does not support."""
    existing = getattr(model, _HANDLE_ATTR, None)
    if existing is not None:
        return existing
    try:
        return apply_memory_savings(model, **options)
    except UnsupportedModelError as exc:  # only the fused loss was refused: keep the rest
        logger.warning("memory savings: training with the model's own loss (%s)", exc)
        return apply_memory_savings(model, **{**options, "fused_loss": False})
