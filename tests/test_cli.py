"""The main job and the command line, on CPU."""
from __future__ import annotations

import json

import pytest
import torch

from badam_ext import cli
from badam_ext.data import TokenBlocks, arithmetic_text, decode_bytes, encode_bytes


def test_arithmetic_data_is_deterministic_and_correct():
    text = arithmetic_text(50, seed=3)
    assert text == arithmetic_text(50, seed=3)
    assert text != arithmetic_text(50, seed=4)
    for line in text.strip().splitlines():
        lhs, rhs = line.rstrip(".").split(" = ")
        a, op, b = lhs.split()
        assert int(rhs) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    assert decode_bytes(encode_bytes(text)) == text


def test_token_blocks_windows_and_errors():
    data = TokenBlocks(torch.arange(25), seq_len=8)
    assert len(data) == 3 and data[1]["input_ids"].tolist() == list(range(8, 16))
    with pytest.raises(ValueError, match="cannot fill one window"):
        TokenBlocks(torch.arange(5), seq_len=8)


def test_train_main_job_learns_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--steps", "24", "--switch-every", "3", "--lr", "3e-3", "--batch-size", "4",
                     "--seq-len", "64", "--out", str(out), "--no-progress", "--sample-interval", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["blocks"] == 8
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.2
    for name in ("vram_report.json", "vram_blocks.csv", "vram_report.png"):
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "vram_report.json").read_text())
    assert len(report["blocks"]) == 8
    assert "eval_loss_after" in capsys.readouterr().out


def test_profile_runs_one_block_epoch_and_its_tables_stay_whole_in_a_pipe(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "prof"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}
    done = subprocess.run(
        [sys.executable, "-m", "badam_ext.cli", "profile", "--switch-every", "1", "--batch-size", "2",
         "--seq-len", "32", "--out", str(out), "--no-progress", "--sample-interval", "0"],
        cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == summary["blocks"] == 8
    # Written to a pipe, rich would cut tables to 80 columns and shorten cells to "…".
    assert "…" not in done.stdout
    for name in ("embedding", "model.layers.5", "lm_head", "peak RSS", "step ms (n)", "eval_loss_after"):
        assert name in done.stdout
    assert max(len(line) for line in done.stdout.splitlines()) > 80


def test_bench_subcommand_rejects_unknown_names():
    with pytest.raises(SystemExit):
        cli.main(["bench", "nonexistent"])


def test_bench_subcommand_runs_a_script_from_the_source_tree(tmp_path):
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the smoke mode runs the kernels in the Triton interpreter")
    out = tmp_path / "switch.jsonl"
    assert cli.main(["bench", "switch", "--smoke", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) >= 3


def test_train_fixed_mode_needs_and_takes_a_start_block(tmp_path):
    args = ["train", "--steps", "2", "--switch-mode", "fixed", "--batch-size", "2", "--seq-len", "16",
            "--out", str(tmp_path), "--no-progress", "--sample-interval", "0", "--max-grad-norm", "0"]
    with pytest.raises(ValueError, match="start_block"):
        cli.main(args)
    assert cli.main([*args, "--start-block", "3"]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["max_grad_norm"] is None


def test_train_takes_the_state_format(tmp_path):
    args = ["train", "--steps", "3", "--switch-every", "1", "--batch-size", "2", "--seq-len", "16", "--no-progress",
            "--sample-interval", "0"]
    assert cli.main([*args, "--out", str(tmp_path / "fp32")]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "8bit"), "--states", "8bit", "--no-master"]) == 0
    fp32 = json.loads((tmp_path / "fp32" / "summary.json").read_text())
    compact = json.loads((tmp_path / "8bit" / "summary.json").read_text())
    assert compact["config"]["states"] == "8bit" and compact["config"]["master"] is False
    assert compact["arena_bytes"] < fp32["arena_bytes"] / 4  # 2 + 8/256 bytes per parameter against 12
    assert abs(compact["train_loss_first"] - fp32["train_loss_first"]) < 1e-4  # the first forward is the same
