"""Memory savings on by default where users meet them: the CLI's train, the Trainer helper, the profiler."""
from __future__ import annotations

import json

import pytest
import torch
from _tiny_models import enable_checkpointing, tiny_batch, tiny_model

from badam_ext import BlockAdam, apply_memory_savings
from badam_ext.memory.savings import default_memory_savings
from badam_ext.profiling import VramProfiler

transformers = pytest.importorskip("transformers")


def test_train_uses_the_fused_loss_by_default_and_can_opt_out(tmp_path) -> None:
    from badam_ext.train import TrainConfig, run

    common = dict(steps=3, switch_every=1, progress=False, sample_interval_s=None, seq_len=32, batch_size=2)
    on = run(TrainConfig(out=str(tmp_path / "on"), **common))
    assert on["memory_savings"]["fused_loss"] and on["memory_savings"]["fused_loss_calls"] == 3
    assert on["memory_savings"]["offload_mode"] == "auto"
    report = json.loads((tmp_path / "on" / "vram_report.json").read_text())
    assert report["memory_savings"]["loss_backend"] in ("torch", "liger")
    off = run(TrainConfig(out=str(tmp_path / "off"), memory_savings=False, **common))
    assert off["memory_savings"] is None
    assert abs(on["train_loss_first"] - off["train_loss_first"]) < 1e-5
    # layer kernels: auto stays off without CUDA / Liger; "on" where they cannot run is refused
    assert on["memory_savings"]["layer_kernels"] is (torch.cuda.is_available() and _liger())
    if not torch.cuda.is_available():
        from badam_ext.memory.layer_kernels import LayerKernelsUnavailable

        with pytest.raises(LayerKernelsUnavailable):
            run(TrainConfig(out=str(tmp_path / "lk"), layer_kernels="on", **common))
    with pytest.raises(ValueError, match="layer_kernels must be auto, on or off"):
        run(TrainConfig(out=str(tmp_path / "bad"), layer_kernels="yes", **common))


def _liger() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def test_trainer_helper_applies_them_once(tmp_path) -> None:
    from badam_ext.hf import block_adam_for_trainer

    model = tiny_model("llama", num_layers=2)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1)
    trainer = transformers.Trainer(model=model, args=args)
    opt = block_adam_for_trainer(trainer, switch_every=2, backend="torch")
    handle = model._badam_memory_savings
    assert handle.loss is not None
    opt.close()
    block_adam_for_trainer(trainer, switch_every=2, backend="torch")  # again: the same handle
    assert model._badam_memory_savings is handle
    other = tiny_model("llama", num_layers=2)
    block_adam_for_trainer(transformers.Trainer(model=other, args=args), memory_savings=False, backend="torch")
    assert getattr(other, "_badam_memory_savings", None) is None


def test_unsupported_model_falls_back_to_its_own_loss(caplog) -> None:
    model = tiny_model("gpt2", num_layers=2)
    savings = default_memory_savings(model, offload_checkpoints=False)
    assert savings.loss is None
    assert "model's own loss" in caplog.text


def test_applying_twice_is_refused_until_removed() -> None:
    model = tiny_model("llama", num_layers=2)
    savings = apply_memory_savings(model)
    with pytest.raises(ValueError, match="already applied"):
        apply_memory_savings(model)
    savings.remove()
    apply_memory_savings(model).remove()


def test_profiler_reports_offloaded_bytes_and_the_loss(capsys) -> None:
    model = tiny_model("llama", num_layers=3)
    enable_checkpointing(model, reentrant=False)
    savings = apply_memory_savings(model, offload_checkpoints=True, min_offload_bytes=0)
    opt = BlockAdam(model, lr=1e-3, backend="torch", switch_mode="ascending")  # block 0: every layer saves
    prof = VramProfiler(device="cpu")
    prof.attach(opt)
    prof.attach_memory_savings(savings)
    with prof:
        model(**tiny_batch(model)).loss.backward()
        opt.step()
    report = prof.report()
    stats = report.to_dict()["memory_savings"]
    assert stats["offloaded_bytes"] == 3 * 2 * 8 * 32 * 4 and stats["loss_planned_bytes"] > 0
    report.print()
    out = capsys.readouterr().out
    assert "checkpoints offloaded to host (last step)" in out and "fused (" in out
    with pytest.raises(TypeError, match="apply_memory_savings"):
        prof.attach_memory_savings(object())
