"""BlockAdam: block coordinate AdamW (BAdam) on a reusable arena with fused kernels.

Only the active block is trainable. Its fp32 master weights and Adam moments live in one
``BlockArena`` allocated once; a block switch lays the next block out in the same memory and fills it
with one fused load. ``step()`` is one fused AdamW launch per (param group, dtype) over the whole
block, writing the low-precision weights in the same pass.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from collections import OrderedDict
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .arena import BlockArena, required_capacity
from .fsdp import local_tensor, sharding_of
from .launch_groups import LaunchGroup, build_launch_groups
from .logs import show_info
from .ops import get_backend
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


def default_no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases and normalization weights (1-D tensors) get no weight decay."""
    return param.dim() <= 1 or name.endswith(".bias")


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
        backend: str = "auto",
        prune_backward: bool = True,
        param_groups: Optional[Sequence[dict]] = None,
        seed: int = 0,
        verbose: int = 0,
        distributed: Optional[bool] = None,
        process_group: Any = None,
    ) -> None:
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

        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        groups = _resolve_param_groups(param_groups, [p for _, p in managed])
        super().__init__(groups, defaults)
        for group in self.param_groups:
            _check_hyper_parameters(group["lr"], group["betas"], group["eps"], group["weight_decay"], 1, None)
        self._group_of = {id(p): gi for gi, g in enumerate(self.param_groups) for p in g["params"]}

        self.no_decay = no_decay
        self.max_grad_norm = max_grad_norm
        self.stochastic_rounding = stochastic_rounding
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

        capacity = max(self._local_capacity(i) for i in range(len(self.partition)))
        # a rank whose shards of every block are empty still needs an arena to exist
        self.arena = BlockArena(capacity or required_capacity([1]), self.device)
        self._step_states = [self._ops.new_step_state(self.device) for _ in self.param_groups]
        self._partials: Optional[torch.Tensor] = None
        self.last_grad_norm: Optional[torch.Tensor] = None

        self._grad_sync = _make_grad_sync(distributed, process_group, sharded=self._sharding is not None)

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

        self.active_block: int = -1
        self._launch_groups: list[LaunchGroup] = []
        self._views: tuple[list[torch.Tensor], ...] = ()
        self._activate(self.schedule.active)

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
        return required_capacity(numels)

    @property
    def active_params(self) -> list[nn.Parameter]:
        return [p for lg in self._launch_groups for p in lg.params]

    def _activate(self, index: int) -> None:
        """Make block ``index`` trainable and load it into the arena (no allocation)."""
        old = self.active_block if self.active_block >= 0 else None
        for lg in self._launch_groups:
            for p in lg.params:
                p.grad = None
        apply_requires_grad(self.partition, index)
        named = self._active_named(index)
        names = [n for n, _ in named]
        params = [p for _, p in named]
        self._trainable = params
        held = self._local_named(index)
        offsets: list[int] = []
        self._views = ([], [], [])
        if held or self._sharding is None:  # FSDP2: a rank may hold no element of the block
            layout = self.arena.layout([t.numel() for _, _, t in held])
            self.arena.check_tensors(layout, [t.detach() for _, _, t in held])
            self._views = self.arena.views(layout, [list(t.shape) for _, _, t in held])
            offsets = list(layout.offsets)
        self._launch_groups = build_launch_groups(
            [n for n, _, _ in held], [p for _, p, _ in held], offsets,
            group_of=lambda p: self._group_of[id(p)],
            decays=lambda n, p: not self.no_decay(n, p),
            build_tables=self._ops.BlockTables.build,
            local=local_tensor,
        )
        master, exp_avg, exp_avg_sq = (self.arena.flat(r) for r in ("master", "exp_avg", "exp_avg_sq"))
        for lg in self._launch_groups:
            self._ops.block_load(lg.tables, master, exp_avg, exp_avg_sq)
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
            "arena_bytes": 3 * 4 * self._local_capacity(index),
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
        """One AdamW step on the active block; switches block after every K-th step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
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
        grads = [lg.grads() for lg in self._launch_groups]
        loss_scale = getattr(self, "grad_scale", None)  # set by torch GradScaler (fp16)
        grad_scale = None if loss_scale is None else loss_scale.float().reciprocal()
        if self.max_grad_norm is not None:
            norm = self._grad_norm(grads)
            if grad_scale is not None:
                norm = norm * grad_scale
            self.last_grad_norm = norm
            coef = (self.max_grad_norm / (norm + 1e-6)).clamp_(max=1.0)
            grad_scale = coef if grad_scale is None else grad_scale * coef
        master, exp_avg, exp_avg_sq = (self.arena.flat(r) for r in ("master", "exp_avg", "exp_avg_sq"))
        stepped_groups = set()
        for lg, lg_grads in zip(self._launch_groups, grads):
            group = self.param_groups[lg.group_index]
            beta1, beta2 = group["betas"]
            state = self._step_states[lg.group_index]
            if lg.group_index not in stepped_groups:
                self._ops.advance_step(state, beta1, beta2, found_inf)
                stepped_groups.add(lg.group_index)
            self._ops.fused_adamw_step(
                lg.tables, lg_grads, master, exp_avg, exp_avg_sq, state,
                lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], grad_scale=grad_scale, found_inf=found_inf,
                stochastic_rounding=self.stochastic_rounding, seed=self._seed * 1_000_003 + self._sr_counter,
            )
        self._sr_counter += 1
        for p in self._trainable:
            p.grad = None
        if self.schedule.step():
            self._activate(self.schedule.active)
        return loss

    def _grad_norm(self, grads: list[list[torch.Tensor]]) -> torch.Tensor:
        """Global L2 norm of the active block's gradients, on device, deterministic."""
        total = sum(lg.tables.num_chunks for lg in self._launch_groups)
        if self._partials is None or self._partials.numel() < total:
            self._partials = torch.empty(total, dtype=torch.float32, device=self.device)
        start = 0
        for lg, lg_grads in zip(self._launch_groups, grads):
            n = lg.tables.num_chunks
            self._ops.grad_sq_norm(lg.tables, lg_grads, self._partials[start:start + n])
            start += n
        sq = self._partials[:total].sum()
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
        """Detach from the model (pruning hook, data-parallel hooks) and free the arena."""
        if self._prune_hook is not None:
            self._prune_hook.remove()
            self._prune_hook = None
        if self.pruner is not None:
            self.pruner.remove()
        if self._grad_sync is not None:
            self._grad_sync.attach([])
        if not self.arena.released:
            self.arena.release()

    def no_sync(self):
        """Context manager for gradient accumulation under data parallel: no all-reduce inside."""
        if self._grad_sync is None:
            return contextlib.nullcontext()
        return self._grad_sync.no_sync()

    def check_replicas(self) -> None:
        """Debug: raise if the ranks' active-block masters differ (data parallel only)."""
        if self._grad_sync is not None:
            self._grad_sync.check_replicas(list(self._views[0]), what="fp32 master weights")

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically: schedule, block, step counters, master/m/v."""
        master, exp_avg, exp_avg_sq = self._views[:3]
        return {
            "format": STATE_FORMAT,
            "fingerprint": self.partition.fingerprint(),
            "active_block": self.active_block,
            "active_param_names": [n for n, _ in self._active_named(self.active_block)],
            "schedule": self.schedule.state_dict(),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "step_states": [s.detach().cpu().clone() for s in self._step_states],
            # on the host: a checkpoint must not double the active block's state in device memory
            "master": [t.detach().to("cpu", copy=True) for t in master],
            "exp_avg": [t.detach().to("cpu", copy=True) for t in exp_avg],
            "exp_avg_sq": [t.detach().to("cpu", copy=True) for t in exp_avg_sq],
            "sr_counter": self._sr_counter,
            "seed": self._seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by ``state_dict()`` of the same model and partition."""
        if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_FORMAT:
            raise ValueError(
                "not a BlockAdam state_dict (missing format tag "
                f"{STATE_FORMAT!r}); was it saved by another optimizer?"
            )
        if state_dict["fingerprint"] != self.partition.fingerprint():
            raise ValueError(
                "this BlockAdam state was saved for another model or block partition "
                "(parameter names, shapes, dtypes or blocks differ); refusing to load it"
            )
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError(
                f"state has {len(state_dict['param_groups'])} param groups, this optimizer has {len(self.param_groups)}"
            )
        active = state_dict["active_block"]
        if not isinstance(active, int) or not 0 <= active < len(self.partition):
            raise ValueError(f"state's active block {active!r} is out of range for {len(self.partition)} blocks")
        if [n for n, _ in self._active_named(active)] != state_dict["active_param_names"]:
            raise ValueError("active block parameters in the state do not match this model's block")
        self.schedule.load_state_dict(state_dict["schedule"])  # validates its own configuration first
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved)
        self._activate(active)
        for views, saved in zip(self._views[:3], (state_dict[k] for k in ("master", "exp_avg", "exp_avg_sq"))):
            for view, tensor in zip(views, saved):
                view.copy_(tensor)
        for state, saved in zip(self._step_states, state_dict["step_states"]):
            state.copy_(saved)
        self._sr_counter = int(state_dict["sr_counter"])
        self._seed = int(state_dict["seed"])

    # ------------------------------------------------------------------ report
    def describe(self) -> list[dict]:
        """One row per block: index, name, parameter count, arena bytes."""
        return [self.block_info(i) for i in range(len(self.partition))]

    def __repr__(self) -> str:
        return (
            f"BlockAdam(blocks={len(self.partition)}, active={self.active_block}, "
            f"mode={self.schedule.mode!r}, K={self.schedule.switch_every}, backend={self._ops.name!r}, "
            f"arena={self.arena.capacity_bytes / 2**20:.1f} MiB)"
        )


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


def _check_hyper_parameters(lr, betas, eps, weight_decay, switch_every, max_grad_norm) -> None:
    if not isinstance(lr, (float, int)) or lr < 0:
        raise ValueError(f"invalid learning rate {lr!r}: must be a float >= 0")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"invalid betas {betas!r}: need two values in [0, 1)")
    if eps <= 0:
        raise ValueError(f"invalid eps {eps!r}: must be > 0")
    if weight_decay < 0:
        raise ValueError(f"invalid weight_decay {weight_decay!r}: must be >= 0")
    if not isinstance(switch_every, int) or switch_every < 1:
        raise ValueError(f"invalid switch_every {switch_every!r}: must be an int >= 1")
    if max_grad_norm is not None and max_grad_norm <= 0:
        raise ValueError(f"invalid max_grad_norm {max_grad_norm!r}: must be > 0 or None")


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

