"""badam_ext under a real LlamaFactory install: `llamafactory-cli train cfg.yaml` end to end on CPU.

Not in CI: run ``bash scripts/test_llamafactory.sh`` (a venv with LlamaFactory 0.9.5 and the
transformers it pins). A tiny Llama and its byte tokenizer are saved to disk, the dataset is a local
JSON file registered in a local dataset_info.json; nothing is downloaded. Each run prints its losses
(``pytest -s`` shows them).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.llamafactory
pytest.importorskip("llamafactory")
safetensors_torch = pytest.importorskip("safetensors.torch")
from _tiny_tokenizer import save_tiny_checkpoint  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lf")
    save_tiny_checkpoint(root / "model", num_layers=3)
    records = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} + {b} = {a + b}"}
               for a in range(6) for b in range(4)]
    (root / "data").mkdir()
    (root / "data" / "tiny_add.json").write_text(json.dumps(records))
    (root / "data" / "dataset_info.json").write_text(json.dumps({"tiny_add": {"file_name": "tiny_add.json"}}))
    return root


def _config(root: Path, name: str, **overrides) -> Path:
    cfg = {
        "model_name_or_path": str(root / "model"), "stage": "sft", "do_train": True, "finetuning_type": "full",
        "use_badam": True, "badam_mode": "layer", "badam_switch_mode": "ascending", "badam_switch_interval": 100,
        "badam_verbose": 0, "dataset": "tiny_add", "dataset_dir": str(root / "data"), "template": "default",
        "cutoff_len": 64, "overwrite_cache": True, "output_dir": str(root / name), "overwrite_output_dir": True,
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 3e-3,
        "lr_scheduler_type": "constant", "weight_decay": 0.0, "max_steps": STEPS, "logging_steps": 1,
        "save_steps": 3, "save_only_model": False, "report_to": "none", "bf16": False, "fp16": False,
        "seed": 0, "data_seed": 0, "dataloader_num_workers": 0, "plot_loss": False,
    }
    cfg.update(overrides)
    path = root / f"{name}.yaml"
    path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    return path


def _train(config: Path, ours: bool, console_script: bool = False) -> subprocess.CompletedProcess:
    if not ours:
        command = [shutil.which("llamafactory-cli") or "llamafactory-cli", "train", str(config)]
    elif console_script:
        command = [shutil.which("badam-ext-llamafactory") or "badam-ext-llamafactory", "train", str(config)]
    else:
        command = [sys.executable, "-m", "badam_ext.integrations.llamafactory", "train", str(config)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
               TOKENIZERS_PARALLELISM="false")
    env.pop("PYTEST_CURRENT_TEST", None)
    return subprocess.run(command, cwd=config.parent, env=env, capture_output=True, text=True, timeout=600)


def _ok(done: subprocess.CompletedProcess) -> str:
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return output


def _losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def _weights(folder: Path) -> dict:
    return safetensors_torch.load_file(str(folder / "model.safetensors"))


def _changed(before: dict, after: dict) -> set[str]:
    parts = set()
    for name, tensor in after.items():
        if not (tensor == before[name]).all():
            parts.add(".".join(name.split(".")[1:3]) if name.startswith("model.layers.") else name)
    return parts


def test_blockadam_matches_the_reference_and_prunes(workspace):
    ref = _ok(_train(_config(workspace, "ref"), ours=False))
    ours = _ok(_train(_config(workspace, "ours", badam_verbose=1), ours=True))
    assert "Using BAdam optimizer" in ref and "BlockAdam for LlamaFactory" not in ref
    assert "BlockAdam for LlamaFactory: 3 blocks" in ours and "backward pruning on" in ours
    assert "block 0 (model.layers.0) active" in ours
    ref_losses, our_losses = _losses(workspace / "ref"), _losses(workspace / "ours")
    print(f"\nno switch, {STEPS} steps on model.layers.0\n  reference: {ref_losses}\n  badam_ext: {our_losses}")
    assert len(our_losses) == len(ref_losses) == STEPS
    assert our_losses == pytest.approx(ref_losses, rel=2e-4)  # same update on the same block (fp32)
    assert our_losses[-1] < our_losses[0]
    initial = _weights(workspace / "model")
    assert _changed(initial, _weights(workspace / "ours")) == {"layers.0"}


def test_resume_from_a_checkpoint_is_bit_identical(workspace):
    full = _config(workspace, "full", badam_switch_interval=2, badam_switch_mode="random")
    _ok(_train(full, ours=True))
    resumed = _config(workspace, "resumed", badam_switch_interval=2, badam_switch_mode="random",
                      resume_from_checkpoint=str(workspace / "full" / "checkpoint-3"))
    _ok(_train(resumed, ours=True))
    a, b = _weights(workspace / "full"), _weights(workspace / "resumed")
    assert all((a[k] == b[k]).all() for k in a), "resumed run ended elsewhere"
    full_losses, resumed_losses = _losses(workspace / "full"), _losses(workspace / "resumed")
    print(f"\nrandom order, K=2: full {full_losses}\n  resumed at step 3: {resumed_losses}")
    assert resumed_losses[-3:] == full_losses[-3:]


def test_switching_and_verbose_2_print_blocks_and_parameter_names(workspace):
    ours = _ok(_train(_config(workspace, "switching", badam_switch_interval=2, badam_verbose=2), ours=True))
    for block in range(3):
        assert f"block {block} (model.layers.{block}) active" in ours
    assert "trainable model.layers.2.mlp.down_proj.weight" in ours
    initial = _weights(workspace / "model")
    assert _changed(initial, _weights(workspace / "switching")) == {"layers.0", "layers.1", "layers.2"}
    ref = _ok(_train(_config(workspace, "ref_switching", badam_switch_interval=2), ours=False))
    assert "Using BAdam optimizer" in ref
    print(f"\nK=2 (the reference gives the first block K-1 steps)\n  reference: {_losses(workspace / 'ref_switching')}"
          f"\n  badam_ext: {_losses(workspace / 'switching')}")


def test_interval_minus_one_never_switches(workspace):
    ours = _ok(_train(_config(workspace, "fixed", badam_switch_interval=-1, badam_start_block=1, badam_verbose=1,
                              max_steps=4), ours=True))
    assert "no switching" in ours and "block 1 (model.layers.1) active" in ours
    assert "block 0 (model.layers.0) active" not in ours and "block 2 (model.layers.2) active" not in ours
    assert _changed(_weights(workspace / "model"), _weights(workspace / "fixed")) == {"layers.1"}


def test_ratio_mode_is_refused_with_a_message(workspace):
    done = _train(_config(workspace, "ratio", badam_mode="ratio", max_steps=1), ours=True, console_script=True)
    assert done.returncode != 0
    assert "badam_mode: ratio is not supported by badam_ext" in done.stdout + done.stderr
