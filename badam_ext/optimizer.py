"""BlockAdam: block coordinate AdamW (BAdam) on a reusable arena with fused kernels.

Only the active block is trainable. Its fp32 master weights and Adam moments live in one
``BlockArena`` allocated once; a block switch lays the next block out in the same memory and fills it
with one fused load. ``step()`` is one fused AdamW launch per (param group, dtype) over the whole
block, writing the low-precision weights in the same pass.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
import numbers
import operator
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .arena import ArenaLayout, BlockArena, required_capacity
from .states import StateSpec, state_spec, states_entry
from .states import describe as describe_states
from .fsdp import local_tensor, sharding_of
from .contract import SUPPORTED_DTYPES
from .launch_groups import LaunchGroup, MissingGradError, build_launch_groups
from .logs import show_info
from .ops import get_backend, grad_sq_sum
from .param_groups import named_parameter_pairs
from .partition import (
    BlockPartition,
    apply_requires_grad,
    infer_partition,
    partition_from_blocks,
    partition_from_prefixes,
)
from .schedule import BlockSchedule

logger = logging.getLogger("badam_ext")

NamedParams = Iterable[tuple[str, nn.Parameter]]
SwitchHook = Callable[[Optional[int], int, dict], None]

STATE_FORMAT = "badam_ext.BlockAdam/1"
#: every key of a state_dict(); load_state_dict() requires them all. A state without an fp32 master
#: saves an empty "master" list; the 8-bit format adds "exp_avg_scale" / "exp_avg_sq_scale", and every
#: compact format a "states" entry (a state without one is the fp32 format with a master).
STATE_KEYS = ("format", "fingerprint", "active_block", "active_param_names", "schedule", "param_groups",
              "step_states", "master", "exp_avg", "exp_avg_sq", "sr_counter", "seed")
_REGIONS = ("master", "exp_avg", "exp_avg_sq")
_DEFAULT_STATES = {"states": "fp32", "master": True}
_GROUP_HYPER_KEYS = ("lr", "betas", "eps", "weight_decay")

_NOT_COPYABLE = (
    "a BlockAdam cannot be pickled or copied (pickle, copy, copy.deepcopy, torch.save(opt)): its state "
    "lives in a C++ arena and its blocks are the model's own parameters. Save opt.state_dict() instead "
    "(torch.save(opt.state_dict(), path)) and load it with load_state_dict() into a BlockAdam built on "
    "the restored model"
)


def default_no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases and normalization weights (1-D tensors) get no weight decay."""
    return param.dim() <= 1 or name.endswith(".bias")


@dataclass
class _PreparedBlock:
    """A block checked, laid out and with its launch tables built, not yet active."""

    index: int
    named: list[tuple[str, nn.Parameter]]  # the trainable parameters (block + active_modules)
    held: list[tuple[str, nn.Parameter, torch.Tensor]]  # what this rank lays out (see _local_named)
    layout: Optional[ArenaLayout]  # None: this FSDP2 rank holds no element of the block
    launch_groups: list[LaunchGroup]


