"""BlockAdam inside transformers.Trainer: training, checkpoint save and resume."""
from __future__ import annotations

import pytest
import torch
from _tiny_models import tiny_model

from badam_ext import BlockAdam
from badam_ext.hf import block_adam_for_trainer

transformers = pytest.importorskip("transformers")


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, seq: int = 12) -> None:
        gen = torch.Generator().manual_seed(11)
        self.ids = torch.randint(3, 128, (n, seq), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(tmp_path, max_steps: int, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=max_steps, learning_rate=5e-3,
        lr_scheduler_type="linear", warmup_steps=0, logging_steps=100, save_strategy="steps", save_steps=4,
        report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, **kw,
    )


def _trainer(tmp_path, max_steps: int):
    model = tiny_model("llama", num_layers=3)
    args = _args(tmp_path, max_steps)
    opt = BlockAdam(model, lr=args.learning_rate, switch_every=3, switch_mode="random", backend="torch", seed=2)
    sched = transformers.get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=max_steps)
    return model, transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, sched))


def test_trainer_resume_continues_the_same_run(tmp_path):
    model_a, trainer_a = _trainer(tmp_path / "a", 8)
    trainer_a.train()
    model_b, trainer_b = _trainer(tmp_path / "b", 8)
    # Resume run b from run a's step-4 checkpoint: it must end exactly where run a ended.
    trainer_b.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    for (n, p), (_, q) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.equal(p, q), f"{n} differs after resuming from the checkpoint"
    assert trainer_a.optimizer.optimizer.active_block == trainer_b.optimizer.optimizer.active_block


def test_helper_for_trainer_subclasses(tmp_path):
    class BlockTrainer(transformers.Trainer):
        def create_optimizer(self):
            self.optimizer = block_adam_for_trainer(self, switch_every=2, switch_mode="ascending", backend="torch")
            return self.optimizer

    model = tiny_model("llama", num_layers=2)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = BlockTrainer(model=model, args=_args(tmp_path, 4, weight_decay=0.01), train_dataset=_Tokens())
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, BlockAdam)
    assert opt.param_groups[0]["weight_decay"] == 0.01
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, initial[n])}
    assert any(n.startswith("model.layers.0.") for n in moved)
    assert any(n.startswith("model.layers.1.") for n in moved)
    assert not any(n.startswith("lm_head") or n.startswith("model.embed") for n in moved)
