"""Drop-in constructor for users of the reference ``badam.BlockOptimizer``.

``BlockOptimizer(base_optimizer=AdamW(...), named_parameters_list=..., switch_block_every=...)`` takes
the reference's arguments, reads lr / betas / eps / weight decay and the param groups from the base
optimizer, and returns a :class:`BlockAdam`. What cannot be honoured is refused with a clear error,
never silently ignored.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .optimizer import BlockAdam

logger = logging.getLogger("badam_ext")

_ADAM_TYPES = (torch.optim.Adam, torch.optim.AdamW)

#: K meaning "never switch": more optimizer steps than any run takes.
NO_SWITCH = 2**31 - 1


def BlockOptimizer(  # noqa: N802 - mirrors the reference's class name on purpose
    base_optimizer: torch.optim.Optimizer,
    named_parameters_list: Sequence[tuple[str, nn.Parameter]],
    block_prefix_list: Optional[Sequence[Sequence[str]]] = None,
    switch_block_every: int = 50,
    start_block: Optional[int] = None,
    switch_mode: str = "descending",
    active_modules: Sequence[str] = (),
    include_embedding: bool = False,
    include_lm_head: bool = False,
    verbose: int = 1,
    log_fn: Optional[Callable] = None,
    ds_zero3_enabled: Optional[bool] = None,
    model: Optional[nn.Module] = None,
    **block_adam_kwargs,
) -> BlockAdam:
    """Build a :class:`BlockAdam` from the reference BAdam's arguments (defaults as the reference's).

    Differences from the reference, by design: every block gets exactly ``switch_block_every`` steps
    (the reference gives the first block one fewer); ``switch_block_every=-1`` means no switching (as
    LlamaFactory documents it; the reference then switches at every step); per-group weight decay is
    honoured and biases and norm weights get none; the state_dict holds the schedule, so resuming
    continues the same run. ``ds_zero3_enabled=True`` is refused (no DeepSpeed); ``verbose`` >= 1
    logs every block switch visibly.
    Pass ``model=`` (the module whose parameters ``named_parameters_list`` holds) to get backward
    pruning, which needs the module structure. Extra keyword arguments go to :class:`BlockAdam`
    (``max_grad_norm``, ``backend``, ...).
    """
    lr, betas, eps, weight_decay, groups = _read_base_optimizer(base_optimizer)
    if ds_zero3_enabled:
        raise ValueError(
            "ds_zero3_enabled=True: badam_ext does not run under DeepSpeed ZeRO-3. Train on one GPU, or shard "
            "with FSDP2 (fully_shard) and build BlockAdam(model, ...) on the sharded model"
        )
    if log_fn is not None:
        logger.info("BlockOptimizer: log_fn is not used; badam_ext logs through the 'badam_ext' logger")
    named = list(named_parameters_list)
    if model is not None and {id(p) for _, p in named} != {id(p) for p in model.parameters()}:
        raise ValueError("model= must be the module whose parameters named_parameters_list holds")
    if any("lora" in n for n, _ in named):
        raise ValueError(
            "LoRA parameters found: badam_ext trains full parameters block by block; "
            "merge the adapters or train them with a plain optimizer"
        )
    return BlockAdam(
        model if model is not None else named,
        lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
        switch_every=switch_every_from_reference(switch_block_every),
        switch_mode=switch_mode,
        start_block=start_block,
        blocks=[list(b) if not isinstance(b, str) else b for b in block_prefix_list] if block_prefix_list else None,
        include_embedding=include_embedding,
        include_lm_head=include_lm_head,
        active_modules=tuple(active_modules),
        param_groups=groups,
        verbose=verbose,
        **block_adam_kwargs,
    )


def switch_every_from_reference(switch_block_every: int) -> int:
    """K for BlockAdam from the reference's ``switch_block_every``; -1 (LlamaFactory: no switching) is
    :data:`NO_SWITCH`, so the first block stays active for the whole run."""
    if isinstance(switch_block_every, bool) or not isinstance(switch_block_every, int):
        raise TypeError(f"switch_block_every must be an int, got {switch_block_every!r}")
    if switch_block_every == -1:
        return NO_SWITCH
    if switch_block_every < 1:
        raise ValueError(f"switch_block_every must be >= 1, or -1 for no switching; got {switch_block_every}")
    return switch_block_every


def _read_base_optimizer(opt: torch.optim.Optimizer):
    if not isinstance(opt, _ADAM_TYPES):
        raise TypeError(
            f"BlockOptimizer supports an Adam or AdamW base optimizer; got {type(opt).__name__}. "
            "badam_ext runs its own fused AdamW, so other update rules cannot be honoured."
        )
    is_adamw = isinstance(opt, torch.optim.AdamW)
    groups = []
    for gi, g in enumerate(opt.param_groups):
        if g.get("amsgrad"):
            raise ValueError(f"param group {gi}: amsgrad=True is not supported by badam_ext's fused AdamW")
        if g.get("maximize"):
            raise ValueError(f"param group {gi}: maximize=True is not supported")
        if not is_adamw and g.get("weight_decay", 0.0) != 0.0:
            raise ValueError(
                f"param group {gi}: torch.optim.Adam with weight_decay applies L2 regularisation (coupled); "
                "badam_ext implements decoupled decay only. Use torch.optim.AdamW as the base optimizer."
            )
        groups.append({
            "params": list(g["params"]),
            "lr": float(g["lr"]),
            "betas": tuple(g["betas"]),
            "eps": float(g["eps"]),
            "weight_decay": float(g.get("weight_decay", 0.0)),
        })
    d = opt.defaults
    return float(d["lr"]), tuple(d["betas"]), float(d["eps"]), float(d.get("weight_decay", 0.0)), groups
