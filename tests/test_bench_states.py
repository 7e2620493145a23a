"""bench/bench_states.py runs end to end at smoke size (CPU: the kernels in Triton's interpreter)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *args: str) -> list[dict]:
    out = tmp_path / "states.jsonl"
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_states.py"), "--smoke", "--out", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_speed_smoke_records_every_format_and_the_baseline(tmp_path):
    rows = _run(tmp_path, "--formats", "fp32,8bit")
    paths = {(r["path"], r["kind"]) for r in rows}
    assert {("fp32", "step"), ("fp32", "block_load"), ("8bit", "step"), ("8bit", "block_load"),
            ("torch-AdamW-fused+casts", "step")} <= paths
    for r in rows:
        assert r["ms"] > 0 and r["copy_gbs"] > 0 and {"device", "torch", "triton", "date"} <= set(r)


def test_accuracy_smoke_bounds_the_8bit_error(tmp_path):
    rows = {r["path"]: r for r in _run(tmp_path, "--accuracy")}
    assert rows["fp32"]["exp_avg_rel_err"] < 1e-6
    assert 0 < rows["8bit"]["exp_avg_rel_err"] < 0.05 and 0 < rows["8bit"]["exp_avg_sq_rel_err"] < 0.05


def test_unknown_format_is_a_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_states.py"), "--smoke", "--formats", "int4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown format(s) ['int4']" in proc.stderr


def test_finetune_smoke_trains_every_format(tmp_path):
    rows = {r["path"]: r for r in _run(tmp_path, "--finetune")}
    assert set(rows) == {"fp32", "8bit", "8bit-nomaster", "fp32-nomaster"}
    assert rows["fp32"]["eval_loss_vs_fp32"] == 0.0
    assert rows["8bit"]["arena_bytes"] < 0.55 * rows["fp32"]["arena_bytes"]
    for r in rows.values():
        assert r["train_loss"] < r["first_loss"] + 0.5 and r["eval_loss"] > 0


def test_prefetch_sweep_records_each_distance(tmp_path):
    rows = _run(tmp_path, "--formats", "8bit", "--no-baselines", "--prefetch", "3,0")
    steps = [r for r in rows if r["kind"] == "step"]
    # the device's own distance first (none in the interpreter), then the others asked for
    assert [r["prefetch"] for r in steps] == [0, 3]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_states.py"), "--smoke", "--prefetch", "-1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--prefetch: distances are programs ahead" in proc.stderr
