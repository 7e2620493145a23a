"""The memory planner: its arithmetic against sizes computed by hand, limits, errors, the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from _tiny_models import tiny_config

from badam_ext import plan_memory
from badam_ext.arena import required_capacity
from badam_ext.cli import main as cli_main
from badam_ext.memory import planner as P

GIB = 2 ** 30


def _config(**overrides):
    # hidden 32, intermediate 64, 4 layers, vocab 128 (tests/_tiny_models.py), untied
    return tiny_config("llama", 4, tie_word_embeddings=False, **overrides)


def _hand_sizes(cfg) -> dict[str, int]:
    h, i, v, n = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    head_dim = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * head_dim
    layer = [h * h, kv * h, kv * h, h * h, i * h, i * h, h * i, h, h]  # q k v o gate up down, 2 norms
    return {"layer_numels": layer, "params": n * sum(layer) + 2 * v * h + h}


def test_weights_arena_grads_by_hand() -> None:
    cfg = _config()
    hand = _hand_sizes(cfg)
    plan = plan_memory(cfg, batch_size=2, seq_len=16, offload=False)
    block = plan.blocks[0]
    assert len(plan.blocks) == cfg.num_hidden_layers
    assert block.weights == 2 * hand["params"]  # bf16
    assert block.arena == 12 * required_capacity(sorted(hand["layer_numels"], reverse=True))
    shape = P.model_shape(cfg)
    assert sorted(shape.layer_numels[0]) == sorted(hand["layer_numels"])
    assert shape.block_layers == [0, 1, 2, 3] and not shape.tied


def test_moments_by_hand() -> None:
    cfg = _config()
    b, seq, h, i, v, a = 2, 64, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, 2
    tokens = b * seq
    shape = P.model_shape(cfg)
    layer_input = P._align(tokens * h * a)
    frozen = int(tokens * (12 * h + 5 * i) * a * P.FROZEN_RECOMPUTE_FRACTION)
    active = int(tokens * (12 * h + 5 * i) * a)
    grads0 = sum(P._align(n * a) for n in shape.layer_numels[0])
    static = 2 * _hand_sizes(cfg)["params"] + P.arena_bytes(shape) + P.RUNTIME_BYTES
    final_norm = tokens * h * (a + 4)
    chunk = min(tokens, (128 << 20) // (4 * v))
    loss = final_norm + tokens * h * 4 + 2 * chunk * v * 4
    forward = max(int(tokens * (1.5 * h + 3.5 * i) * a), loss)
    for offload, held in ((False, 4), (True, 1)):
        top = (4 if not offload else 2) * layer_input + frozen + layer_input
        lowest = layer_input + max(active, grads0 + int(P.GRAD_TAIL_FRACTION * active))
        expected = static + max(held * layer_input + forward, top, lowest)
        plan = P.plan_block(shape, 0, batch_size=b, seq_len=seq, fused_loss=True, offload=offload)
        assert plan.peak == expected, (offload, plan)
        assert plan.weights + plan.arena + plan.runtime + plan.grads + plan.checkpoints + plan.recompute \
            + plan.loss == plan.peak
    # the top layer's own block has no frozen layer above it: no "backward (top)" moment
    last = P.plan_block(shape, 3, batch_size=b, seq_len=seq, fused_loss=True, offload=False)
    assert last.peak == static + max(layer_input + forward, layer_input + max(
        active, sum(P._align(n * a) for n in shape.layer_numels[3]) + int(P.GRAD_TAIL_FRACTION * active)))


def test_layer_kernels_and_liger_loss_by_hand() -> None:
    from badam_ext.memory.loss import loss_chunk_rows

    cfg = _config()
    b, seq, h, i, v, a = 2, 64, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, 2
    tokens = b * seq
    shape = P.model_shape(cfg)
    layer_input = P._align(tokens * h * a)
    lean = tokens * (P.LEAN_RECOMPUTE_PER_HIDDEN * h + P.LEAN_RECOMPUTE_PER_INTERMEDIATE * i) * a
    frozen, active = int(lean * P.FROZEN_RECOMPUTE_FRACTION), int(lean)
    grads0 = sum(P._align(n * a) for n in shape.layer_numels[0])
    static = 2 * _hand_sizes(cfg)["params"] + P.arena_bytes(shape) + P.RUNTIME_BYTES
    # Liger's chunk: 128 tokens of a 128-entry vocabulary fit in one chunk
    chunk = tokens
    assert loss_chunk_rows(tokens, h, v, "liger") == chunk
    loss = tokens * h * 2 * a + tokens * h * a + chunk * v * a + tokens * 4
    forward = max(int(tokens * (1.5 * h + P.LEAN_FORWARD_PER_INTERMEDIATE * i) * a), loss)
    for offload, held_fwd, held_top in ((False, 4, 4), (True, 1, 2 + P.LEAN_OFFLOAD_EXTRA_INPUTS)):
        top = min(held_top, 4) * layer_input + frozen + layer_input
        lowest = layer_input + max(active, grads0 + int(P.GRAD_TAIL_FRACTION * active))
        expected = static + max(held_fwd * layer_input + forward, top, lowest)
        plan = P.plan_block(shape, 0, batch_size=b, seq_len=seq, fused_loss=True, offload=offload,
                            layer_kernels=True, loss_backend="liger")
        assert plan.peak == expected, (offload, plan)
    hf = plan_memory(cfg, batch_size=1, seq_len=4096, offload=False, loss_backend="liger", limits=False)
    kernels = plan_memory(cfg, batch_size=1, seq_len=4096, offload=False, loss_backend="liger", limits=False,
                          layer_kernels=True)
    assert kernels.peak_bytes < hf.peak_bytes and kernels.to_dict()["layer_kernels"] is True
    with pytest.raises(ValueError, match="unknown fused-loss backend"):
        plan_memory(cfg, loss_backend="cuda", limits=False)


def test_liger_chunks_hold_up_to_the_byte_budget() -> None:
    from badam_ext.memory.loss import LIGER_CHUNK_BYTES, liger_chunk_mem_const, loss_chunk_rows

    # Llama-3-8B head: Liger's default makes 64-token chunks at 2048 tokens; ours 1024
    assert loss_chunk_rows(2048, 4096, 128256, "liger") == 1024
    assert liger_chunk_mem_const(2048, 4096, 128256) > 1
    from badam_ext.memory.loss import _liger_chunk_rows

    for tokens in (100, 2048, 8192, 18432, 65536):
        const = liger_chunk_mem_const(tokens, 4096, 128256)
        rows = loss_chunk_rows(tokens, 4096, 128256, "liger")
        assert rows == _liger_chunk_rows(tokens, 4096, 128256, const) <= tokens
        assert rows * 128256 * 2 <= LIGER_CHUNK_BYTES or const == 1
        # the largest such chunk: one more step of the constant would pass the budget (or change nothing)
        bigger = _liger_chunk_rows(tokens, 4096, 128256, const + 1)
        assert bigger == rows or bigger * 128256 * 2 > LIGER_CHUNK_BYTES


def test_block_zero_is_the_worst_and_offload_lowers_the_peak() -> None:
    cfg = _config(num_hidden_layers=32, max_position_embeddings=8192)
    plan = plan_memory(cfg, batch_size=1, seq_len=8192, offload=False)
    assert plan.worst.index == 0
    assert plan.blocks[0].peak > plan.blocks[-1].peak
    assert plan_memory(cfg, batch_size=1, seq_len=8192, offload=True).peak_bytes < plan.peak_bytes


def test_hf_loss_counts_full_logits() -> None:
    cfg = _config(vocab_size=50000)
    shape = P.model_shape(cfg)
    tokens = 4096
    final_norm = tokens * cfg.hidden_size * 6
    assert P.loss_bytes(shape, tokens, fused=False, head_trainable=False) == final_norm + tokens * 50000 * (4 + 8)
    hf = P.loss_bytes(shape, tokens, fused=False, head_trainable=False)
    assert P.loss_bytes(shape, tokens, fused=True, head_trainable=False) < hf / 3


def test_limits_and_auto_choice_are_consistent() -> None:
    cfg = _config(num_hidden_layers=32, max_position_embeddings=1 << 20)
    plan = plan_memory(cfg, batch_size=1, seq_len=4096, budget_gib=0.5, fragmentation_gib=0.0)
    lim = plan.limits
    assert lim["hf_loss"]["longest_seq"] <= lim["fused_loss"]["longest_seq"] <= lim["fused_loss+offload"]["longest_seq"]
    longest = lim["fused_loss"]["longest_seq"]
    assert plan_memory(cfg, batch_size=1, seq_len=longest, budget_gib=0.5, fragmentation_gib=0.0,
                       offload=False).fits
    assert not plan_memory(cfg, batch_size=1, seq_len=longest + 256, budget_gib=0.5, fragmentation_gib=0.0,
                           offload=False).fits
    beyond = plan_memory(cfg, batch_size=1, seq_len=longest + 256, budget_gib=0.5, fragmentation_gib=0.0)
    assert beyond.auto_offload is True and beyond.offload
    within = plan_memory(cfg, batch_size=1, seq_len=max(256, longest // 2), budget_gib=0.5, fragmentation_gib=0.0)
    assert within.auto_offload is False and not within.offload


def test_config_sources_and_errors(tmp_path) -> None:
    cfg = _config()
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json_string())
    by_path = plan_memory(str(path), batch_size=1, seq_len=32).peak_bytes
    assert by_path == plan_memory(str(tmp_path), batch_size=1, seq_len=32).peak_bytes
    assert by_path == plan_memory(json.loads(cfg.to_json_string()), batch_size=1, seq_len=32).peak_bytes
    with pytest.raises(FileNotFoundError, match="no model config"):
        plan_memory(str(tmp_path / "missing"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        plan_memory(str(tmp_path / "bad.json"))
    (tmp_path / "nomodel.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="model_type"):
        plan_memory(str(tmp_path / "nomodel.json"))
    (tmp_path / "unknown.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(ValueError, match="no-such-model"):
        plan_memory(str(tmp_path / "unknown.json"))
    with pytest.raises(ValueError, match="batch_size"):
        plan_memory(cfg, batch_size=0)
    with pytest.raises(TypeError, match="config must be"):
        plan_memory(42)


def test_cli_plan_json_and_errors(tmp_path, capsys) -> None:
    path = tmp_path / "config.json"
    path.write_text(_config().to_json_string())
    rc = cli_main(["plan", "--config", str(path), "--budget-gib", "23", "--seq-len", "64", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["fits"] is True and len(out["blocks"]) == 4
    assert set(out["limits"]) == {"hf_loss", "fused_loss", "fused_loss+offload"}
    rc = cli_main(["plan", "--config", str(path), "--seq-len", "64", "--json", "--states", "8bit", "--no-master",
                   "--layer-kernels", "on", "--loss-backend", "liger"])
    compact = json.loads(capsys.readouterr().out)
    assert rc == 0 and compact["states"] == "8bit" and compact["master"] is False and compact["layer_kernels"]
    import importlib.util

    assert cli_main(["plan", "--config", str(path), "--seq-len", "64", "--json"]) == 0  # "auto", as training
    auto = json.loads(capsys.readouterr().out)
    assert auto["layer_kernels"] is (importlib.util.find_spec("liger_kernel") is not None)
    assert cli_main(["plan", "--config", str(path), "--budget-gib", "0.0001"]) == 3  # does not fit
    capsys.readouterr()
    assert cli_main(["plan", "--config", str(tmp_path / "nope.json")]) == 2
    assert "no model config" in capsys.readouterr().err


def test_host_bytes_for_offload() -> None:
    shape = P.model_shape(_config())
    assert P.checkpoint_host_bytes(shape, 2, 100) == 4 * P._align(2 * 100 * 32 * 2, 256)
    assert torch.empty((), dtype=torch.bfloat16).element_size() == shape.dtype_bytes


def test_the_state_format_sizes_the_arena() -> None:
    from badam_ext.states import state_spec

    cfg = _config()
    shape = P.model_shape(cfg)
    layer = sorted(_hand_sizes(cfg)["layer_numels"], reverse=True)
    fp32 = plan_memory(cfg, batch_size=1, seq_len=64, limits=False)
    compact = plan_memory(cfg, batch_size=1, seq_len=64, limits=False, states="8bit")
    bare = plan_memory(cfg, batch_size=1, seq_len=64, limits=False, states="8bit", master=False)
    assert fp32.blocks[0].arena == 12 * required_capacity(layer)
    spec = state_spec("8bit")
    assert compact.blocks[0].arena == spec.bytes(required_capacity(layer, spec)) == P.arena_bytes(shape, "8bit")
    assert bare.blocks[0].arena < compact.blocks[0].arena < fp32.blocks[0].arena
    assert compact.to_dict()["states"] == "8bit" and bare.to_dict()["master"] is False
    with pytest.raises(ValueError, match="unknown states"):
        plan_memory(cfg, limits=False, states="4bit")
