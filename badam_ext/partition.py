"""Block partitions: which parameters form each BAdam block.

A :class:`BlockPartition` is an ordered list of :class:`Block` s (one is trainable at a time), a set
of always-trainable parameters (``active_modules``) and the frozen rest. Builders:

- :func:`infer_partition` finds the repeated-layer stack of a model (``model.layers.N``,
  ``transformer.h.N``, ``bert.encoder.layer.N``, ...) and makes one block per layer, optionally with
  an embedding block first and an lm_head block last.
- :func:`partition_from_prefixes` takes explicit name prefixes, one entry (a prefix or a list of
  prefixes) per block.
- :func:`partition_from_blocks` takes explicit parameter names per block.

A prefix ``p`` matches a parameter name ``n`` when ``n == p`` or ``n`` starts with ``p + "."``
(a prefix ending in ``"."`` must start ``n``): ``model.layers.1`` never matches ``model.layers.10.x``.

Names never contain the ``_orig_mod`` component that ``torch.compile``'s wrapper module adds
(``torch.compile(model)``, or a compiled module put in place of a layer): a partition, and a
checkpoint keyed by it, are the same whether or not the model was compiled.

Where the layer stack and the embeddings are (model introspection) is ``introspection.py``'s job.
"""
from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch
from torch import nn

from .introspection import (
    COMPILE_WRAPPER,
    find_layer_container,
    io_embeddings,
    layer_groups_from_names,
    strip_compile_prefix,
)

logger = logging.getLogger(__name__)

StrayPolicy = Literal["freeze", "own_block", "last_block", "error"]
STRAY_POLICIES: tuple[str, ...] = ("freeze", "own_block", "last_block", "error")

#: Module-name components that mark input-side embedding parameters (outside the layer stack).
EMBEDDING_NAMES = frozenset({
    "embed_tokens", "wte", "wpe", "embed_in", "word_embeddings", "word_embeddings_layernorm",
    "embeddings", "embed_positions", "position_embeddings", "token_type_embeddings",
})
#: Module-name components that mark output-head parameters (outside the layer stack).
HEAD_NAMES = frozenset({"lm_head", "embed_out", "cls", "score", "classifier", "qa_outputs"})

NamedParams = Iterable[tuple[str, torch.Tensor]]

@dataclass(frozen=True)
class Block:
    """One BAdam block: a name and the names of its parameters, in model order."""

    name: str
    param_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a block name must be a non-empty string, got {self.name!r}")
        names = tuple(self.param_names)
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise TypeError(f"block {self.name!r}: parameter names must be strings, got {bad[:3]!r}")
        object.__setattr__(self, "param_names", names)