class _Hyper(NamedTuple):
    """One param group's AdamW hyper-parameters for one step, checked."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


class BlockAdam(torch.optim.Optimizer):
    """Block coordinate AdamW over the blocks of a model (one transformer layer per block by default).

    Args:
        params: an ``nn.Module`` (enables automatic backward pruning) or ``named_parameters()`` pairs.
        lr, betas, eps, weight_decay: AdamW hyper-parameters (decoupled decay; biases and norms excluded,
            see ``no_decay``). ``param_groups`` drive the learning rate, so any torch/HF scheduler works.
        switch_every: K, optimizer steps per block before switching (exactly K for every block).
        switch_mode: ``"ascending"``, ``"descending"``, ``"random"`` (reshuffled each block epoch, seeded)
            or ``"fixed"``.
        start_block: index of the first active block (default depends on the mode).
        blocks: explicit partition: a list whose entries are a prefix or a list of prefixes (one block each).
        block_param_names: explicit partition by exact parameter names (list of lists).
        include_embedding, include_lm_head: give the embedding / lm_head a block of their own.
        active_modules: name prefixes trained at every step, in every block.
        stray: what to do with parameters outside every block (final norm, ...): ``"freeze"``,
            ``"own_block"``, ``"last_block"`` or ``"error"``.
        no_decay: ``f(name, param) -> bool``; True excludes a tensor from weight decay.
        max_grad_norm: clip the active block's gradient by its global norm, on device (None: off).
        stochastic_rounding: round bf16 weights stochastically instead of to nearest even.
        states: the optimizer-state format (opt-in, see docs/states.md): ``"fp32"`` (the default,
            bit-exact: 12 B/param of arena) or ``"8bit"`` (blockwise 8-bit moments with an fp32 absmax
            per 256 elements, the scheme of bitsandbytes ``Adam8bit`` / torchao ``AdamW8bit``; about
            6 B/param with the master).
        master: keep an fp32 master copy of the active block (default). ``False`` updates the bf16 (or
            fp32) weights directly, rounding bf16 stochastically (4 fewer B/param; fp16 refused).
        backend: ``"auto"`` (Triton on CUDA, torch on CPU), ``"triton"`` or ``"torch"``.
        prune_backward: when ``params`` is a module, keep backward from running below the active block
            (undoes HF's ``enable_input_require_grads`` and handles reentrant checkpointing).
        param_groups: advanced: torch-style groups (dicts with ``params`` and optional ``lr``,
            ``weight_decay``, ``betas``, ``eps``) over the same parameters, for per-group hyper-parameters.
        seed: seeds the random block order and stochastic rounding.
        distributed: data parallel over ``torch.distributed`` (None: on when a process group of more
            than one rank is initialised): every rank holds the whole model and the same active block,
            and only the active block's gradients are all-reduced, overlapped with backward.
        process_group: the data-parallel group (default: the world).

    FSDP2: build BlockAdam on a model after ``fully_shard`` (see :mod:`badam_ext.fsdp`); each rank's
    arena then holds its local shard of the active block and FSDP2 reduces the gradients.

    Integrity: weights written in place after construction (``model.load_state_dict``,
    ``param.copy_``) are picked up at the next step (the active block's fp32 master is re-loaded from
    them, moments kept); writes through ``param.data`` bypass torch's version counter and are not seen.
    Every block is checked at construction; a refused ``step()`` or ``load_state_dict()`` changes
    nothing. One open BlockAdam per parameter: building another on the same parameters closes this
    one (with a warning; using it afterwards raises), and ``close()`` frees the arena and detaches from
    the model. Blocks are fixed (no ``add_param_group``), and the optimizer cannot be pickled or
    copied: checkpoint ``state_dict()``.
    """

    _step_supports_amp_scaling = True  # torch GradScaler hands us grad_scale / found_inf (fp16 path)

    def __init__(
        self,
        params: Union[nn.Module, NamedParams],
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        switch_every: int = 100,
        switch_mode: str = "random",
        start_block: Optional[int] = None,
        blocks: Optional[Sequence[Union[str, Sequence[str]]]] = None,
        block_param_names: Optional[Sequence[Sequence[str]]] = None,
        include_embedding: bool = False,
        include_lm_head: bool = False,
        active_modules: Sequence[str] = (),
        stray: str = "freeze",
        no_decay: Callable[[str, torch.Tensor], bool] = default_no_decay,
        max_grad_norm: Optional[float] = None,
        stochastic_rounding: bool = False,
        states: str = "fp32",
        master: bool = True,
        backend: str = "auto",
        prune_backward: bool = True,
        param_groups: Optional[Sequence[dict]] = None,
        seed: int = 0,
        verbose: int = 0,
        distributed: Optional[bool] = None,
        process_group: Any = None,
    ) -> None:
        self._closed = False
        self._closed_by = "close()"  # what closed it, for the error of a later use
        _check_hyper_parameters(lr, betas, eps, weight_decay, switch_every, max_grad_norm)
        module = params if isinstance(params, nn.Module) else None
        if module is not None:
            from .distributed import reject_ddp

            reject_ddp(module)
        named = list(params.named_parameters()) if module is not None else named_parameter_pairs(params)
        if not named:
            raise ValueError("BlockAdam got no parameters")
        if any(not isinstance(n, str) or not isinstance(p, torch.Tensor) for n, p in named):
            raise TypeError("BlockAdam expects an nn.Module or (name, parameter) pairs like model.named_parameters()")

        self.partition: BlockPartition = _build_partition(
            module if module is not None else named, named, blocks, block_param_names,
            include_embedding, include_lm_head, active_modules, stray,
        )
        managed = [np for i in range(len(self.partition)) for np in self.partition.block_params(i)]
        managed += self.partition.active_params()
        devices = {p.device for _, p in managed}
        if len(devices) != 1:
            raise ValueError(f"all block parameters must be on one device; found {sorted(map(str, devices))}")
        self.device = devices.pop()
        self._sharding = sharding_of(managed)  # FSDP2: the arena and the step see local shards only
        self._spec: StateSpec = state_spec(states, master)
        for index in range(len(self.partition)):  # every block up front: a later switch must not fail
            self._check_block_tensors(index)

        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        groups = _resolve_param_groups(param_groups, [p for _, p in managed])
        super().__init__(groups, defaults)
        self._groups_fixed = True  # add_param_group() is refused from here on
        for group in self.param_groups:
            _check_hyper_parameters(group["lr"], group["betas"], group["eps"], group["weight_decay"], 1, None)
        self._group_of = {id(p): gi for gi, g in enumerate(self.param_groups) for p in g["params"]}

        self.no_decay = no_decay
        self.max_grad_norm = max_grad_norm
        self.stochastic_rounding = stochastic_rounding
        self.states = states
        self.master = master
        self.verbose = verbose
        if verbose:
            show_info(logger)  # an unconfigured logger would drop the INFO lines verbose asks for
        self._ops = get_backend(backend, self.device)
        self.schedule = BlockSchedule(
            len(self.partition), switch_mode, switch_every, start_block=start_block, seed=seed
        )
        self._seed = seed
        self._sr_counter = 0
        self._switch_hooks: OrderedDict[int, SwitchHook] = OrderedDict()  # RemovableHandle needs a weakref-able dict

        self._grad_sync = _make_grad_sync(distributed, process_group, sharded=self._sharding is not None)

        # Everything is checked: a BlockAdam still open on these parameters is closed now (two would
        # overwrite each other's requires_grad and weights), before our arena exists (never two at once).
        _close_other_owners(self.partition.params.items())
        capacity = max(self._local_capacity(i) for i in range(len(self.partition)))
        # a rank whose shards of every block are empty still needs an arena to exist
        self.arena = BlockArena(capacity or required_capacity([1], self._spec), self.device, self._spec)
        self._flat_regions: Optional[tuple[Optional[torch.Tensor], ...]] = None  # built once (_regions)
        self._step_states = [self._ops.new_step_state(self.device) for _ in self.param_groups]
        self._partials: Optional[torch.Tensor] = None
        self.last_grad_norm: Optional[torch.Tensor] = None

        self.pruner = None
        self._prune_hook = None
        if module is not None and prune_backward:
            from .pruning import BackwardPruner

            self.pruner = BackwardPruner(module, self.partition)
            # Re-checked before every forward: HF Trainer enables gradient checkpointing (and with it
            # enable_input_require_grads) after the optimizer exists. Weak: the model must not keep a
            # discarded optimizer (and its arena) alive.
            self._prune_hook = module.register_forward_pre_hook(_refresh_pruner_hook(self))
            weakref.finalize(self, self._prune_hook.remove)  # a collected optimizer leaves no hook behind
        # weak, like the hook: only to tell a replaced parameter from a missing gradient
        self._module_ref = weakref.ref(module) if module is not None else None

        self.active_block: int = -1
        self._trainable: list[nn.Parameter] = []
        self._launch_groups: list[LaunchGroup] = []
        self._state_views: dict[str, list[torch.Tensor]] = {}
        self._activate(self.schedule.active)
        self._claim = _claim_parameters(self, self.partition.params.items())

    # ------------------------------------------------------------------ blocks
    def _active_named(self, index: int) -> list[tuple[str, nn.Parameter]]:
        return self.partition.trainable_params(index)

    def _local_named(self, index: int) -> list[tuple[str, nn.Parameter, torch.Tensor]]:
        """``(name, param, local tensor)`` of block ``index`` as laid out in this rank's arena.

        Without FSDP the local tensor is the parameter itself. Under FSDP2 it is the rank's shard, and
        empty shards are left out (the arena and the kernels take no empty tensors).
        """
        named = self._active_named(index)
        if self._sharding is None:
            return [(n, p, p) for n, p in named]
        held = [(n, p, local_tensor(p)) for n, p in named]
        return [(n, p, t) for n, p, t in held if t.numel() > 0]

    def _local_capacity(self, index: int) -> int:
        numels = [t.numel() for _, _, t in self._local_named(index)]
        if not numels and self._sharding is not None:  # every shard of the block is empty on this rank
            return 0
        return required_capacity(numels, self._spec)

    @property
    def _views(self) -> tuple[list[torch.Tensor], ...]:
        """The active block's state views, one list per region in the format's order."""
        return tuple(self._state_views.values())

    @property
    def active_params(self) -> list[nn.Parameter]:
        return [p for lg in self._launch_groups for p in lg.params]

    def _check_block_tensors(self, index: int) -> None:
        """Raise, naming the parameter, unless the fused step can run on every tensor of block ``index``.

        Run for every block at construction, and again at each switch (cheap: a loop over the block).
        """
        block = f"block {index} ({self.partition.blocks[index].name})"
        for name, param in self._active_named(index):
            if param.dtype == torch.float16 and not self._spec.has("master"):
                raise TypeError(
                    f"parameter {name!r} of {block} is float16: master=False updates the weights directly, "
                    "with stochastic rounding for bfloat16 (float32 is exact); float16 weights need the fp32 "
                    "master (master=True) or a bfloat16 model"
                )
            if param.dtype not in SUPPORTED_DTYPES:
                raise TypeError(
                    f"parameter {name!r} of {block} has dtype {param.dtype}: BlockAdam trains float32, "
                    "float16 and bfloat16 weights. Cast the model first (e.g. model.to(torch.bfloat16)), or "
                    "keep this parameter out of every block (blocks=... / block_param_names=...)"
                )
            if param.device != self.device:
                raise ValueError(f"parameter {name!r} of {block} is on {param.device}, BlockAdam on {self.device}: "
                                 "move the model first, then build the optimizer")
        for name, _, held in self._local_named(index):
            if held.layout != torch.strided or not held.is_contiguous():
                raise ValueError(
                    f"parameter {name!r} of {block} is not contiguous (shape {tuple(held.shape)}, stride "
                    f"{held.stride()}): the fused step writes each weight in place as one dense array. Make it "
                    "contiguous before building BlockAdam (with torch.no_grad(): param.data = param.data.contiguous())"
                )

    def _replaced(self, names: Sequence[str]) -> list[str]:
        """Those of ``names`` whose parameter on the model is no longer the tensor BlockAdam holds."""
        module = self._module_ref() if self._module_ref is not None else None
        if module is None or self._sharding is not None:  # FSDP2 swaps module parameters itself
            return []
        replaced = []
        for name in names:
            try:
                current = module.get_parameter(name)
            except AttributeError:  # deleted, or no longer an nn.Parameter
                current = None
            if current is not self.partition.params[name]:
                replaced.append(name)
        return replaced

    def _replaced_error(self, names: Sequence[str]) -> RuntimeError:
        return RuntimeError(
            f"parameter(s) {list(names[:5])}{' ...' if len(names) > 5 else ''} were replaced on the model after "
            "BlockAdam was built (e.g. layer.weight = nn.Parameter(...)): the model now computes with tensors "
            "BlockAdam does not hold, and the ones it holds get no gradient. Copy new values into the existing "
            "parameters instead (with torch.no_grad(): param.copy_(new)), or build the optimizer after "
            "replacing them"
        )

    def _prepare_block(self, index: int) -> "_PreparedBlock":
        """Check block ``index``, lay it out and build its launch tables; changes nothing yet.

        Everything that can fail in a switch happens here, so a failed switch leaves the optimizer on
        its current block with its state intact; :meth:`_commit_block` then cannot fail.
        """
        self._check_block_tensors(index)
        replaced = self._replaced([n for n, _ in self._active_named(index)])
        if replaced:
            raise self._replaced_error(replaced)
        held = self._local_named(index)
        layout: Optional[ArenaLayout] = None
        offsets: list[int] = []
        if held or self._sharding is None:  # FSDP2: a rank may hold no element of the block
            layout = self.arena.layout([t.numel() for _, _, t in held])
            self.arena.check_tensors(layout, [t.detach() for _, _, t in held])
            offsets = list(layout.offsets)
        # programs cover whole multiples of the format's alignment (8-bit: whole quantization blocks),
        # with the launch configuration of the format's step
        build_tables = functools.partial(self._ops.BlockTables.build, min_block_size=self._spec.element_alignment,
                                         states=states_entry(self._spec)["states"])
        launch_groups = build_launch_groups(
            [n for n, _, _ in held], [p for _, p, _ in held], offsets,
            group_of=lambda p: self._group_of[id(p)],
            decays=lambda n, p: not self.no_decay(n, p),
            build_tables=build_tables,
            local=local_tensor,
        )
        return _PreparedBlock(index, self._active_named(index), held, layout, launch_groups)

    def _activate(self, index: int) -> None:
        """Make block ``index`` trainable and load it into the arena (no allocation)."""
        self._commit_block(self._prepare_block(index))

    def _commit_block(self, block: "_PreparedBlock") -> None:
        """Switch to a prepared block: requires_grad, arena views, fused load (m = v = 0), t = 0, hooks."""
        index = block.index
        old = self.active_block if self.active_block >= 0 else None
        for lg in self._launch_groups:
            for p in lg.params:
                p.grad = None
        apply_requires_grad(self.partition, index)
        names = [n for n, _ in block.named]
        params = [p for _, p in block.named]
        self._trainable = params
        self._state_views = {name: [] for name in self._spec.region_names}
        if block.layout is not None:
            self._state_views = self.arena.views(block.layout, [list(t.shape) for _, _, t in block.held])
        self._launch_groups = block.launch_groups
        regions = self._regions()
        for lg in self._launch_groups:
            self._ops.block_load(lg.tables, *regions[:3], exp_avg_scale=regions[3], exp_avg_sq_scale=regions[4])
            lg.record_versions()
        for state in self._step_states:
            self._ops.reset_step_state(state)
        self.active_block = index
        if self._grad_sync is not None:
            self._grad_sync.attach(params, names)
        if self.pruner is not None:
            self.pruner.on_switch(index)
        if self.verbose:
            logger.info("BlockAdam: block %d (%s) active, %d tensors, %s parameters", index,
                        self.partition.blocks[index].name, len(params), f"{sum(p.numel() for p in params):,}")
        info = self.block_info(index)
        for hook in list(self._switch_hooks.values()):
            hook(old, index, info)

    def block_info(self, index: int) -> dict:
        """Name, size and memory figures of block ``index`` (what the profiler attributes per block)."""
        named = self._active_named(index)
        numel = sum(p.numel() for _, p in named)
        return {
            "index": index,
            "name": self.partition.blocks[index].name,
            "num_params": numel,
            "arena_bytes": self._spec.bytes(self._local_capacity(index)),
            "grad_bytes": sum(t.numel() * t.element_size() for _, _, t in self._local_named(index)),
        }

    def add_switch_hook(self, hook: SwitchHook) -> RemovableHandle:
        """Call ``hook(old_index, new_index, info)`` after every block switch; returns a removable handle.

        The hook is called once at registration with ``old_index=None`` and the active block.
        """
        handle = RemovableHandle(self._switch_hooks)
        self._switch_hooks[handle.id] = hook
        hook(None, self.active_block, self.block_info(self.active_block))
        return handle

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One AdamW step on the active block; switches block after every K-th step.

        Everything is checked before anything changes (hyper-parameters, weights, gradients, the next
        block at a switch): a refused step leaves the step count, schedule and state as they were.
        """
        self._check_open("step")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hypers = {lg.group_index: self._group_hyper(lg.group_index) for lg in self._launch_groups}
        if self.max_grad_norm is not None:
            _check_max_grad_norm(self.max_grad_norm)
        found_inf = getattr(self, "found_inf", None)
        if self._grad_sync is not None:
            if found_inf is not None and not self._grad_sync.synchronized:
                raise RuntimeError(
                    "GradScaler under data parallel checked this rank's gradients before they were "
                    "all-reduced, so ranks could disagree on skipping the step: call "
                    "opt.synchronize_grads() after backward and before scaler.step(opt)"
                )
            self._grad_sync.wait()  # the active block's grads, averaged over ranks
        for lg in self._launch_groups:
            lg.check_storage()
        grads = self._active_grads()
        switch = self._count_step()  # the schedule's step; at a switch, the next block is prepared
        self._sync_masters()
        loss_scale = getattr(self, "grad_scale", None)  # set by torch GradScaler (fp16)
        grad_scale = None if loss_scale is None else loss_scale.float().reciprocal()
        if self.max_grad_norm is not None:
            norm = self._grad_norm(grads)
            if grad_scale is not None:
                norm = norm * grad_scale
            self.last_grad_norm = norm
            coef = (self.max_grad_norm / (norm + 1e-6)).clamp_(max=1.0)
            grad_scale = coef if grad_scale is None else grad_scale * coef
        regions = self._regions()
        stochastic = self.stochastic_rounding or not self._spec.has("master")
        stepped_groups = set()
        for lg, lg_grads in zip(self._launch_groups, grads):
            hyper = hypers[lg.group_index]
            state = self._step_states[lg.group_index]
            if lg.group_index not in stepped_groups:
                self._ops.advance_step(state, hyper.beta1, hyper.beta2, found_inf)
                stepped_groups.add(lg.group_index)
            self._ops.fused_adamw_step(
                lg.tables, lg_grads, *regions[:3], state,
                lr=hyper.lr, beta1=hyper.beta1, beta2=hyper.beta2, eps=hyper.eps,
                weight_decay=hyper.weight_decay, grad_scale=grad_scale, found_inf=found_inf,
                stochastic_rounding=stochastic, seed=self._seed * 1_000_003 + self._sr_counter,
                exp_avg_scale=regions[3], exp_avg_sq_scale=regions[4],
            )
            lg.record_versions()  # our own write: the Triton kernels bump no version counter
        self._sr_counter += 1
        for p in self._trainable:
            p.grad = None
        if switch is not None:
            self._commit_block(switch)
        return loss

    def _group_hyper(self, group_index: int) -> _Hyper:
        """Param group ``group_index``'s hyper-parameters, checked (a scheduler may have set a NaN lr)."""
        group = self.param_groups[group_index]
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):  # torch optimizers accept a tensor lr; the kernels take a float
            lr = float(lr)
        _check_hyper_parameters(lr, group["betas"], group["eps"], group["weight_decay"], 1, None,
                                where=f"param group {group_index}")
        beta1, beta2 = group["betas"]
        return _Hyper(float(lr), float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]))

    def _active_grads(self) -> list[list[torch.Tensor]]:
        """Each launch group's checked gradients; a missing one is explained (replaced parameter?)."""
        try:
            return [lg.grads() for lg in self._launch_groups]
        except MissingGradError:
            missing = [n for lg in self._launch_groups for n, p in zip(lg.names, lg.params) if p.grad is None]
            replaced = self._replaced(missing)
            if replaced:
                raise self._replaced_error(replaced) from None
            raise

    def _count_step(self) -> Optional[_PreparedBlock]:
        """Count this step in the schedule; when it ends the block, prepare the next one.

        Preparing the next block checks it (dtypes, storage, replaced parameters): if that fails the
        schedule is put back and the step refused, before any state changed.
        """
        schedule = self.schedule
        ends_block = schedule.steps_in_block + 1 >= schedule.switch_every
        snapshot = schedule.state_dict() if ends_block else None  # only every K-th step
        if not schedule.step():
            return None
        try:
            return self._prepare_block(schedule.active)
        except BaseException:
            schedule.load_state_dict(snapshot)
            raise

    def _regions(self) -> tuple[Optional[torch.Tensor], ...]:
        """The arena's flat regions as the kernels take them: master (None without one), exp_avg,
        exp_avg_sq, exp_avg_scale, exp_avg_sq_scale (None for fp32 moments). Views of the one
        allocation, made at the first use and kept until close()."""
        if self._flat_regions is None:
            spec = self._spec
            self._flat_regions = tuple(
                self.arena.flat(r) if spec.has(r) else None
                for r in ("master", "exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale"))
        return self._flat_regions

    def _sync_masters(self) -> None:
        """Re-load the fp32 master of active weights written in place by someone else since our last write.

        ``model.load_state_dict(...)`` (or any in-place copy into the active block) after the optimizer
        was built would otherwise be reverted by the stale master at the next step. The moments are
        kept, as torch AdamW keeps them. Detected from the weights' version counters: no device work
        unless a weight was written.
        """
        master = None
        for lg in self._launch_groups:
            rewritten = lg.rewritten()
            if not rewritten:
                continue
            if not self._spec.has("master"):  # the weights are the state: nothing to re-load
                lg.record_versions()
                continue
            if master is None:
                master = self.arena.flat("master")
            lg.resync_master(master, rewritten)
            logger.info("BlockAdam: %d weight(s) of block %d were written in place since the last step (%s%s): "
                        "their fp32 master is re-loaded from them, the moments are kept", len(rewritten),
                        self.active_block, ", ".join(lg.names[i] for i in rewritten[:3]),
                        " ..." if len(rewritten) > 3 else "")

    def _grad_norm(self, grads: list[list[torch.Tensor]]) -> torch.Tensor:
        """Global L2 norm of the active block's gradients, on device, deterministic."""
        tables = [lg.tables for lg in self._launch_groups]
        total = sum(t.num_chunks for t in tables)
        if self._partials is None or self._partials.numel() < total:
            self._partials = torch.empty(total, dtype=torch.float32, device=self.device)
        # FSDP2: a rank may hold no element of the block (no launch group): its squares are zero
        sq = grad_sq_sum(self._ops, tables, grads, self._partials) if tables else self._partials[:0].sum()
        if self._sharding is not None:  # local shards: the global norm sums every rank's squares
            self._sharding.all_reduce_sum(sq)
        return sq.sqrt()

    @property
    def grad_sync(self):
        """The data-parallel gradient synchroniser (None on a single process)."""
        return self._grad_sync

    def synchronize_grads(self) -> None:
        """Data parallel: finish the all-reduce now, so ``.grad`` holds the mean over ranks.

        ``step()`` does this itself; call it first only to read or change gradients between backward and
        step (``clip_grad_norm_`` on the model, ``GradScaler``). A no-op on a single process.
        """
        if self._grad_sync is not None:
            self._grad_sync.synchronize()

    def close(self) -> None:
        """Detach from the model (pruning hook, data-parallel hooks, the claim on its parameters) and
        free the arena's memory. Any later step(), zero_grad(), state_dict() or load_state_dict()
        raises; a second close() does nothing. Building another BlockAdam on the same parameters
        closes this one."""
        self._close("close()")

    def _close(self, by: str) -> None:
        if self._closed:
            return
        self._closed_by = by
        if self._prune_hook is not None:
            self._prune_hook.remove()
            self._prune_hook = None
        if self.pruner is not None:
            self.pruner.remove()
        if self._grad_sync is not None:
            self._grad_sync.attach([])
        # our own views of the arena would keep its buffer alive after release()
        self._state_views = {}
        self._flat_regions = None
        self._launch_groups = []
        self._trainable = []
        self._partials = None
        self.last_grad_norm = None
        if not self.arena.released:
            self.arena.release()
        self._closed = True
        self._claim()  # another BlockAdam may now be built on these parameters

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(
                f"BlockAdam.{what}() after {self._closed_by}: this optimizer has released its arena (the "
                "active block's fp32 master weights and Adam moments). Use the BlockAdam built since, or build "
                "a new one and load a state_dict() saved before"
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._check_open("zero_grad")
        super().zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused once the optimizer exists: blocks, param groups and the arena's size are fixed then."""
        if getattr(self, "_groups_fixed", False):
            raise RuntimeError(
                "BlockAdam does not support add_param_group(): its blocks, param groups and arena (sized for "
                "the largest block) are fixed when it is built, so added parameters would never be trained. "
                "Pass every parameter at construction (the model, or param_groups=[...] for per-group "
                "hyper-parameters), or build a new BlockAdam"
            )
        super().add_param_group(param_group)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(_NOT_COPYABLE)

    def __getstate__(self) -> Any:
        raise TypeError(_NOT_COPYABLE)

    def __deepcopy__(self, memo: dict) -> Any:
        raise TypeError(_NOT_COPYABLE)

    def no_sync(self):
        """Context manager for gradient accumulation under data parallel: no all-reduce inside."""
        if self._grad_sync is None:
            return contextlib.nullcontext()
        return self._grad_sync.no_sync()

    def check_replicas(self) -> None:
        """Debug: raise if the ranks' active-block masters differ (data parallel only)."""
        self._check_open("check_replicas")
        if self._grad_sync is not None:
            self._sync_masters()
            if self._spec.has("master"):
                self._grad_sync.check_replicas(list(self._state_views["master"]), what="fp32 master weights")
            else:
                self._grad_sync.check_replicas([p.detach() for p in self.active_params], what="weights")

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically: schedule, block, step counters, master/m/v."""
        self._check_open("state_dict")
        self._sync_masters()  # weights loaded since the last step: save the master that goes with them
        views = self._state_views
        out = {
            "format": STATE_FORMAT,
            "fingerprint": self.partition.fingerprint(),
            "active_block": self.active_block,
            "active_param_names": [n for n, _ in self._active_named(self.active_block)],
            "schedule": self.schedule.state_dict(),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "step_states": [s.detach().cpu().clone() for s in self._step_states],
            # on the host: a checkpoint must not double the active block's state in device memory
            **{r: [t.detach().to("cpu", copy=True) for t in views.get(r, [])] for r in _REGIONS},
            "sr_counter": self._sr_counter,
            "seed": self._seed,
        }
        if self._states_entry() != _DEFAULT_STATES:
            out["states"] = self._states_entry()
            for r in ("exp_avg_scale", "exp_avg_sq_scale"):
                if r in views:
                    out[r] = [t.detach().to("cpu", copy=True) for t in views[r]]
        return out

    def _states_entry(self) -> dict[str, Any]:
        return states_entry(self._spec)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by ``state_dict()`` of the same model and partition.

        Everything is checked before anything is applied: a refused state leaves the optimizer as it was.
        """
        self._check_open("load_state_dict")
        groups, block = self._check_state(state_dict)
        self.schedule.load_state_dict(state_dict["schedule"])  # checked on a copy: cannot fail now
        for group, saved in zip(self.param_groups, groups):
            group.update(saved)
        self._commit_block(block)
        for key in self._spec.region_names:
            for view, tensor in zip(self._state_views[key], state_dict[key]):
                view.copy_(tensor)
        for state, saved in zip(self._step_states, state_dict["step_states"]):
            state.copy_(saved)
        self._sr_counter = _state_count(state_dict, "sr_counter", minimum=0)
        self._seed = _state_count(state_dict, "seed")

    def _check_state(self, state_dict: Any) -> tuple[list[dict], _PreparedBlock]:
        """Check every part of a state_dict against this optimizer; return the param-group settings to
        apply and the prepared active block. Raises ValueError naming the offending key."""
        if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_FORMAT:
            raise ValueError(
                "not a BlockAdam state_dict (missing format tag "
                f"{STATE_FORMAT!r}); was it saved by another optimizer?"
            )
        missing = [k for k in STATE_KEYS if k not in state_dict]
        if missing:
            raise ValueError(f"BlockAdam state_dict lacks key(s) {missing}: it was truncated or edited; "
                             "save a complete one with state_dict()")
        saved_states = state_dict.get("states", _DEFAULT_STATES)
        if saved_states != self._states_entry():
            raise ValueError(
                f"this state_dict holds {describe_states(saved_states)} optimizer states but this BlockAdam uses "
                f"{describe_states(self._states_entry())}: loading one state format into another is refused "
                "(build the BlockAdam with the saved format to resume)"
            )
        missing = [k for k in self._spec.region_names if k not in state_dict]
        if missing:
            raise ValueError(f"BlockAdam state_dict lacks key(s) {missing} of its state format")
        if state_dict["fingerprint"] != self.partition.fingerprint():
            raise ValueError(
                "this BlockAdam state was saved for another model or block partition "
                "(parameter names, shapes, dtypes or blocks differ); refusing to load it"
            )
        groups = self._check_state_groups(state_dict["param_groups"])
        active = state_dict["active_block"]
        if isinstance(active, bool) or not isinstance(active, int) or not 0 <= active < len(self.partition):
            raise ValueError(f"state's active block {active!r} is out of range for {len(self.partition)} blocks")
        if [n for n, _ in self._active_named(active)] != state_dict["active_param_names"]:
            raise ValueError("active block parameters in the state do not match this model's block")
        self._check_state_schedule(state_dict["schedule"], active)
        held = self._local_named(active)
        for key in self._spec.region_names:
            block = self._spec.block(key)
            expected = [(name, t.shape if block == 1 else torch.Size([self._spec.items(key, t.numel())]))
                        for name, _, t in held]
            _check_state_tensors(key, state_dict[key], expected, self._spec.dtype(key))
        if not self._spec.has("master") and state_dict["master"]:
            raise ValueError("state_dict['master'] must be an empty list for a state without an fp32 master")
        _check_step_states(state_dict["step_states"], len(self.param_groups))
        _state_count(state_dict, "sr_counter", minimum=0)
        _state_count(state_dict, "seed")
        return groups, self._prepare_block(active)

    def _check_state_groups(self, saved: Any) -> list[dict]:
        """The saved param groups' settings (without ``params``), their hyper-parameters checked."""
        if not isinstance(saved, (list, tuple)) or len(saved) != len(self.param_groups):
            got = len(saved) if isinstance(saved, (list, tuple)) else type(saved).__name__
            raise ValueError(f"state has {got} param groups, this optimizer has {len(self.param_groups)}")
        groups = []
        for gi, group in enumerate(saved):
            where = f"state_dict['param_groups'][{gi}]"
            if not isinstance(group, dict):
                raise ValueError(f"{where} must be a dict, got {type(group).__name__}")
            missing = [k for k in _GROUP_HYPER_KEYS if k not in group]
            if missing:
                raise ValueError(f"{where} lacks {missing}")
            _check_hyper_parameters(group["lr"], group["betas"], group["eps"], group["weight_decay"], 1, None,
                                    where=where)
            groups.append({k: v for k, v in group.items() if k != "params"})
        return groups

    def _check_state_schedule(self, saved: Any, active: int) -> None:
        """Load the saved schedule into a scratch copy of ours: it raises on anything invalid."""
        if not isinstance(saved, dict):
            raise ValueError(f"state_dict['schedule'] must be a dict (BlockSchedule.state_dict()), "
                             f"got {type(saved).__name__}")
        mine = self.schedule
        scratch = BlockSchedule(mine.num_blocks, mine.mode, mine.switch_every, start_block=mine.start_block,
                                seed=mine.seed)
        try:
            scratch.load_state_dict(saved)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise ValueError(f"state_dict['schedule'] does not load: {reason}") from exc
        if scratch.active != active:
            raise ValueError(f"state_dict['schedule'] makes block {scratch.active} active but "
                             f"state_dict['active_block'] is {active}: the parts come from different states")

    # ------------------------------------------------------------------ report
    def describe(self) -> list[dict]:
        """One row per block: index, name, parameter count, arena bytes."""
        return [self.block_info(i) for i in range(len(self.partition))]

    def __repr__(self) -> str:
        return (
            f"BlockAdam(blocks={len(self.partition)}, active={self.active_block}, "
            f"mode={self.schedule.mode!r}, K={self.schedule.switch_every}, backend={self._ops.name!r}, "
            f"{describe_states(self._spec)}, "
            f"arena={self.arena.capacity_bytes / 2**20:.1f} MiB{', closed' if self._closed else ''})"
        )


# id(parameter) -> (the parameter, the BlockAdam managing it), both weak: one live optimizer per parameter
_OWNERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _owner(param: torch.Tensor) -> Optional["BlockAdam"]:
    """The open BlockAdam that manages ``param``, if any."""
    entry = _OWNERS.get(id(param))
    if entry is None or entry[0]() is not param:  # no claim, or a dead parameter's id reused
        return None
    opt = entry[1]()
    return None if opt is None or opt.closed else opt


def _close_other_owners(named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Close, with a warning, every open BlockAdam managing one of these parameters.

    Rebuilding the optimizer while the old one is still referenced (a notebook cell run again, a
    Trainer's create_optimizer() at each train()) then just works; the old one raises if used again.
    """
    named = list(named)
    if not any(_owner(p) is not None for _, p in named):
        return
    gc.collect()  # an unreachable optimizer caught in a reference cycle is given up here, silently
    owners: dict[int, tuple["BlockAdam", str]] = {}
    for name, p in named:
        owner = _owner(p)
        if owner is not None:
            owners.setdefault(id(owner), (owner, name))
    for owner, name in owners.values():
        warnings.warn(
            f"another BlockAdam was still open on these parameters (e.g. {name!r}): it is closed now, since "
            "two optimizers on one model overwrite each other's requires_grad and weights. Use the new one "
            "(the old one raises if used again), or close() the old one first to silence this warning",
            stacklevel=3,
        )
        owner._close(f"a newer BlockAdam was built on the same parameters (e.g. {name!r}), which closed this one")


def _claim_parameters(opt: "BlockAdam", named: Iterable[tuple[str, torch.Tensor]]) -> weakref.finalize:
    """Record ``opt`` as the manager of these parameters until it is closed or collected.

    Returns the release: a ``weakref.finalize``, called by ``close()`` or when ``opt`` is collected.
    """
    owner = weakref.ref(opt)
    params = [p for _, p in named]
    keys = [id(p) for p in params]
    for key, p in zip(keys, params):
        _OWNERS[key] = (weakref.ref(p), owner)
    return weakref.finalize(opt, _release_parameters, keys, owner)


def _release_parameters(keys: Sequence[int], owner: weakref.ref) -> None:
    for key in keys:
        entry = _OWNERS.get(key)
        if entry is not None and entry[1] is owner:
            del _OWNERS[key]


def _refresh_pruner_hook(opt: "BlockAdam"):
    """A forward pre-hook that re-checks pruning through a weak reference to the optimizer."""
    ref = weakref.ref(opt)

    def hook(*_: Any) -> None:
        live = ref()
        if live is not None and live.pruner is not None:
            live.pruner.refresh()

    return hook


def _make_grad_sync(distributed: Optional[bool], process_group: Any, sharded: bool = False):
    """A GradSync when data parallel is asked for, or (None) found initialised with > 1 rank.

    None under FSDP2 (``sharded``): FSDP2 reduce-scatters the gradients itself.
    """
    import torch.distributed as dist

    if sharded:
        if distributed or process_group is not None:
            raise ValueError(
                "the block parameters are FSDP2-sharded DTensors: FSDP2 reduce-scatters their gradients "
                "itself, so BlockAdam's data-parallel gradient sync must stay off; leave distributed and "
                "process_group unset (or pass distributed=False)"
            )
        return None
    if distributed is False:
        return None
    ready = dist.is_available() and dist.is_initialized()
    if distributed and not ready:
        raise RuntimeError("distributed=True needs torch.distributed initialised (init_process_group) first")
    if not ready or (distributed is None and dist.get_world_size(process_group) == 1):
        return None
    from .distributed import GradSync

    return GradSync(process_group)


def _as_real(value: Any) -> Optional[float]:
    """``value`` as a finite float (a one-element tensor too); None for bools, strings, NaN and inf."""
    if type(value) is float or type(value) is int:  # the common case, checked every step: keep it fast
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _valid_betas(betas: Any) -> bool:
    try:
        values = [_as_real(b) for b in betas]
    except TypeError:  # not iterable
        return False
    return len(values) == 2 and all(v is not None and 0.0 <= v < 1.0 for v in values)


def _check_max_grad_norm(max_grad_norm: Any, at: str = "") -> None:
    value = _as_real(max_grad_norm)
    if value is None or value <= 0:
        raise ValueError(f"{at}invalid max_grad_norm={max_grad_norm!r}: must be a finite number > 0, or None")


def _check_hyper_parameters(lr, betas, eps, weight_decay, switch_every, max_grad_norm, where: str = "") -> None:
    """Refuse what torch's AdamW refuses, and NaN / inf as well; ``where`` starts the message."""
    at = f"{where}: " if where else ""
    value = _as_real(lr)
    if value is None or value < 0:
        raise ValueError(f"{at}invalid learning rate lr={lr!r}: must be a finite number >= 0")
    if not _valid_betas(betas):
        raise ValueError(f"{at}invalid betas={betas!r}: need two finite values in [0, 1)")
    value = _as_real(eps)
    if value is None or value <= 0:
        raise ValueError(f"{at}invalid eps={eps!r}: must be a finite number > 0")
    value = _as_real(weight_decay)
    if value is None or value < 0:
        raise ValueError(f"{at}invalid weight_decay={weight_decay!r}: must be a finite number >= 0")
    if isinstance(switch_every, bool) or not isinstance(switch_every, int) or switch_every < 1:
        raise ValueError(f"{at}invalid switch_every={switch_every!r}: must be an int >= 1")
    if max_grad_norm is not None:
        _check_max_grad_norm(max_grad_norm, at)


def _state_count(state_dict: dict, key: str, minimum: Optional[int] = None) -> int:
    """``state_dict[key]`` as an int (not a bool), at least ``minimum``."""
    value = state_dict[key]
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or (minimum is not None and number < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"state_dict[{key!r}] must be an int{bound}, got {value!r}")
    return number


def _check_state_tensors(key: str, saved: Any, expected: Sequence[tuple[str, torch.Size]],
                         dtype: torch.dtype = torch.float32) -> None:
    """``saved`` must be one dense tensor of ``dtype`` per active tensor, of its shape (any device)."""
    kind = str(dtype).removeprefix("torch.")
    if not isinstance(saved, (list, tuple)) or len(saved) != len(expected):
        got = f"{len(saved)} items" if isinstance(saved, (list, tuple)) else type(saved).__name__
        raise ValueError(f"state_dict[{key!r}] must be a list of {len(expected)} {kind} tensors (one per tensor "
                         f"of the active block), got {got}")
    for i, (tensor, (name, shape)) in enumerate(zip(saved, expected)):
        want = f"expected a {kind} tensor of shape {tuple(shape)}"
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"state_dict[{key!r}][{i}] ({name}) is a {type(tensor).__name__}; {want}")
        if tensor.dtype != dtype or tensor.shape != shape or tensor.layout != torch.strided:
            raise ValueError(f"state_dict[{key!r}][{i}] ({name}) is a {tensor.dtype} tensor of shape "
                             f"{tuple(tensor.shape)}; {want}")


def _check_step_states(saved: Any, count: int) -> None:
    """One float64 ``[t, beta1^t, beta2^t]`` of shape (3,) per param group, with sensible values."""
    want = "a float64 tensor [t, beta1^t, beta2^t] of shape (3,)"
    if not isinstance(saved, (list, tuple)) or len(saved) != count:
        got = f"{len(saved)} items" if isinstance(saved, (list, tuple)) else type(saved).__name__
        raise ValueError(f"state_dict['step_states'] must be a list of {count} (one per param group) of {want}, "
                         f"got {got}")
    for gi, state in enumerate(saved):
        if not isinstance(state, torch.Tensor) or state.dtype != torch.float64 or state.shape != (3,):
            got = (f"a {state.dtype} tensor of shape {tuple(state.shape)}" if isinstance(state, torch.Tensor)
                   else f"a {type(state).__name__}")
            raise ValueError(f"state_dict['step_states'][{gi}] is {got}; expected {want}")
        t, beta1_t, beta2_t = state.detach().cpu().tolist()
        if not (math.isfinite(t) and t >= 0 and t == int(t) and 0 <= beta1_t <= 1 and 0 <= beta2_t <= 1):
            raise ValueError(f"state_dict['step_states'][{gi}] holds {[t, beta1_t, beta2_t]}: not a step state "
                             "(t a whole number >= 0, beta powers in [0, 1])")


def _build_partition(model_or_named, named, blocks, block_param_names, include_embedding,
                     include_lm_head, active_modules, stray) -> BlockPartition:
    if blocks is not None and block_param_names is not None:
        raise ValueError("give either blocks (prefixes) or block_param_names, not both")
    common = dict(active_modules=tuple(active_modules), stray=stray)
    if block_param_names is not None:
        return partition_from_blocks(named, block_param_names, **common)
    if blocks is not None:
        return partition_from_prefixes(named, blocks, **common)
    return infer_partition(
        model_or_named, include_embedding=include_embedding, include_lm_head=include_lm_head, **common
    )


def _resolve_param_groups(param_groups: Optional[Sequence[dict]], managed: list[nn.Parameter]) -> list[dict]:
    """Torch-style groups over exactly the managed parameters (one group by default)."""
    if param_groups is None:
        return [{"params": managed}]
    managed_ids = {id(p) for p in managed}
    seen: set[int] = set()
    groups = []
    for gi, group in enumerate(param_groups):
        if "params" not in group:
            raise ValueError(f"param group {gi} has no 'params'")
        params = [p for p in group["params"] if id(p) in managed_ids]
        for p in params:
            if id(p) in seen:
                raise ValueError(f"a parameter appears in two param groups (group {gi})")
            seen.add(id(p))
        if params:
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    missing = [p for p in managed if id(p) not in seen]
    if missing:
        raise ValueError(
            f"{len(missing)} block parameter(s) are in no param group; every trainable parameter of the "
            "partition must be in exactly one group"
        )
    return groups

