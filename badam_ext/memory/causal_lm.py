"""Make a Hugging Face causal LM compute its training loss with a fused linear cross-entropy.

The model's ``forward`` is replaced on the instance (the class is untouched): in training mode with
``labels``, it runs the decoder, then :func:`~badam_ext.memory.loss.causal_lm_loss` on the last
hidden states and the lm_head weight, and returns ``logits=None``. Without labels, in eval mode, or
with ``logits_to_keep`` it calls the original forward (generation and metrics keep their logits).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional

import torch
from torch import nn

from .loss import causal_lm_loss, resolve_backend

# Architectures whose head is a plain bias-free linear map of the decoder's last hidden state (plus
# an optional final soft-cap): the fused loss computes exactly what their forward would.
SUPPORTED_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
})
# Not listed on purpose: mixture-of-experts models (Mixtral, Qwen2/3-MoE) add a router auxiliary loss
# in their forward, which this path would drop.# Keyword arguments of Hugging Face's loss function, not of the decoder.
_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def model_softcap(model: nn.Module) -> Optional[float]:
    """The model's final logit soft-cap (Gemma 2/3), or None."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    return None if cap in (None, 0) else float(cap)


class UnsupportedModelError(ValueError):
    """The fused loss would not compute what this model's own forward computes."""


def check_supported(model: nn.Module) -> None:
    """Raise unless the fused loss computes exactly what ``model``'s own forward computes."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"fused_loss: model type {model_type!r} ({type(model).__name__}) is not one whose head is known to be "
            f"a plain linear map; supported: {sorted(SUPPORTED_MODEL_TYPES)}. Pass fused_loss=False")
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise UnsupportedModelError(f"fused_loss: the output head of {type(model).__name__} is not a bias-free "
                                    "nn.Linear")
    if getattr(model, "get_decoder", None) is None:
        raise UnsupportedModelError(f"fused_loss: {type(model).__name__} has no get_decoder()")


class FusedLossPatch:
    """Replaces ``model.forward`` on the instance; :meth:`remove` puts the original back.

    Args:
        model: a Hugging Face ``*ForCausalLM`` of a supported architecture.
        backend: ``"auto"``, ``"torch"`` or ``"liger"`` (see :mod:`badam_ext.memory.loss`).
    """

    def __init__(self, model: nn.Module, backend: str = "auto") -> None:
        check_supported(model)
        self.model = model
        self.softcap = model_softcap(model)
        self.backend = resolve_backend(backend, softcap=self.softcap)
        self.calls = 0  # training forwards that took the fused path
        self.held_bytes: Optional[int] = None  # device bytes the loss kept for backward, last call (CUDA)
        self.tokens = 0  # tokens of the last call
        self._had_instance_forward = "forward" in model.__dict__
        self._original: Callable[..., Any] = model.forward
        self._signature = inspect.signature(self._original)

        # Carries the original signature: Trainer keeps the dataset columns the forward names, and
        # checks whether it takes loss kwargs (num_items_in_batch).
        @functools.wraps(self._original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._forward(*args, **kwargs)

        self._installed = forward
        model.forward = forward

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = self._signature.bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        extra = dict(arguments.pop("kwargs", {}) or {})
        labels = arguments.pop("labels", None)
        keep = arguments.get("logits_to_keep", 0)
        sliced = isinstance(keep, torch.Tensor) or keep not in (0, None)
        custom_loss = "_loss_function" in self.model.__dict__  # model.loss_function = f: the user's own loss
        if (labels is None or not self.model.training or sliced or custom_loss
                or extra.get("fused_lm_head")):  # TRL's SFTTrainer asks for its own fused head: leave it that
            return self._original(*args, **kwargs)
        arguments.pop("logits_to_keep", None)
        return_dict = arguments.pop("return_dict", extra.pop("return_dict", None))
        if return_dict is None:
            return_dict = getattr(self.model.config, "return_dict", True)
        loss_kwargs = {k: extra.pop(k) for k in _LOSS_KWARGS if k in extra}
        outputs = self.model.get_decoder()(**arguments, **extra)
        hidden = outputs[0]
        before = torch.cuda.memory_allocated(hidden.device) if hidden.is_cuda else None
        loss = causal_lm_loss(hidden, self.model.get_output_embeddings().weight, labels, softcap=self.softcap,
                              backend=self.backend, **loss_kwargs)
        if before is not None:
            self.held_bytes = torch.cuda.memory_allocated(hidden.device) - before
        self.tokens = hidden.numel() // hidden.shape[-1]
        self.calls += 1
        from transformers.modeling_outputs import CausalLMOutputWithPast

        out = CausalLMOutputWithPast(
            loss=loss, logits=None, past_key_values=getattr(outputs, "past_key_values", None),
            hidden_states=getattr(outputs, "hidden_states", None), attentions=getattr(outputs, "attentions", None))
        return out if return_dict else out.to_tuple()

    def remove(self) -> None:
        """Restore the model's own forward."""
        if self.model.__dict__.get("forward") is self._installed:
            if self._had_instance_forward:
                self.model.forward = self._original
            else:
                del self.model.forward
