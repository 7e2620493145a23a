"""Hugging Face Trainer integration.

Two ways in:

* pass an optimizer: ``Trainer(..., optimizers=(BlockAdam(model, ...), scheduler))``;
* subclass Trainer and build it from the TrainingArguments::

      class MyTrainer(Trainer):
          def create_optimizer(self):
              self.optimizer = block_adam_for_trainer(self, switch_every=100, switch_mode="random")
              return self.optimizer

Checkpoints saved by Trainer hold the whole BlockAdam state (block, schedule, master/m/v), so
``trainer.train(resume_from_checkpoint=...)`` continues the same run.
"""
from __future__ import annotations

from typing import Any

from .optimizer import BlockAdam


def block_adam_for_trainer(trainer: Any, **block_adam_kwargs: Any) -> BlockAdam:
    """A :class:`BlockAdam` over ``trainer.model`` with lr / betas / eps / weight decay from ``trainer.args``.

    Keyword arguments override the TrainingArguments and pass BlockAdam's own options
    (``switch_every``, ``switch_mode``, ``include_embedding``, ...).
    """
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
