"""LlamaFactory's BAdam path (``use_badam: true``) trained by badam_ext's BlockAdam, with backward pruning.

One command, the same arguments as ``llamafactory-cli``::

    badam-ext-llamafactory train cfg.yaml        # or: python -m badam_ext.integrations.llamafactory train cfg.yaml

or one line in a Python script, before LlamaFactory builds its trainer::

    import badam_ext.integrations.llamafactory as lf; lf.patch()

The patch (idempotent, this process only) replaces LlamaFactory's BAdam optimizer factory, which
has the model at hand, so BlockAdam gets the module and prunes backward below the active block. It
also stands in for the two things LlamaFactory's trainers take from the reference ``badam`` package:
its Trainer callback (whose gradient-checkpointing patch fails on transformers 5; BlockAdam's pruner
does that job) and its gradient clipping (accelerate's own clipping is used). LlamaFactory still
checks that the reference package is installed (``badam>=1.2.1``); its code is not used.

Argument mapping (LlamaFactory -> BlockAdam):

=========================  ==================================================================
``badam_switch_interval``  ``switch_every`` (K); ``-1``: no switching (the first block stays)
``badam_switch_mode``      ``switch_mode`` (``ascending`` when unset)
``badam_start_block``      ``start_block``
``badam_verbose``          1: every block switch is printed; 2: also the trainable parameter names
``learning_rate``,         ``lr``, ``betas``, ``eps``, ``weight_decay`` (biases and norms get none);
``adam_beta1/2``, ...      ``seed`` from ``seed``; gradient clipping stays with the Trainer
``badam_mode: ratio``      refused with a message (not implemented by badam_ext)
DeepSpeed ZeRO-3, several  refused with a message (BlockAdam under LlamaFactory runs on one device)
processes
=========================  ==================================================================
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Optional, Sequence

import torch

from ..compat import switch_every_from_reference
from ..logs import show_info
from ..optimizer import BlockAdam

logger = logging.getLogger("badam_ext")

_PATCHED = "_badam_ext_patched"


class UnsupportedConfig(ValueError):
    """A LlamaFactory configuration badam_ext cannot honour (the message says what to change)."""


def block_adam_from_llamafactory(model: torch.nn.Module, training_args: Any, finetuning_args: Any, *,
                                 zero3: bool = False) -> BlockAdam:
    """The BlockAdam for a LlamaFactory run: hyper-parameters from its TrainingArguments, the block
    schedule from its ``badam_*`` FinetuningArguments (see the module docstring for the mapping)."""
    mode = getattr(finetuning_args, "badam_mode", "layer")
    if mode != "layer":
        raise UnsupportedConfig(
            f"badam_mode: {mode} is not supported by badam_ext (it trains whole blocks, layer by layer): set "
            "badam_mode: layer, or run llamafactory-cli without badam_ext to use the reference's ratio mode"
        )
    if zero3:
        raise UnsupportedConfig(
            "DeepSpeed ZeRO-3 is enabled: badam_ext does not run under DeepSpeed. Train on one device without "
            "a deepspeed config (BlockAdam keeps only the active block's fp32 state, about 16 bytes per "
            "parameter of one layer)"
        )
    if getattr(training_args, "deepspeed", None):
        raise UnsupportedConfig("a deepspeed config is set: badam_ext does not run under DeepSpeed; remove it")
    if int(getattr(training_args, "world_size", 1)) > 1:
        raise UnsupportedConfig(
            "several processes: BlockAdam under LlamaFactory runs on one device (LlamaFactory's trainer "
            "wraps the model in DDP); set CUDA_VISIBLE_DEVICES to one GPU"
        )
    optim = getattr(training_args, "optim", "adamw_torch")
    optim = str(getattr(optim, "value", optim))  # an OptimizerNames enum in TrainingArguments
    if not optim.startswith("adamw"):
        raise UnsupportedConfig(
            f"optim: {optim}: BlockAdam runs its own fused AdamW; use an AdamW optim (e.g. adamw_torch)"
        )
    interval = finetuning_args.badam_switch_interval
    if interval is None:
        raise UnsupportedConfig("badam_switch_interval is unset: give the steps per block, or -1 for no switching")
    verbose = int(getattr(finetuning_args, "badam_verbose", 0) or 0)
    try:
        opt = BlockAdam(
            model,
            lr=float(training_args.learning_rate),
            betas=(float(training_args.adam_beta1), float(training_args.adam_beta2)),
            eps=float(training_args.adam_epsilon),
            weight_decay=float(training_args.weight_decay),
            switch_every=switch_every_from_reference(int(interval)),
            switch_mode=finetuning_args.badam_switch_mode or "ascending",
            start_block=finetuning_args.badam_start_block,
            seed=int(getattr(training_args, "seed", 0)),
            verbose=verbose,
        )
    except ValueError as e:  # e.g. badam_switch_mode: fixed without badam_start_block
        raise UnsupportedConfig(f"BlockAdam cannot be built from this configuration: {e}") from e
    if verbose >= 2:
        opt.add_switch_hook(_log_trainable_names(opt))
    show_info(logger)
    pruning = opt.pruner is not None
    logger.info("BlockAdam for LlamaFactory: %d blocks, %s, mode %s, backward pruning %s",
                len(opt.partition), "no switching" if interval == -1 else f"switch every {interval} steps",
                opt.schedule.mode, "on" if pruning else "off")
    return opt


def _log_trainable_names(opt: BlockAdam):
    def hook(old: Optional[int], new: int, info: dict) -> None:
        for name, _ in opt.partition.trainable_params(new):
            logger.info("BlockAdam: trainable %s", name)

    return hook


def _clip_grad_norm(self: Any, parameters: Any, max_norm: float, norm_type: float = 2):
    """Stands in for the reference's ``clip_grad_norm_old_version`` (sparse gradients of its ratio
    mode): accelerate's own clipping, for the dense gradients BlockAdam's blocks get."""
    from accelerate import Accelerator

    return Accelerator.clip_grad_norm_(self, parameters, max_norm, norm_type=norm_type)


def _callback_class():
    from transformers import TrainerCallback

    class BlockAdamLlamaFactoryCallback(TrainerCallback):
        """Stands in for the reference's ``BAdamCallback``: BlockAdam's pruner already removes the
        input-grad hook and handles checkpointing, before every forward."""

    return BlockAdamLlamaFactoryCallback


def patch() -> None:
    """Make this process's LlamaFactory build BlockAdam for ``use_badam: true`` (idempotent)."""
    try:
        import badam
        from llamafactory.train import trainer_utils
    except ImportError as e:
        raise ImportError(
            f"badam_ext's LlamaFactory integration needs LlamaFactory and the reference badam package "
            f"(LlamaFactory checks for it): pip install llamafactory badam ({e})"
        ) from e
    if getattr(trainer_utils, _PATCHED, False):
        return
    from transformers.integrations import is_deepspeed_zero3_enabled

    def create_badam_optimizer(model, training_args, finetuning_args):
        return block_adam_from_llamafactory(model, training_args, finetuning_args,
                                            zero3=is_deepspeed_zero3_enabled())

    trainer_utils._create_badam_optimizer = create_badam_optimizer
    # LlamaFactory's trainers import these two from the reference package in their __init__.
    badam.BAdamCallback = _callback_class()
    badam.clip_grad_norm_old_version = _clip_grad_norm
    setattr(trainer_utils, _PATCHED, True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``llamafactory-cli`` with the patch applied (same commands and arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["train"]:
        from llamafactory.extras.misc import get_device_count, is_env_enabled

        if is_env_enabled("FORCE_TORCHRUN") or is_env_enabled("USE_MCA") or get_device_count() > 1:
            raise SystemExit(
                "badam-ext-llamafactory: LlamaFactory would start several processes (torchrun), which would "
                "not see the patch, and BlockAdam under LlamaFactory runs on one device: expose one GPU "
                "(CUDA_VISIBLE_DEVICES=0) and unset FORCE_TORCHRUN"
            )
    patch()
    from llamafactory import launcher

    saved = sys.argv
    sys.argv = ["llamafactory-cli", *args]
    try:
        launcher.launch()
    except UnsupportedConfig as e:
        raise SystemExit(f"badam-ext-llamafactory: {e}") from None
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
