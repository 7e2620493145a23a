"""Predict a BAdam training step's peak device memory from a model config alone.

The model is built on the meta device (shapes, no weights) and partitioned as BlockAdam would. For
every block the peak allocated memory is the static part (weights, the arena, runtime buffers) plus
the largest of three moments of a step (``T = batch x seq`` tokens, ``a`` the activation dtype's size):

* ``forward``: the checkpointed layer inputs saved so far (``T x hidden x a`` per layer at or above the
  lowest trainable one; one with offload) plus one layer's forward transients (its MLP
  intermediates), or the loss's working set if that is larger;
* ``backward (top)``: backward has just entered the top layer: every checkpoint is still held (two
  with offload: the one unpacked, the one prefetched), plus a frozen layer's recompute working set
  and the incoming gradient;
* ``backward (active)``: the lowest trainable layer's recompute working set, or, once its
  activations are freed, the block's gradients plus what is left of them.

The per-token coefficients were fitted to peak allocated memory measured on an H200 (Llama-3-8B
shape, 2 x 1024 to 1 x 32768 tokens; bench/RESULTS.md "Memory planner"). Hugging Face's unfused
loss holds the bf16 logits, their fp32 copy and fp32 gradients: ``T x vocab x (2a + 8)``.

Nothing here reads weights; :func:`plan_memory` takes a ``PretrainedConfig``, a ``config.json`` path,
a checkpoint folder or a dict.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

GIB = 2 ** 30
# Per-token working sets of one decoder layer, in activation elements per unit of hidden /
# intermediate size (fitted on an H200, bench/RESULTS.md): the recompute + backward of a layer, and
# the transients of a checkpointed layer's forward.
RECOMPUTE_PER_HIDDEN = 12.0
RECOMPUTE_PER_INTERMEDIATE = 5.0
FORWARD_PER_HIDDEN = 1.5
FORWARD_PER_INTERMEDIATE = 3.5
# The same with the layer kernels (Liger-Kernel's RMSNorm and SwiGLU, badam_ext.memory.layer_kernels):
# no fp32 copies in the norms, two saved MLP intermediates with in-place gradients.
LEAN_RECOMPUTE_PER_HIDDEN = 8.0
LEAN_RECOMPUTE_PER_INTERMEDIATE = 2.5
LEAN_FORWARD_PER_INTERMEDIATE = 2.5
# With offload and the layer kernels, the top of backward holds about four layer inputs more than the
# two the offloader keeps (H200, 1 x 8192 to 1 x 24576: 0.30 to 0.68 GiB above the plan without it).
LEAN_OFFLOAD_EXTRA_INPUTS = 4
# A frozen layer above the active one saves a little less (no inputs of weight gradients).
FROZEN_RECOMPUTE_FRACTION = 0.93
# When the active layer's gradients exist, this share of its recompute working set is still alive.
GRAD_TAIL_FRACTION = 0.39
# Allocator slack between allocated and reserved memory that a fit must leave inside the budget
# (H200, 23 GiB cap: 18432 tokens fit at 21.87 GiB allocated, 20480 failed at 22.35).
DEFAULT_FRAGMENTATION_GIB = 1.0
# cuBLAS workspaces, rotary tables, masks and other step-independent buffers.
RUNTIME_BYTES = 64 * 2 ** 20


@dataclass
class ModelShape:
    """What the planner needs from a config."""

    model_type: str
    num_layers: int
    hidden: int
    intermediate: int
    vocab: int
    tied: bool
    param_bytes: int
    dtype_bytes: int
    layer_numels: list[list[int]]  # per block: the numels of its tensors
    block_names: list[str]
    block_layers: list[Optional[int]]  # the lowest layer each block trains (None: no layer)
    block_kinds: list[str]  # "layer", "embedding", "lm_head", "other"


@dataclass
class BlockPlan:
    """The predicted peak of one block as active block, split into its parts (bytes)."""

    index: int
    name: str
    weights: int
    arena: int
    grads: int
    checkpoints: int
    recompute: int
    loss: int
    runtime: int
    peak: int
    peak_at: str

    def gib(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("weights", "arena", "grads", "checkpoints", "recompute", "loss", "runtime", "peak"):
            out[key] = round(out[key] / GIB, 3)
        return out


@dataclass
class MemoryPlan:
    """The plan of one configuration: per-block peaks, the worst block, fits and limits."""

    model_type: str
    batch_size: int
    seq_len: int
    fused_loss: bool
    offload: bool
    budget_bytes: Optional[int]
    fragmentation_bytes: int
    blocks: list[BlockPlan]
    limits: dict[str, Any] = field(default_factory=dict)
    auto_offload: Optional[bool] = None
    layer_kernels: bool = False
    loss_backend: str = "liger"
    states: str = "fp32"
    master: bool = True

    @property
    def worst(self) -> BlockPlan:
        return max(self.blocks, key=lambda b: b.peak)

    @property
    def peak_bytes(self) -> int:
        return self.worst.peak

    @property
    def fits(self) -> Optional[bool]:
        if self.budget_bytes is None:
            return None
        return self.peak_bytes + self.fragmentation_bytes <= self.budget_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type, "batch_size": self.batch_size, "seq_len": self.seq_len,
            "fused_loss": self.fused_loss, "offload": self.offload, "layer_kernels": self.layer_kernels,
            "loss_backend": self.loss_backend, "states": self.states, "master": self.master,
            "budget_gib": None if self.budget_bytes is None else self.budget_bytes / GIB,
            "fragmentation_gib": self.fragmentation_bytes / GIB,
            "peak_gib": round(self.peak_bytes / GIB, 3), "worst_block": self.worst.index, "fits": self.fits,
            "auto_offload": self.auto_offload, "limits": self.limits,
            "blocks": [b.gib() for b in self.blocks],
        }


# ------------------------------------------------------------------------------------ the model
def load_config(config: Any):
    """A ``PretrainedConfig`` from a config object, a dict, a ``config.json`` path or a folder."""
    import transformers

    if isinstance(config, transformers.PretrainedConfig):
        return config
    if isinstance(config, dict):
        data = dict(config)
    elif isinstance(config, (str, Path)):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no model config at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
    else:
        raise TypeError(f"config must be a PretrainedConfig, a dict or a path, got {type(config).__name__}")
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"config {config!r} has no 'model_type': not a Hugging Face model config")
    model_type = data.pop("model_type")
    try:
        return transformers.AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"transformers cannot read a config of model_type {model_type!r}: {exc}") from None


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def model_shape(config: Any, *, dtype: torch.dtype = torch.bfloat16, include_embedding: bool = False,
                include_lm_head: bool = False) -> ModelShape:
    """Build the model on the meta device and partition it as BlockAdam does by default."""
    import transformers

    from ..introspection import find_layer_container, layer_index_map
    from ..partition import infer_partition

    config = load_config(config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    badam_logger = logging.getLogger("badam_ext")
    level = badam_logger.level
    badam_logger.setLevel(logging.ERROR)  # the partition's notes (a frozen final norm) are BlockAdam's to print
    try:
        partition = infer_partition(model, include_embedding=include_embedding, include_lm_head=include_lm_head)
    finally:
        badam_logger.setLevel(level)
    layer_of = layer_index_map(model, find_layer_container(model))
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_weight = head.weight if head is not None else None
    numels, names, lowest, kinds = [], [], [], []
    for i, block in enumerate(partition.blocks):
        tensors = [p for _, p in partition.trainable_params(i)]
        numels.append([t.numel() for t in tensors])
        names.append(block.name)
        layers = [layer_of[id(t)] for t in tensors if id(t) in layer_of]
        if any(t is emb for t in tensors):
            lowest.append(-1)  # the embedding: backward runs through every layer
            kinds.append("embedding")
        elif layers:
            lowest.append(min(layers))
            kinds.append("layer")
        else:
            lowest.append(None)
            kinds.append("lm_head" if any(t is head_weight for t in tensors) else "other")
    text = _text_config(config)
    return ModelShape(
        model_type=str(config.model_type), num_layers=int(text.num_hidden_layers), hidden=int(text.hidden_size),
        intermediate=int(getattr(text, "intermediate_size", 4 * text.hidden_size)), vocab=int(text.vocab_size),
        tied=emb is head_weight, param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        dtype_bytes=torch.empty((), dtype=dtype).element_size(), layer_numels=numels, block_names=names,
        block_layers=lowest, block_kinds=kinds)


# ------------------------------------------------------------------------------------- the terms
def _align(n: int, to: int = 512) -> int:
    return (n + to - 1) // to * to


def arena_bytes(shape: ModelShape, states: str = "fp32", master: bool = True) -> int:
    """BlockAdam's arena for the largest block in the state format ``states`` (``BlockAdam(states=,
    master=)``): 12 bytes per parameter for fp32, about 6 for "8bit"; the arena's spec counts them."""
    from ..arena import required_capacity
    from ..states import state_spec

    spec = state_spec(states, master)
    return max(spec.bytes(required_capacity(n, spec)) for n in shape.layer_numels)