class BlockPartition:
    """Ordered blocks, always-trainable parameters and frozen parameters of one model.

    Args:
        blocks: the blocks, in switching order of ``mode="ascending"``.
        params: every parameter of the model by name (frozen ones included).
        active_modules: parameter names trained at every step, whatever block is active.
        stray: names the builder could not place (informational; they are in a block or frozen).

    Every parameter is in exactly one of: one block, ``active_modules``, ``frozen``.
    """

    def __init__(
        self,
        blocks: Sequence[Block],
        params: Mapping[str, torch.Tensor],
        *,
        active_modules: Sequence[str] = (),
        stray: Sequence[str] = (),
    ) -> None:
        self._params: dict[str, torch.Tensor] = dict(params)
        self.blocks: tuple[Block, ...] = tuple(blocks)
        self.active_modules: tuple[str, ...] = tuple(active_modules)
        self.stray: tuple[str, ...] = tuple(stray)
        self._block_of: dict[str, int] = {}
        self._validate()
        taken = set(self._block_of) | set(self.active_modules)
        self.frozen: tuple[str, ...] = tuple(n for n in self._params if n not in taken)

    def _validate(self) -> None:
        if not self.blocks:
            raise ValueError("the partition has no blocks: nothing would ever be trained")
        seen_names: set[str] = set()
        for i, block in enumerate(self.blocks):
            if not isinstance(block, Block):
                raise TypeError(f"blocks[{i}] is {type(block).__name__}, expected Block")
            if block.name in seen_names:
                raise ValueError(f"two blocks are named {block.name!r}")
            seen_names.add(block.name)
            if not block.param_names:
                raise ValueError(f"block {i} ({block.name!r}) is empty")
            unknown = [n for n in block.param_names if n not in self._params]
            if unknown:
                raise ValueError(f"block {block.name!r} names unknown parameters: {_short(unknown)}")
            for n in block.param_names:
                if n in self._block_of:
                    other = self.blocks[self._block_of[n]].name
                    if other == block.name:
                        raise ValueError(f"parameter {n!r} is listed twice in block {block.name!r}")
                    raise ValueError(f"parameter {n!r} is in two blocks: {other!r} and {block.name!r}")
                self._block_of[n] = i
        unknown = [n for n in self.active_modules if n not in self._params]
        if unknown:
            raise ValueError(f"unknown active_modules parameters: {_short(unknown)}")
        if len(set(self.active_modules)) != len(self.active_modules):
            raise ValueError("active_modules lists a parameter twice")
        both = [n for n in self.active_modules if n in self._block_of]
        if both:
            where = {n: self.blocks[self._block_of[n]].name for n in both}
            raise ValueError(f"parameters both in a block and in active_modules: {_short(list(where.items()))}")

    # --- queries -------------------------------------------------------------------------------
    @property
    def params(self) -> Mapping[str, torch.Tensor]:
        """Every parameter of the model by name (read-only view)."""
        return MappingProxyType(self._params)

    def __len__(self) -> int:
        return len(self.blocks)

    def __repr__(self) -> str:
        return (f"BlockPartition({len(self.blocks)} blocks, {len(self.active_modules)} always active, "
                f"{len(self.frozen)} frozen)")

    def _check_index(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"block index must be an int, got {type(i).__name__}")
        if not 0 <= i < len(self.blocks):
            raise IndexError(f"block index {i} out of range for {len(self.blocks)} blocks")
        return i

    def block_params(self, i: int) -> list[tuple[str, torch.Tensor]]:
        """``(name, parameter)`` pairs of block ``i``, in model order."""
        return [(n, self._params[n]) for n in self.blocks[self._check_index(i)].param_names]

    def active_params(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, parameter)`` pairs trained at every step."""
        return [(n, self._params[n]) for n in self.active_modules]

    def trainable_params(self, i: int) -> list[tuple[str, torch.Tensor]]:
        """What trains while block ``i`` is active: its parameters, then ``active_modules``."""
        return self.block_params(i) + self.active_params()

    def block_of(self, name: str) -> int | None:
        """Index of the block holding parameter ``name``; None when it is in no block."""
        if name not in self._params:
            raise KeyError(f"unknown parameter {name!r}")
        return self._block_of.get(name)

    def numels(self) -> list[int]:
        """Number of elements of each block."""
        return [sum(self._params[n].numel() for n in b.param_names) for b in self.blocks]

    def describe(self) -> list[dict[str, Any]]:
        """One row per block, then one for the always-active and one for the frozen parameters.

        Rows: ``{"index", "name", "role", "params", "numel"}``; ``index`` is None for the last two,
        which are present only when non-empty.
        """
        rows = [
            {"index": i, "name": b.name, "role": "block", "params": len(b.param_names), "numel": k}
            for i, (b, k) in enumerate(zip(self.blocks, self.numels()))
        ]
        for role, names in (("active", self.active_modules), ("frozen", self.frozen)):
            if names:
                rows.append({"index": None, "name": role, "role": role, "params": len(names),
                             "numel": sum(self._params[n].numel() for n in names)})
        return rows

    def fingerprint(self) -> str:
        """A stable hash of block names, their parameters' names, shapes and dtypes, and active_modules."""

        def sig(names: Sequence[str]) -> list[list[Any]]:
            return [[n, list(self._params[n].shape), str(self._params[n].dtype)] for n in names]

        payload = {
            "blocks": [[b.name, sig(b.param_names)] for b in self.blocks],
            "active": sig(self.active_modules),
        }
        text = json.dumps(payload, separators=(",", ":"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def apply_requires_grad(
    partition: BlockPartition, active_index: int, *, clear_grads: bool = True
) -> list[tuple[str, torch.Tensor]]:
    """Make exactly block ``active_index`` and ``active_modules`` trainable.

    Every other parameter of the partition gets ``requires_grad=False`` (and, with ``clear_grads``,
    ``grad=None`` so a stale gradient cannot leak into a later step or hold memory).
    Returns the ``(name, parameter)`` pairs that were not trainable before and are now.
    """
    wanted = {n for n, _ in partition.trainable_params(active_index)}
    newly: list[tuple[str, torch.Tensor]] = []
    for name, p in partition.params.items():
        on = name in wanted
        if on and not p.requires_grad:
            newly.append((name, p))
        if not on:
            if clear_grads:
                p.grad = None
        p.requires_grad_(on)
    return newly


# --- helpers -------------------------------------------------------------------------------------
def _short(items: Sequence[Any], limit: int = 8) -> str:
    shown = ", ".join(repr(x) for x in items[:limit])
    more = len(items) - limit
    return f"[{shown}{f', ... and {more} more' if more > 0 else ''}]"


def _matches(name: str, prefix: str) -> bool:
    if prefix.endswith("."):
        return name.startswith(prefix)
    return name == prefix or name.startswith(prefix + ".")


def _collect(model_or_named_params: nn.Module | NamedParams) -> tuple[dict[str, torch.Tensor], nn.Module | None]:
    """Name -> parameter map (and the module when one was given), refusing duplicates."""
    if isinstance(model_or_named_params, nn.Module):
        module: nn.Module | None = model_or_named_params
        pairs: Iterable[Any] = model_or_named_params.named_parameters()
        _warn_if_compiled_whole(module)
    elif isinstance(model_or_named_params, (str, bytes, Mapping)):
        raise TypeError("expected an nn.Module or an iterable of (name, parameter) pairs, "
                        f"got {type(model_or_named_params).__name__}")
    else:
        module = None
        pairs = model_or_named_params
    params: dict[str, torch.Tensor] = {}
    owner: dict[int, str] = {}
    for item in pairs:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(f"expected (name, parameter) pairs, got {type(item).__name__}")
        name, p = item
        if not isinstance(name, str):
            raise TypeError(f"parameter names must be strings, got {type(name).__name__}")
        name = strip_compile_prefix(name)
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name!r} is a {type(p).__name__}, not a tensor")
        if not p.is_leaf:
            raise ValueError(f"{name!r} is not a leaf tensor: its requires_grad cannot be managed")
        if name in params:
            raise ValueError(f"parameter name {name!r} appears twice")
        if id(p) in owner:
            raise ValueError(f"{name!r} and {owner[id(p)]!r} are the same tensor (tied weights): "
                             "pass each tensor once, e.g. model.named_parameters() with its default dedup")
        owner[id(p)] = name
        params[name] = p
    if not params:
        raise ValueError("the model has no parameters")
    return params, module


def _warn_if_compiled_whole(module: nn.Module) -> None:
    """Whole-model compilation recompiles at every block switch: say so, and what to do instead."""
    if isinstance(getattr(module, COMPILE_WRAPPER, None), nn.Module) or \
            getattr(module, "_compiled_call_impl", None) is not None:
        warnings.warn(
            "the model is torch.compile'd as a whole: every BAdam block switch changes requires_grad and "
            "recompiles the whole graph, and past torch's recompile limit (8) it runs eagerly. Compile "
            "the layers instead (recompiles stay bounded): badam_ext.compile_layers(model) on the "
            "uncompiled model", stacklevel=4)


def _check_stray(stray: str) -> None:
    if stray not in STRAY_POLICIES:
        raise ValueError(f"stray must be one of {STRAY_POLICIES}, got {stray!r}")


def _resolve(params: Mapping[str, torch.Tensor], entries: Sequence[str], what: str) -> list[str]:
    """Parameter names (model order) matched by exact names or module prefixes; each entry must match."""
    if isinstance(entries, str):
        entries = [entries]
    bad = [e for e in entries if not isinstance(e, str) or not e]
    if bad:
        raise TypeError(f"{what} entries must be non-empty strings, got {bad!r}")
    entries = [strip_compile_prefix(e) for e in entries]
    unmatched = [e for e in entries if not any(_matches(n, e) for n in params)]
    if unmatched:
        raise ValueError(f"{what} names matching no parameter: {_short(unmatched)}")
    return [n for n in params if any(_matches(n, e) for e in entries)]


def _prefix_blocks(params: Mapping[str, torch.Tensor], block_prefixes: Sequence[str | Sequence[str]]) -> list[Block]:
    if isinstance(block_prefixes, str) or not isinstance(block_prefixes, Sequence):
        raise TypeError("block_prefixes must be a sequence whose entries are a prefix or a list of prefixes")
    blocks: list[Block] = []
    owner: dict[str, int] = {}
    for i, entry in enumerate(block_prefixes):
        prefixes = [entry] if isinstance(entry, str) else list(entry)
        if not prefixes:
            raise ValueError(f"block_prefixes[{i}] is empty")
        names = _resolve(params, prefixes, f"block_prefixes[{i}]")
        for n in names:
            if n in owner:
                raise ValueError(f"parameter {n!r} matches block_prefixes[{owner[n]}] and block_prefixes[{i}]")
            owner[n] = i
        label = "+".join(strip_compile_prefix(p).rstrip(".") for p in prefixes)
        blocks.append(Block(label, tuple(names)))
    return blocks


def _place_strays(
    blocks: list[Block], strays: list[str], stray: str, *, last_layer_block: int | None, before: int | None
) -> list[Block]:
    """Apply the stray policy; ``before`` is where an own block goes (None: at the end)."""
    if not strays:
        return blocks
    if stray == "error":
        raise ValueError(f"parameters in no block (stray='error'): {_short(strays)}")
    if stray == "freeze":
        logger.warning("freezing %d parameter(s) that are in no block: %s", len(strays), _short(strays))
        return blocks
    if stray == "own_block":
        at = len(blocks) if before is None else before
        return blocks[:at] + [Block("other", tuple(strays))] + blocks[at:]
    # last_block
    if last_layer_block is None:
        raise ValueError("stray='last_block' needs at least one layer block")
    b = blocks[last_layer_block]
    merged = Block(b.name, b.param_names + tuple(n for n in strays if n not in b.param_names))
    return blocks[:last_layer_block] + [merged] + blocks[last_layer_block + 1:]


def _role(name: str, in_prefix: str | None, out_prefix: str | None) -> str:
    if in_prefix and _matches(name, in_prefix):
        return "embedding"
    if out_prefix and _matches(name, out_prefix):
        return "head"
    parts = name.split(".")[:-1]
    if any(p in EMBEDDING_NAMES for p in parts):
        return "embedding"
    if any(p in HEAD_NAMES for p in parts):
        return "head"
    return "stray"


# --- builders ------------------------------------------------------------------------------------
def _layer_blocks(params: dict[str, torch.Tensor], module: nn.Module | None) -> list[Block]:
    container = find_layer_container(module) if module is not None else None
    if container is not None:
        groups = [(f"{container.prefix}.{i}", f"{container.prefix}.{i}.") for i in range(len(container.layers))]
    else:
        found = layer_groups_from_names(params)
        if found is None:
            raise ValueError(
                "no repeated layer stack found (no nn.ModuleList of layers, and no parameter named like "
                "'<...>.layers.N.', 'h.N.', 'layer.N.', 'block.N.' or 'blocks.N.'): pass block_prefixes"
            )
        prefix, indices = found
        groups = [(f"{prefix}.{i}", f"{prefix}.{i}.") for i in indices]
    return [Block(label, tuple(n for n in params if n.startswith(pre))) for label, pre in groups]


def infer_partition(
    model_or_named_params: nn.Module | NamedParams,
    *,
    include_embedding: bool = False,
    include_lm_head: bool = False,
    active_modules: Sequence[str] = (),
    stray: StrayPolicy = "freeze",
    block_prefixes: Sequence[str | Sequence[str]] | None = None,
) -> BlockPartition:
    """One block per layer of the model's layer stack, in layer order.

    Blocks: ``embedding`` (when ``include_embedding``), one per layer (named by its prefix, e.g.
    ``model.layers.3``; or one per ``block_prefixes`` entry when given), ``other`` (the strays, when
    ``stray="own_block"``), ``lm_head`` (when ``include_lm_head``).

    - Given an ``nn.Module``, the layer stack is the largest ModuleList of layers, and the input /
      output embeddings come from ``get_input_embeddings()`` / ``get_output_embeddings()`` as well as
      from names. Given ``(name, parameter)`` pairs, names decide (``<...>.layers.N.`` and friends).
    - Embedding and head parameters not included are frozen. Strays (final norm, pooler, ...) follow
      ``stray``: ``"freeze"`` (logged and listed in ``.frozen`` / ``.stray``), ``"own_block"``,
      ``"last_block"`` (appended to the last layer block) or ``"error"``.
    - ``active_modules`` (parameter names or module prefixes) are trained at every step; they are
      taken out of the inferred layer blocks (explicit ``block_prefixes`` must not overlap them).
    - Tied embeddings: with ``include_lm_head=True`` on a model whose output embedding shares the
      input embedding's weight this raises ``ValueError``: the shared weight is trained through the
      embedding block (``include_embedding=True``). With names only, ties cannot be seen: a tied
      model simply has no ``lm_head`` parameter, and the same error names that.
    """
    _check_stray(stray)
    params, module = _collect(model_or_named_params)
    active = _resolve(params, active_modules, "active_modules")
    active_set = set(active)
    if block_prefixes is not None:
        layer_blocks = _prefix_blocks(params, block_prefixes)
        clash = [n for b in layer_blocks for n in b.param_names if n in active_set]
        if clash:
            raise ValueError(f"parameters both in block_prefixes and active_modules: {_short(clash)}")
    else:
        layer_blocks = [Block(b.name, tuple(n for n in b.param_names if n not in active_set))
                        for b in _layer_blocks(params, module)]
    assigned = {n for b in layer_blocks for n in b.param_names} | active_set

    in_prefix, out_prefix, tied = io_embeddings(module)
    roles: dict[str, list[str]] = {"embedding": [], "head": [], "stray": []}
    for n in params:
        if n not in assigned:
            roles[_role(n, in_prefix, out_prefix)].append(n)

    blocks = list(layer_blocks)
    if include_embedding:
        if not roles["embedding"]:
            raise ValueError("include_embedding=True but no embedding parameters were found outside the "
                             "layer blocks and active_modules")
        blocks.insert(0, Block("embedding", tuple(roles["embedding"])))
    if include_lm_head:
        if tied:
            raise ValueError(
                f"include_lm_head=True, but the output embedding ({out_prefix!r}) shares its weight with the "
                f"input embedding ({in_prefix!r}): train the shared weight with include_embedding=True"
            )
        if not roles["head"]:
            raise ValueError("include_lm_head=True but no lm_head parameters were found (a head tied to the "
                             "input embedding is not listed among parameters; use include_embedding=True)")
        blocks.append(Block("lm_head", tuple(roles["head"])))
    first_layer = 1 if include_embedding else 0
    last_layer = first_layer + len(layer_blocks) - 1 if layer_blocks else None
    blocks = _place_strays(blocks, roles["stray"], stray, last_layer_block=last_layer,
                           before=len(blocks) - 1 if include_lm_head else None)
    return BlockPartition(blocks, params, active_modules=active, stray=roles["stray"])


def partition_from_prefixes(
    named_params: nn.Module | NamedParams,
    block_prefixes: Sequence[str | Sequence[str]],
    *,
    active_modules: Sequence[str] = (),
    stray: StrayPolicy = "freeze",
) -> BlockPartition:
    """One block per ``block_prefixes`` entry (a prefix, or a list of prefixes forming one block).

    Every prefix must match at least one parameter; a parameter matched by two entries is an error.
    Parameters matched by no entry and not in ``active_modules`` follow ``stray``.
    """
    _check_stray(stray)
    params, _ = _collect(named_params)
    blocks = _prefix_blocks(params, block_prefixes)
    return _explicit(params, blocks, active_modules, stray)


def partition_from_blocks(
    named_params: nn.Module | NamedParams,
    blocks: Sequence[Sequence[str]],
    *,
    names: Sequence[str] | None = None,
    active_modules: Sequence[str] = (),
    stray: StrayPolicy = "freeze",
) -> BlockPartition:
    """Blocks given as exact parameter names; ``names`` labels them (default ``block0``, ``block1``...)."""
    _check_stray(stray)
    params, _ = _collect(named_params)
    if isinstance(blocks, (str, Mapping)) or not isinstance(blocks, Sequence):
        raise TypeError("blocks must be a sequence of sequences of parameter names")
    if names is not None and len(names) != len(blocks):
        raise ValueError(f"{len(names)} names given for {len(blocks)} blocks")
    built = []
    for i, entry in enumerate(blocks):
        if isinstance(entry, str):
            raise TypeError(f"blocks[{i}] is a string; each block is a list of parameter names")
        built.append(Block(names[i] if names is not None else f"block{i}",
                           tuple(strip_compile_prefix(n) if isinstance(n, str) else n for n in entry)))
    return _explicit(params, built, active_modules, stray)


def _explicit(params: dict[str, torch.Tensor], blocks: list[Block], active_modules: Sequence[str],
              stray: str) -> BlockPartition:
    active = _resolve(params, active_modules, "active_modules")
    in_blocks = {n for b in blocks for n in b.param_names}
    clash = [n for n in active if n in in_blocks]
    if clash:
        raise ValueError(f"parameters both in a block and in active_modules: {_short(clash)}")
    active_set = set(active)
    strays = [n for n in params if n not in in_blocks and n not in active_set]
    blocks = _place_strays(blocks, strays, stray, last_layer_block=len(blocks) - 1 if blocks else None,
                           before=None)
    return BlockPartition(blocks, params, active_modules=active, stray=strays)
