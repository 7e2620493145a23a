"""BlockAdam inside transformers.Trainer and TRL's SFTTrainer: every documented route in, checkpoint
save and resume."""
from __future__ import annotations

import pytest
import torch
from _tiny_models import tiny_model
from _tiny_tokenizer import save_tiny_checkpoint

from badam_ext import BlockAdam
from badam_ext.hf import block_adam_for_trainer, use_block_adam

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


def _moved(model, initial) -> set[str]:
    """Top-level parts (``layers.N``, ``embed_tokens``, ``lm_head``...) whose weights changed."""
    parts = set()
    for n, p in model.named_parameters():
        if not torch.equal(p, initial[n]):
            parts.add(".".join(n.split(".")[1:3]) if n.startswith("model.layers.") else n.split(".")[-2])
    return parts


def test_optimizer_cls_and_kwargs_with_the_model_in_the_kwargs(tmp_path):
    model = tiny_model("llama", num_layers=2)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    kwargs = {"model": model, "lr": 5e-3, "switch_every": 2, "switch_mode": "ascending", "backend": "torch"}
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, 4), train_dataset=_Tokens(),
                                   optimizer_cls_and_kwargs=(BlockAdam, kwargs))
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, BlockAdam)
    assert trainer.optimizer.optimizer.pruner is not None  # built on the module: backward pruning on
    assert _moved(model, initial) == {"layers.0", "layers.1"}


def test_optimizer_cls_and_kwargs_without_the_model_says_how(tmp_path):
    model = tiny_model("llama", num_layers=2)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, 2), train_dataset=_Tokens(),
                                   optimizer_cls_and_kwargs=(BlockAdam, {"lr": 1e-3}))
    with pytest.raises(TypeError, match=r"param groups.*'model': model.*use_block_adam"):
        trainer.train()


def test_use_block_adam_on_a_built_trainer(tmp_path):
    model = tiny_model("llama", num_layers=2)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, 4, weight_decay=0.02), train_dataset=_Tokens())
    opt = use_block_adam(trainer, switch_every=2, switch_mode="descending", backend="torch")
    assert opt.param_groups[0]["lr"] == 5e-3 and opt.param_groups[0]["weight_decay"] == 0.02  # from the args
    with pytest.raises(ValueError, match="already has an optimizer"):
        use_block_adam(trainer)
    trainer.train()
    assert trainer.optimizer.optimizer is opt
    assert _moved(model, initial) == {"layers.0", "layers.1"}


def _sft_setup(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    path = save_tiny_checkpoint(tmp_path / "model", num_layers=2)
    data = datasets.Dataset.from_list([{"text": f"{a} plus {b} is {a + b}."} for a in range(8) for b in range(4)])
    config = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                           learning_rate=1e-2, lr_scheduler_type="linear", report_to=[], use_cpu=True,
                           logging_steps=1, save_strategy="no", max_length=32, disable_tqdm=True, seed=0)
    return trl, path, data, config


def test_trl_sft_trainer_given_a_model_id(tmp_path):
    trl, path, data, config = _sft_setup(tmp_path)
    trainer = trl.SFTTrainer(model=str(path), args=config, train_dataset=data)  # no model object before this
    opt = use_block_adam(trainer, switch_every=2, switch_mode="ascending", backend="torch")
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.optimizer.optimizer is opt and opt.pruner is not None
    assert _moved(trainer.model, initial) == {"layers.0", "layers.1"}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_trl_sft_trainer_with_optimizer_cls_and_kwargs(tmp_path):
    trl, path, data, config = _sft_setup(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    kwargs = {"model": model, "lr": 1e-2, "switch_every": 4, "start_block": 1, "switch_mode": "ascending",
              "backend": "torch"}
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, optimizer_cls_and_kwargs=(BlockAdam, kwargs))
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, BlockAdam)
    assert _moved(model, initial) == {"layers.1"}