def recompute_bytes(shape: ModelShape, tokens: int, trainable: bool, layer_kernels: bool = False) -> int:
    """One layer's recompute + backward working set (its input excluded)."""
    if layer_kernels:
        per_token = LEAN_RECOMPUTE_PER_HIDDEN * shape.hidden + LEAN_RECOMPUTE_PER_INTERMEDIATE * shape.intermediate
    else:
        per_token = RECOMPUTE_PER_HIDDEN * shape.hidden + RECOMPUTE_PER_INTERMEDIATE * shape.intermediate
    return int(tokens * per_token * shape.dtype_bytes * (1.0 if trainable else FROZEN_RECOMPUTE_FRACTION))


def forward_bytes(shape: ModelShape, tokens: int, layer_kernels: bool = False) -> int:
    """The transients of one checkpointed layer's forward (nothing of it is kept)."""
    per_intermediate = LEAN_FORWARD_PER_INTERMEDIATE if layer_kernels else FORWARD_PER_INTERMEDIATE
    per_token = FORWARD_PER_HIDDEN * shape.hidden + per_intermediate * shape.intermediate
    return int(tokens * per_token * shape.dtype_bytes)


def planned_loss_backend(backend: str = "auto") -> str:
    """The fused-loss implementation a run here would use ("auto": torch's where it exists, else
    Liger-Kernel's, installed or not: the plan does not need it)."""
    from .loss import LOSS_BACKENDS, torch_has_fused_loss

    if backend not in LOSS_BACKENDS:
        raise ValueError(f"unknown fused-loss backend {backend!r}; choose one of {LOSS_BACKENDS}")
    if backend == "auto":
        return "torch" if torch_has_fused_loss() else "liger"
    return backend


