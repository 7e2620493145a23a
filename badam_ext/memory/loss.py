"""The causal-LM training loss without (tokens x vocab) logits.

Two well-kept implementations of a fused linear + cross-entropy are used, never one of our own:

* ``"torch"``: ``torch.nn.functional.linear_cross_entropy`` with ``LinearCrossEntropyOptions`` (the
  chunked path, torch >= 2.13). It computes the weight gradient only when the head's weight requires
  grad, so a frozen lm_head (every BAdam block but the head's) costs no (vocab x hidden) gradient.
* ``"liger"``: Liger-Kernel's fused linear cross-entropy (the ``badam-ext[liger]`` extra), for older
  torch and for logit soft-capping (Gemma 2/3). It skips the weight gradient for a frozen head too.
  Its default chunking keeps a chunk's logits as small as the hidden states (64 tokens at 2 x 1024
  tokens of a 128K vocabulary), and every chunk reads the whole head weight twice: at 2 x 1024 that
  added 13 ms to an 8B step on the H200 (bench/RESULTS.md). :func:`liger_chunk_mem_const` picks its
  ``chunk_mem_const`` so that a chunk holds up to :data:`LOSS_CHUNK_BYTES` of logits instead.

:func:`causal_lm_loss` reproduces Hugging Face's ``ForCausalLMLoss`` exactly: labels shifted left by
one with ``ignore_index`` padding (or ``shift_labels`` as given), mean over the non-ignored tokens, or
a sum divided by ``num_items_in_batch`` when Trainer passes it for gradient accumulation.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Optional, Union

import torch
import torch.nn.functional as F

LOSS_BACKENDS = ("auto", "torch", "liger")
# fp32 logits of one chunk of torch's chunked path: torch's own heuristic sizes chunks from the
# hidden / vocab ratio, which for a small hidden size means chunks of a few tokens (slow on CPU).
LOSS_CHUNK_BYTES = 128 * 2 ** 20
# Logits of one chunk of Liger's path (activation dtype, the gradient is written in place): 1024
# tokens of a 128K vocabulary in bf16, enough rows for the head's matmuls to be compute-bound.
LIGER_CHUNK_BYTES = 256 * 2 ** 20


def _liger_chunk_rows(tokens: int, hidden: int, vocab: int, chunk_mem_const: int) -> int:
    """Liger-Kernel 0.8's chunk size for ``chunk_mem_const`` (ops/fused_linear_cross_entropy.py)."""
    inc_factor = -(-vocab // (chunk_mem_const * hidden))
    rows = 1 << max(0, (-(-tokens // inc_factor) - 1).bit_length())  # next power of two
    return min(rows, tokens)


@functools.lru_cache(maxsize=256)  # called every training step with the same few shapes
def liger_chunk_mem_const(tokens: int, hidden: int, vocab: int, element_size: int = 2,
                          chunk_bytes: int = LIGER_CHUNK_BYTES) -> int:
    """The ``chunk_mem_const`` whose chunks are the largest holding at most ``chunk_bytes`` of logits
    (never smaller chunks than Liger's default of 1)."""
    best, limit = 1, max(1, chunk_bytes // (vocab * element_size))
    for const in range(2, -(-vocab // hidden) + 1):
        rows = _liger_chunk_rows(tokens, hidden, vocab, const)
        if rows > limit:
            break
        best = const
    return best


def loss_chunk_rows(tokens: int, hidden: int, vocab: int, backend: str, element_size: int = 2) -> int:
    """Tokens per chunk of the fused loss (the planner sizes the loss's working set from it)."""
    if backend == "torch":
        return max(1, min(tokens, LOSS_CHUNK_BYTES // (4 * vocab)))
    const = liger_chunk_mem_const(tokens, hidden, vocab, element_size)
    return _liger_chunk_rows(tokens, hidden, vocab, const)


def torch_has_fused_loss() -> bool:
    """True when this torch has the chunked ``F.linear_cross_entropy`` (torch >= 2.13)."""
    return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def liger_available() -> bool:
    """True when Liger-Kernel is importable."""
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_backend(backend: str = "auto", *, softcap: Optional[float] = None) -> str:
    """The fused-loss implementation to use, or a clear error naming what to install."""
    if backend not in LOSS_BACKENDS:
        raise ValueError(f"unknown fused-loss backend {backend!r}; choose one of {LOSS_BACKENDS}")
    if backend == "torch":
        if not torch_has_fused_loss():
            raise RuntimeError(f"torch {torch.__version__} has no F.linear_cross_entropy (needs torch >= 2.13); "
                               "use backend='liger' (pip install 'badam-ext[liger]')")
        if softcap is not None:
            raise ValueError("torch's F.linear_cross_entropy has no logit soft-capping, which this model "
                             f"applies (final_logit_softcapping={softcap}); use backend='liger' "
                             "(pip install 'badam-ext[liger]') or fused_loss=False")
        return "torch"
    if backend == "liger":
        if not liger_available():
            raise RuntimeError("backend='liger' needs Liger-Kernel: pip install 'badam-ext[liger]'")
        return "liger"
    if softcap is None and torch_has_fused_loss():
        return "torch"
    if liger_available():
        return "liger"
    need = ("logit soft-capping (final_logit_softcapping) needs Liger-Kernel" if softcap is not None
            else f"torch {torch.__version__} has no F.linear_cross_entropy (torch >= 2.13)")
    raise RuntimeError(f"no fused cross-entropy available: {need}; install it with "
                       "pip install 'badam-ext[liger]', or pass fused_loss=False")


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                               reduction: str = "mean", ignore_index: int = -100,
                               softcap: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T, target)`` over 2-D ``hidden`` without the full logits."""
    name = resolve_backend(backend, softcap=softcap)
    if name == "torch":
        chunk = loss_chunk_rows(hidden.shape[0], hidden.shape[1], weight.shape[0], "torch")
        options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk, chunking_method=None)
        # Per-token losses, reduced in fp32: the op returns the input's dtype, and a bf16 mean (or a
        # bf16 sum divided by num_items_in_batch) would be off by up to 2^-8 where HF's loss is fp32.
        per_token = F.linear_cross_entropy(hidden, weight, target, reduction="none", ignore_index=ignore_index,
                                           options=options).float()
        if reduction == "sum":
            return per_token.sum()
        return per_token.sum() / (target != ignore_index).sum()
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    const = liger_chunk_mem_const(hidden.shape[0], hidden.shape[1], weight.shape[0], hidden.element_size())
    return liger_fused_linear_cross_entropy(hidden, weight, target, ignore_index=ignore_index,
                                            reduction=reduction, softcap=softcap, chunk_mem_const=const)


def shifted_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Hugging Face's next-token targets: ``labels[..., 1:]`` with ``ignore_index`` at the end."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: Optional[torch.Tensor], *,
                   num_items_in_batch: Union[torch.Tensor, int, None] = None, ignore_index: int = -100,
                   shift_labels: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                   backend: str = "auto") -> torch.Tensor:
    """Hugging Face's causal-LM loss from the last hidden states and the head's weight.

    Args:
        hidden: ``[..., S, H]`` final hidden states (after the final norm).
        weight: the lm_head weight ``[V, H]`` (gets a gradient only when it requires grad).
        labels: ``[..., S]`` token ids, ``ignore_index`` where no loss is wanted; shifted here.
        num_items_in_batch: Trainer's token count over the accumulated micro-batches: the loss is the
            sum over this micro-batch divided by it (HF semantics); None gives the mean.
        shift_labels: already shifted targets (HF's keyword), used instead of ``labels``.
        softcap: logit soft-capping ``cap * tanh(logits / cap)`` (Gemma 2/3), Liger only.
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss needs labels or shift_labels")
        shift_labels = shifted_labels(labels, ignore_index)
    if shift_labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels of shape {tuple(shift_labels.shape)} do not match hidden states of shape "
                         f"{tuple(hidden.shape)}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    target = shift_labels.reshape(-1).to(device=hidden.device, dtype=torch.long)
    if num_items_in_batch is None:
        return fused_linear_cross_entropy(flat_hidden, weight, target, reduction="mean",
                                          ignore_index=ignore_index, softcap=softcap, backend=backend)
    total = fused_linear_cross_entropy(flat_hidden, weight, target, reduction="sum",
                                       ignore_index=ignore_index, softcap=softcap, backend=backend)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
