"""How users reach BlockAdam: the package's attributes and extension import, verbose output, the
reference-style constructor's LlamaFactory arguments and the LlamaFactory argument mapping (the
real LlamaFactory runs are in test_integrations_llamafactory.py, outside CI)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _tiny_models import tiny_batch, tiny_model

from badam_ext import BlockOptimizer
from badam_ext.compat import NO_SWITCH
from badam_ext.integrations.llamafactory import UnsupportedConfig, block_adam_from_llamafactory

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter from the repository root, as a user would run it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_extension_imports_alone_hf_is_an_attribute_and_verbose_prints_switches():
    # One fresh interpreter, as a user runs it: no torch before the extension, no logging set up.
    done = _python(
        "import sys, badam_ext\n"
        "assert 'torch' not in sys.modules, 'import badam_ext must stay cheap'\n"
        "import badam_ext._C\n"
        "print(badam_ext._C.BlockArena.__name__)\n"
        "print(badam_ext.hf.use_block_adam.__name__, badam_ext.compile_layers.__name__)\n"
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.layers = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(4, 4)) for _ in range(3))\n"
        "    def forward(self, x):\n"
        "        for layer in self.layers:\n"
        "            x = layer(x)\n"
        "        return x.square().mean()\n"
        "net = Net()\n"
        "opt = badam_ext.BlockAdam(net, switch_every=1, switch_mode='ascending', backend='torch', verbose=1)\n"
        "for _ in range(2):\n"
        "    net(torch.ones(2, 4)).backward(); opt.step()\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["BlockArena", "use_block_adam", "compile_layers"]
    for block in range(3):
        assert f"block {block} (layers.{block}) active" in done.stderr


def test_reference_constructor_takes_llamafactory_arguments():
    model = tiny_model("llama", num_layers=3)
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ds_zero3_enabled=False must not warn
        opt = BlockOptimizer(base, list(model.named_parameters()), switch_block_every=-1, switch_mode="ascending",
                             ds_zero3_enabled=False, verbose=0, model=model, backend="torch")
    assert opt.schedule.switch_every == NO_SWITCH
    batch = tiny_batch(model)
    for _ in range(5):
        model(**batch).loss.backward()
        opt.step()
    assert opt.active_block == 0  # -1: no switching
    with pytest.raises(ValueError, match="ZeRO-3"):
        BlockOptimizer(torch.optim.AdamW(model.parameters()), list(model.named_parameters()), ds_zero3_enabled=True)
    with pytest.raises(ValueError, match="-1 for no switching"):
        BlockOptimizer(torch.optim.AdamW(model.parameters()), list(model.named_parameters()), switch_block_every=0)


def _lf_args(**finetuning):
    training = SimpleNamespace(learning_rate=2e-3, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7,
                               weight_decay=0.1, seed=5, optim="adamw_torch", deepspeed=None, world_size=1)
    fields = dict(badam_mode="layer", badam_switch_interval=3, badam_switch_mode="ascending",
                  badam_start_block=None, badam_verbose=0)
    fields.update(finetuning)
    return training, SimpleNamespace(**fields)


def test_llamafactory_arguments_map_onto_block_adam():
    model = tiny_model("llama", num_layers=3)
    training, finetuning = _lf_args(badam_switch_mode="descending", badam_start_block=1)
    opt = block_adam_from_llamafactory(model, training, finetuning)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (2e-3, (0.8, 0.95), 1e-7, 0.1)
    assert (opt.schedule.switch_every, opt.schedule.mode, opt.active_block) == (3, "descending", 1)
    assert opt.pruner is not None  # built on the module: backward pruning
    opt.close()

    training, finetuning = _lf_args(badam_switch_interval=-1, badam_start_block=2)
    opt = block_adam_from_llamafactory(model, training, finetuning)
    batch = tiny_batch(model)
    for _ in range(4):
        model(**batch).loss.backward()
        opt.step()
    assert opt.active_block == 2 and opt.schedule.switch_every == NO_SWITCH
    opt.close()


def test_llamafactory_verbose_2_names_the_trainable_parameters(caplog):
    model = tiny_model("llama", num_layers=2)
    with caplog.at_level(logging.INFO, logger="badam_ext"):
        opt = block_adam_from_llamafactory(model, *_lf_args(badam_switch_interval=1, badam_verbose=2))
        model(**tiny_batch(model)).loss.backward()
        opt.step()
    text = caplog.text
    assert "block 0 (model.layers.0) active" in text and "block 1 (model.layers.1) active" in text
    assert "trainable model.layers.1.mlp.down_proj.weight" in text
    assert "backward pruning on" in text
    opt.close()


@pytest.mark.parametrize("change, message", [
    (dict(finetuning=dict(badam_mode="ratio")), "badam_mode: ratio"),
    (dict(zero3=True), "ZeRO-3"),
    (dict(training=dict(optim="sgd")), "optim: sgd"),
    (dict(training=dict(world_size=2)), "one device"),
    (dict(finetuning=dict(badam_switch_interval=None)), "badam_switch_interval"),
    (dict(finetuning=dict(badam_switch_mode="fixed")), "start_block"),
])
def test_llamafactory_configurations_badam_ext_cannot_honour_are_refused(change, message):
    training, finetuning = _lf_args(**change.get("finetuning", {}))
    for key, value in change.get("training", {}).items():
        setattr(training, key, value)
    with pytest.raises(UnsupportedConfig, match=message):
        block_adam_from_llamafactory(tiny_model("llama", num_layers=2), training, finetuning,
                                     zero3=change.get("zero3", False))
