"""Hugging Face Trainer and TRL integration (``badam_ext.hf``, reachable after ``import badam_ext``).

Routes in, each tested with ``transformers.Trainer`` and TRL's ``SFTTrainer``:

* the model object at hand: ``Trainer(..., optimizers=(BlockAdam(model, ...), None))``;
* no model object yet (TRL given a model id, ``SFTTrainer(model="org/name", ...)``): build the trainer,
  then ``badam_ext.hf.use_block_adam(trainer, switch_every=100)`` before ``trainer.train()``;
* ``Trainer(optimizer_cls_and_kwargs=(BlockAdam, {"model": model, "lr": 1e-5, "switch_every": 100}))``:
  Trainer hands the ``model`` entry to the optimizer class in place of its parameter groups (which
  carry no names; without ``model`` BlockAdam refuses them with this advice). As with any optimizer
  given this way, the learning rate and weight decay come from the kwargs, not the TrainingArguments;
* in a Trainer subclass: ``self.optimizer = block_adam_for_trainer(self, ...)`` in ``create_optimizer``.

Trainer builds its learning-rate scheduler on BlockAdam's param groups, clips gradients itself
(``max_grad_norm``), and saves the whole BlockAdam state (block, schedule, master/m/v) in every
checkpoint, so ``trainer.train(resume_from_checkpoint=...)`` continues the same run.
"""
from __future__ import annotations

from typing import Any, Union

from .optimizer import BlockAdam


def block_adam_for_trainer(trainer: Any, *, memory_savings: Union[bool, dict] = True,
                           **block_adam_kwargs: Any) -> BlockAdam:
    """A :class:`BlockAdam` over ``trainer.model`` with lr / betas / eps / weight decay from ``trainer.args``.

    Keyword arguments override the TrainingArguments and pass BlockAdam's own options
    (``switch_every``, ``switch_mode``, ``include_embedding``, ...). ``memory_savings`` (on by
    default; a dict passes options) applies :func:`badam_ext.apply_memory_savings` to the model: the
    fused loss, and checkpoint offload when the memory plan says the step does not fit otherwise.
    """
    if memory_savings:
        from .memory.savings import default_memory_savings

        default_memory_savings(trainer.model, **(memory_savings if isinstance(memory_savings, dict) else {}))
    args = trainer.args
    options = dict(
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
        seed=args.seed,
    )
    options.update(block_adam_kwargs)
    return BlockAdam(trainer.model, **options)


def use_block_adam(trainer: Any, **block_adam_kwargs: Any) -> BlockAdam:
    """Give an already built trainer (``Trainer``, TRL's trainers, any subclass) a :class:`BlockAdam`.

    For when the model object exists only inside the trainer (TRL loads a model id). Call it after
    constructing the trainer and before ``train()``; the optimizer is built as
    :func:`block_adam_for_trainer` builds it and Trainer then makes its scheduler on it. Returns the
    optimizer.
    """
    if getattr(trainer, "optimizer", None) is not None:
        raise ValueError("the trainer already has an optimizer: call use_block_adam(trainer) once, before train(), "
                         "and do not also pass optimizers=(...) to the trainer")
    if getattr(trainer, "optimizer_cls_and_kwargs", None) is not None:
        raise ValueError("the trainer was given optimizer_cls_and_kwargs; use either that or use_block_adam")
    if getattr(trainer, "lr_scheduler", None) is not None:
        raise ValueError("the trainer already has a learning-rate scheduler, built for another optimizer")
    world_size = int(getattr(trainer.args, "world_size", 1))
    if world_size > 1:
        raise ValueError(f"Trainer runs {world_size} processes and wraps the model in DDP, which BlockAdam refuses; "
                         "run BlockAdam's own data parallel under torchrun in a loop of your own, or one process")
    trainer.optimizer = block_adam_for_trainer(trainer, **block_adam_kwargs)
    return trainer.optimizer