def loss_bytes(shape: ModelShape, tokens: int, fused: bool, head_trainable: bool, layer_kernels: bool = False,
               backend: str = "auto") -> int:
    """The loss's working set (its saved state and buffers, the final norm's included)."""
    from .loss import loss_chunk_rows

    a = shape.dtype_bytes
    # the final norm's output and what it saves: its fp32 input (Hugging Face's), its input (Liger's)
    final_norm = tokens * shape.hidden * (2 * a if layer_kernels else a + 4)
    if not fused:
        return final_norm + tokens * shape.vocab * (2 * a + 8)
    backend = planned_loss_backend(backend)
    chunk = loss_chunk_rows(tokens, shape.hidden, shape.vocab, backend, a)
    if backend == "torch":  # the gradient for the hidden states (fp32), a chunk of fp32 logits and its gradient
        work = final_norm + tokens * shape.hidden * 4 + 2 * chunk * shape.vocab * 4
    else:  # Liger: the hidden states' gradient, a chunk of logits (its gradient in place), fp32 losses
        work = final_norm + tokens * shape.hidden * a + chunk * shape.vocab * a + tokens * 4
    if head_trainable:
        work += shape.vocab * shape.hidden * a  # the head's gradient (Liger computes it during forward)
    return work


def plan_block(shape: ModelShape, index: int, *, batch_size: int, seq_len: int, fused_loss: bool,
               offload: bool, gradient_checkpointing: bool = True, layer_kernels: bool = False,
               loss_backend: str = "auto", states: str = "fp32", master: bool = True) -> BlockPlan:
    """The predicted peak of block ``index`` as the active block (see the module doc for the moments)."""
    tokens = batch_size * seq_len
    a = shape.dtype_bytes
    layer_input = _align(tokens * shape.hidden * a)
    grads = sum(_align(n * a) for n in shape.layer_numels[index])
    lowest, kind = shape.block_layers[index], shape.block_kinds[index]
    saving = 0 if lowest is None else shape.num_layers - max(lowest, 0)  # layers that save their input
    head_trainable = kind == "lm_head" or (kind == "embedding" and shape.tied)
    loss = loss_bytes(shape, tokens, fused_loss, head_trainable, layer_kernels, loss_backend)
    frozen = recompute_bytes(shape, tokens, trainable=False, layer_kernels=layer_kernels)
    active = recompute_bytes(shape, tokens, trainable=kind == "layer", layer_kernels=layer_kernels)
    if not gradient_checkpointing:  # every saving layer keeps its whole working set
        held_fwd = held_top = saving * frozen
    elif offload:
        extra = LEAN_OFFLOAD_EXTRA_INPUTS if layer_kernels else 0
        held_fwd, held_top = min(saving, 1) * layer_input, min(saving, 2 + extra) * layer_input
    else:
        held_fwd = held_top = saving * layer_input
    # moment -> (grads, checkpoints, recompute, loss)
    moments: dict[str, tuple[int, int, int, int]] = {}
    transient = max(forward_bytes(shape, tokens, layer_kernels), loss)
    moments["forward"] = (0, held_fwd, 0, transient)
    if lowest is None:  # a head-only block: the loss backward is the whole backward
        moments["backward (active)"] = (grads, 0, 0, loss)
    else:
        # a trainable head (its own block, or tied to a trained embedding) holds its gradient from the
        # loss on through the whole backward
        head_grad = shape.vocab * shape.hidden * a if head_trainable else 0
        if saving > 1 or kind != "layer":
            moments["backward (top)"] = (head_grad, held_top, frozen + layer_input, 0)
        held_low = min(saving, 1) * layer_input if gradient_checkpointing else held_top
        tail = int(GRAD_TAIL_FRACTION * active)
        moments["backward (active)"] = (0, held_low, active, 0) if active >= grads + tail \
            else (grads, held_low, tail, 0)
    at = max(moments, key=lambda k: sum(moments[k]))
    g, c, r, l_ = moments[at]
    weights, arena = shape.param_bytes, arena_bytes(shape, states, master)
    return BlockPlan(index=index, name=shape.block_names[index], weights=weights, arena=arena, grads=g,
                     checkpoints=c, recompute=r, loss=l_, runtime=RUNTIME_BYTES,
                     peak=weights + arena + RUNTIME_BYTES + g + c + r + l_, peak_at=at)


