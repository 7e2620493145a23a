"""The backward / end-to-end / budget benchmark scripts: --smoke runs on CPU and their JSON output.

The scripts' ``main(argv)`` runs in this process (``--smoke`` runs variants inline); one test runs a
variant through a real subprocess, the path the GPU runs take.
"""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import _harness as H  # noqa: E402
import _report as R  # noqa: E402
import bench_backward  # noqa: E402
import bench_budget  # noqa: E402
import bench_e2e  # noqa: E402
import models  # noqa: E402

ENV_KEYS = {"device", "torch", "triton", "transformers", "date", "command"}
PEAK_KEYS = {"peak_alloc_gib", "peak_reserved_gib", "nvml_peak_gib"}


def _lines(path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


# ------------------------------------------------------------------------------------------ models
def test_model_shapes_and_parameter_counts():
    """Llama-3-8B has 8.03B parameters, Llama-3.2-1B 1.24B with its head tied (1.50B if untied)."""
    with torch.device("meta"):
        big = models.LlamaForCausalLM(models.llama3_8b_config())
        small = models.LlamaForCausalLM(models.llama32_1b_config())
    assert models.num_params(big) == 8_030_261_248
    assert models.num_params(small) == 1_235_814_400
    assert small.get_input_embeddings().weight is small.get_output_embeddings().weight
    assert big.get_input_embeddings().weight is not big.get_output_embeddings().weight
    assert models.rope_theta_of(big.config) == 500000.0
    assert big.config._attn_implementation == "sdpa"


def test_build_model_is_seeded_and_in_dtype():
    a = models.build_model("tiny", "cpu", torch.bfloat16, seed=3)
    b = models.build_model("tiny", "cpu", torch.bfloat16, seed=3)
    c = models.build_model("tiny", "cpu", torch.bfloat16, seed=4)
    pa, pb, pc = (dict(x.model.named_parameters()) for x in (a, b, c))
    assert all(p.dtype == torch.bfloat16 for p in pa.values())
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(pa[name], pb[name]) and not torch.equal(pa[name], pc[name])
    assert torch.all(pa["model.norm.weight"] == 1)
    std = pa[name].float().std().item()
    assert 0.015 < std < 0.025  # the normal_(0, 0.02) init reached every matrix
    assert a.describe()["params"] == models.num_params(a.model)
    with pytest.raises(ValueError, match="unknown model"):
        models.config_for("70b")


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_loss_matches_float64(chunk):
    """Chunked cross-entropy: value and input gradient against a float64 reference, odd sizes, ignored labels."""
    gen = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(2, 13, 24, generator=gen, requires_grad=True)
    weight = torch.randn(37, 24, generator=gen) * 0.3
    labels = torch.randint(0, 37, (2, 13), generator=gen)
    labels[0, 4] = labels[1, 9] = -100
    loss = models.chunked_causal_lm_loss(hidden, weight, labels, chunk)
    loss.backward()
    h64 = hidden.detach().double().requires_grad_(True)
    logits = h64[:, :-1].reshape(-1, 24) @ weight.double().T
    ref = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    ref.backward()
    assert abs(loss.item() - ref.item()) / abs(ref.item()) < 1e-5
    err = (hidden.grad.double() - h64.grad).norm() / h64.grad.norm()
    assert err < 1e-5
    assert torch.all(hidden.grad[:, -1] == 0)  # the last position predicts nothing


def test_chunked_loss_equals_hf_loss_on_a_model():
    built = models.build_model("tiny", "cpu", torch.float32, seed=1)
    batch = models.random_batch(built.model.config.vocab_size, 2, 11, "cpu", seed=2)
    hf = models.causal_lm_loss(built.model, batch, "hf")
    chunked = models.causal_lm_loss(built.model, batch, "chunked", chunk_tokens=4)
    assert abs(hf.item() - chunked.item()) < 1e-5 * abs(hf.item())
    with pytest.raises(ValueError, match="unknown loss mode"):
        models.causal_lm_loss(built.model, batch, "fused")
    with pytest.raises(ValueError, match="chunk_tokens"):
        models.chunked_causal_lm_loss(torch.zeros(1, 4, 8), torch.zeros(5, 8), torch.zeros(1, 4, dtype=torch.long), 0)


# ----------------------------------------------------------------------------------------- helpers
def test_oom_classification_and_guard():
    assert H.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.47 GiB"))
    assert H.is_oom(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not H.is_oom(ValueError("out of memory"))
    assert not H.is_oom(RuntimeError("shape mismatch"))

    def boom():
        raise torch.OutOfMemoryError("Tried to allocate 2.00 GiB\nmore text")

    rec = H.run_guarded(boom, lambda: {"failed_in": "forward"})
    assert rec["status"] == "oom" and rec["failed_in"] == "forward"
    assert rec["error"] == "OutOfMemoryError: Tried to allocate 2.00 GiB"
    assert H.run_guarded(lambda: {"x": 1}) == {"x": 1, "status": "ok"}
    assert R.jsonable({"a": float("nan"), "b": (1, float("inf"))}) == {"a": None, "b": [1, None]}


def test_tracked_failure_says_where_it_happened():
    class Watch:
        def peaks(self):
            return {"peak_alloc_gib": 1.5}

    def fail(ctx):
        ctx.update(phase="backward", step=3, watch=Watch())
        raise torch.OutOfMemoryError("Tried to allocate 2.00 GiB")

    rec = H.run_tracked(fail)
    assert (rec["status"], rec["failed_in"], rec["failed_at_step"], rec["peak_alloc_gib"]) == ("oom", "backward", 3, 1.5)
    assert H.run_tracked(lambda ctx: {"x": 1}) == {"x": 1, "status": "ok"}


def test_child_mode_answers_one_result_line(capsys):
    argv = bench_backward.child_argv(bench_backward.parse_args(["--smoke", "--depths", "last_layer"]), "no_gc")
    (record,) = bench_backward.main(argv)
    answer = H.parse_child_output(capsys.readouterr().out)
    assert answer["variant"] == record["variant"] == "no_gc" and answer["status"] == "ok"
    with pytest.raises(SystemExit):
        bench_budget.parse_args(["--smoke", "--variant", "ours"])  # a budget child needs --seq


# -------------------------------------------------------------------------------------- the scripts
def test_backward_smoke(tmp_path):
    out = tmp_path / "r.jsonl"
    records = bench_backward.main(["--smoke", "--out", str(out)])
    assert [r["variant"] for r in records] == list(bench_backward.VARIANTS)
    for r in records:
        assert r["status"] == "ok", r.get("error")
        assert r["kind"] == "backward_by_depth" and r["model"] == "tiny" and r["seqlen"] == 16
        for depth in bench_backward.DEPTHS:
            assert _positive(r[f"{depth}_bwd_ms"]) and _positive(r[f"{depth}_fwd_ms"])
            assert r["rows"][depth]["missing_grads"] == 0
            assert len(r["rows"][depth]["bwd_ms_reps"]) == 2
        assert r["grads_ok"] is True
        assert ENV_KEYS <= set(r["env"]) and PEAK_KEYS <= set(r)
        assert {"import", "build", "setup", "measure"} <= set(r["phases_s"])
    by = {r["variant"]: r for r in records}
    assert by["gc_pruned"]["rows"]["first_layer"]["pruner"] == "block 0"
    assert by["gc_pruned"]["rows"]["all"]["pruner"].startswith("detached")
    assert by["gc_reentrant_pruned"]["pruner_describe"]["reentrant"] is True
    assert by["gc_pruned"]["pruner_describe"]["removed_input_require_grads_hook"] is True
    assert by["no_gc"]["rows"]["last_layer"]["pruner"] == "none"
    lines = _lines(out)
    assert len(lines) == 4 and all(line["command"][-2:] == ["--out", str(out)] for line in lines)


def test_e2e_smoke(tmp_path):
    out = tmp_path / "r.jsonl"
    records = bench_e2e.main(["--smoke", "--out", str(out)])
    by = {r["variant"]: r for r in records}
    assert list(by) == list(bench_e2e.VARIANTS)
    for name in ("ours", "ref", "full_adamw"):
        r = by[name]
        assert r["status"] == "ok", (name, r.get("error"), r.get("traceback_tail"))
        assert r["steps"] == 4 and r["epoch_steps"] == 4 and r["epoch_measured"] is True
        for key in ("fwd_ms", "bwd_ms", "opt_ms", "mean_step_ms", "epoch_s", "tokens_per_s"):
            assert _positive(r[key]), (name, key, r[key])
        assert math.isfinite(r["final_loss"])
        assert len(r["per_step"]["step"]) == 4 and ENV_KEYS <= set(r["env"]) and PEAK_KEYS <= set(r)
        assert r["gc_full_collections"] >= 0 and r["gc_ms"] >= 0
    # K=2 over 2 blocks: 2 warm-up steps, then 4 measured steps holding 2 switches.
    for name in ("ours", "ref"):
        assert by[name]["switches"] == 2 and _positive(by[name]["opt_switch_ms"])
        assert by[name]["per_step"]["switch"].count(True) == 2
    assert by["full_adamw"]["switches"] == 0 and by["full_adamw"]["opt_switch_ms"] is None
    assert by["ours"]["notes"]["arena_bytes"] > 0 and by["ours"]["notes"]["backend"] == "torch"
    patched = by["ref_patched"]
    if int(models.transformers.__version__.split(".")[0]) >= 5:
        assert patched["status"] == "error" and patched["failed_in"] == "forward"
        assert "'functools.partial' object has no attribute '__self__'" in patched["error"]
    assert len(_lines(out)) == 4


def test_budget_smoke_search_and_bisect(tmp_path):
    out = tmp_path / "r.jsonl"
    records = bench_budget.main(["--smoke", "--lengths", "16,24,32", "--optimizers", "ours_saved,ref",
                                 "--out", str(out)])
    summaries = {r["variant"]: r for r in records if r["kind"] == "budget_summary"}
    attempts = [r for r in records if r["kind"] == "budget_attempt"]
    assert set(summaries) == {"ours_saved", "ref"}
    assert all(a["memory_savings"]["fused_loss"] for a in attempts
               if a["variant"] == "ours_saved" and a["status"] == "ok")
    for s in summaries.values():
        # 16 and 24 fit, 32 fails (simulated), the bisection tries 28 and fails too.
        assert s["lengths_tried"] == [16, 24, 32, 28]
        assert s["max_fit_seq"] == 24 and s["first_oom_seq"] == 28 and s["stopped_by"] is None
        assert "simulated OOM" in s["oom_error"] and _positive(s["mean_step_ms_at_max"])
    for a in attempts:
        assert a["fits"] is (a["seqlen"] <= 24)
        assert a["switches"] >= 1 if a["fits"] else a["failed_in"] == "forward"
    assert len(_lines(out)) == len(records) == 10


def test_budget_stops_when_the_reference_is_missing(monkeypatch):
    monkeypatch.setattr(bench_budget, "reference_missing", lambda: "not installed: test")
    records = bench_budget.main(["--smoke", "--optimizers", "ref", "--lengths", "16,24"])
    assert [r["kind"] for r in records] == ["budget_attempt", "budget_summary"]
    assert records[0]["status"] == "not_installed" and records[0]["fits"] is None
    assert records[1]["max_fit_seq"] is None and records[1]["stopped_by"].startswith("not_installed")


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        bench_e2e.parse_args(["--smoke", "--variants", "ours,sgd"])
    with pytest.raises(SystemExit):
        bench_budget.parse_args(["--smoke", "--lengths", "32,16"])
    with pytest.raises(SystemExit):
        bench_budget.parse_args(["--smoke", "--steps", "1", "--switch-every", "2"])
    with pytest.raises(SystemExit):
        bench_backward.parse_args(["--smoke", "--depths", "first_layer,top"])


def test_variant_runs_in_a_fresh_subprocess():
    """The parent's real path: the script re-invoked with --variant answers one JSON line."""
    argv = bench_e2e.child_argv(bench_e2e.parse_args(["--smoke", "--steps", "1", "--warmup", "0"]), "full_adamw")
    record = H.run_subprocess(bench_e2e.SCRIPT, argv, timeout_s=300)
    assert record["child_returncode"] == 0, record
    assert record["status"] == "ok" and record["variant"] == "full_adamw" and record["steps"] == 1
    assert record["child_command"][1] == bench_e2e.SCRIPT and _positive(record["child_wall_s"])


def test_variant_runs_in_a_forked_child():
    records = bench_e2e.main(["--smoke", "--isolation", "fork", "--variants", "ours", "--steps", "2"])
    (r,) = records
    assert r["status"] == "ok" and r["steps"] == 2 and r["child_returncode"] == 0
    assert r["child_command"][0] == "<fork>" and r["phases_s"]["import"] == 0.0


def test_a_forked_child_that_dies_is_an_error_record():
    record = H.run_forked(lambda argv: os._exit(3), [], timeout_s=60)
    assert record["status"] == "error" and "exited with code 3" in record["error"]
    assert record["child_returncode"] == 3


# ------------------------------------------------------------------------------ update / switch
@pytest.mark.parametrize("script", ["bench_update", "bench_switch", "bench_launch"])
def test_kernel_benchmarks_smoke(script, tmp_path):
    """--smoke times every path (ours and the reference's) on a tiny layer and writes JSON lines."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the smoke mode runs the kernels in the Triton interpreter")
    module = __import__(script)
    out = tmp_path / "r.jsonl"
    module.main(["--smoke", "--out", str(out)])
    records = [r for r in _lines(out) if r["bench"] != "launch-sweep"]
    paths = {r["path"] for r in records}
    assert {"ref-switch" if script == "bench_switch" else "ref-foreach"} <= paths
    assert len(paths) >= 3
    for r in records:
        assert {"device", "torch", "triton", "date", "command"} <= set(r)
        assert _positive(float(r["ms"])) and r["frac_copy_bw"] > 0


def test_memory_smoke_runs_both_offload_modes(tmp_path):
    import bench_memory

    out = tmp_path / "m.jsonl"
    records = bench_memory.main(["--smoke", "--shapes", "1x16", "--steps", "2", "--out", str(out)])
    assert [r["offload"] for r in records] == [False, True]
    assert all(r["predicted_gib"] > 0 and len(r["losses"]) == 2 for r in records)
    assert len(_lines(out)) == 2