def _largest(fits: Any, count: int) -> int:
    """The largest ``k`` in ``[0, count]`` with ``fits(k)``, for a ``fits`` that turns false once."""
    lo, hi = 0, count
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_memory(config: Any, *, batch_size: int = 1, seq_len: int = 2048, budget_gib: Optional[float] = None,
                fused_loss: bool = True, offload: Union[bool, str] = "auto", gradient_checkpointing: bool = True,
                include_embedding: bool = False, include_lm_head: bool = False,
                dtype: torch.dtype = torch.bfloat16, fragmentation_gib: float = DEFAULT_FRAGMENTATION_GIB,
                shape: Optional[ModelShape] = None, limits: bool = True, layer_kernels: bool = False,
                loss_backend: str = "auto", states: str = "fp32", master: bool = True) -> MemoryPlan:
    """Plan a BlockAdam step of ``batch_size x seq_len`` tokens for the model of ``config``.

    Args:
        offload: True / False, or ``"auto"``: on only when the step does not fit ``budget_gib``
            without it (off when no budget is given).
        budget_gib: the memory the process may use (23 for a 24 GB card); enables ``fits``, the
            longest-sequence and largest-batch limits and the ``"auto"`` choice.
        fragmentation_gib: slack between allocated and reserved memory kept inside the budget.
        layer_kernels: the layers run Liger-Kernel's RMSNorm and SwiGLU (``apply_memory_savings``'s
            ``layer_kernels``), which shrink every layer's recompute working set.
        loss_backend: the fused loss's implementation (``"auto"``: what this machine would use).
        states, master: BlockAdam's optimizer-state format (``"fp32"`` or ``"8bit"``, with or
            without the fp32 master), which sizes the arena.
        limits: also search the longest sequence and largest batch per saving (about 70 plans).
    """
    if batch_size < 1 or seq_len < 2:
        raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size} and {seq_len}")
    if offload not in (True, False, "auto"):
        raise ValueError(f"offload must be True, False or 'auto', got {offload!r}")
    shape = shape or model_shape(config, dtype=dtype, include_embedding=include_embedding,
                                 include_lm_head=include_lm_head)
    loss_backend = planned_loss_backend(loss_backend)
    arena_bytes(shape, states, master)  # an unknown format fails here, with the formats listed
    common = dict(gradient_checkpointing=gradient_checkpointing, layer_kernels=layer_kernels,
                  loss_backend=loss_backend, states=states, master=master)

    def blocks_of(batch: int, seq: int, fused: bool, off: bool) -> list[BlockPlan]:
        return [plan_block(shape, i, batch_size=batch, seq_len=seq, fused_loss=fused, offload=off, **common)
                for i in range(len(shape.block_names))]

    def peak(batch: int, seq: int, fused: bool, off: bool) -> int:
        return max(b.peak for b in blocks_of(batch, seq, fused, off))

    budget = None if budget_gib is None else int(budget_gib * GIB)
    frag = int(fragmentation_gib * GIB)
    found: dict[str, Any] = {}
    auto_choice = None
    if budget is not None:
        limit = budget - frag
        auto_choice = peak(batch_size, seq_len, fused_loss, False) > limit
        variants = {"hf_loss": (False, False), "fused_loss": (True, False), "fused_loss+offload": (True, True)}
        for label, (fused, off) in (variants.items() if limits else ()):
            found[label] = {  # in steps of 256 tokens up to 1M; batches up to 4096
                "longest_seq": 256 * _largest(lambda k: peak(batch_size, 256 * k, fused, off) <= limit, 1 << 12),
                "largest_batch": _largest(lambda k: peak(k, seq_len, fused, off) <= limit, 4096),
            }
    use_offload = auto_choice if offload == "auto" else bool(offload)
    blocks = blocks_of(batch_size, seq_len, fused_loss, bool(use_offload))
    return MemoryPlan(model_type=shape.model_type, batch_size=batch_size, seq_len=seq_len, fused_loss=fused_loss,
                      offload=bool(use_offload), budget_bytes=budget, fragmentation_bytes=frag, blocks=blocks,
                      limits=found, auto_offload=auto_choice, layer_kernels=layer_kernels, loss_backend=loss_backend,
                      states=states, master=master)


def checkpoint_host_bytes(shape_or_model: Any, batch_size: int, seq_len: int) -> int:
    """Host bytes the checkpoint offload needs for one step (every layer's input, block 0 active)."""
    if isinstance(shape_or_model, ModelShape):
        layers, hidden, a = shape_or_model.num_layers, shape_or_model.hidden, shape_or_model.dtype_bytes
    else:
        text = _text_config(shape_or_model.config)
        layers, hidden = int(text.num_hidden_layers), int(text.hidden_size)
        a = next(shape_or_model.parameters()).element_size()
    return layers * _align(batch_size * seq_len * hidden * a, 256)
