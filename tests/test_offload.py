"""Checkpoint offload: the same training, nothing saved below the active block, no per-step allocation."""
from __future__ import annotations

import pytest
import torch
from _probes import add_probes
from _tiny_models import enable_checkpointing, tiny_batch, tiny_model

from badam_ext import BlockAdam, apply_memory_savings
from badam_ext.memory.offload import CheckpointOffloader, OffloadingCheckpoint
from badam_ext.pruning import checkpointing_info

LAYERS = 4


def _train(reentrant: bool, offload: bool, device: str = "cpu", steps: int = 2 * LAYERS, start: int = 0,
           dtype: torch.dtype = torch.float32):
    model = tiny_model("llama", num_layers=LAYERS, dtype=dtype).to(device)
    enable_checkpointing(model, reentrant)
    opt = BlockAdam(model, lr=1e-2, switch_every=2, switch_mode="ascending", start_block=start, backend="torch")
    offloader = CheckpointOffloader(model, min_bytes=0) if offload else None
    records, allocations = [], []
    for step in range(steps):
        if offloader is not None:
            offloader.begin_forward()
        batch = {k: v.to(device) for k, v in tiny_batch(model, seed=step).items()}
        model(**batch).loss.backward()
        if offloader is not None:
            records.append((opt.active_block, offloader.offloaded_bytes))
            allocations.append(offloader.buffer.allocations)
        opt.step()
        opt.zero_grad()
    weights = torch.cat([p.detach().flatten().float().cpu() for p in model.parameters()])
    return weights, records, allocations, offloader, model


@pytest.mark.parametrize("reentrant", [False, True])
def test_block_epoch_bit_identical_with_offload(reentrant: bool) -> None:
    plain, *_ = _train(reentrant, offload=False)
    offloaded, records, _, offloader, _ = _train(reentrant, offload=True)
    assert torch.equal(plain, offloaded)
    assert offloader.peak_offloaded_bytes > 0


@pytest.mark.parametrize("reentrant", [False, True])
def test_layers_below_the_active_block_save_nothing(reentrant: bool) -> None:
    _, records, _, _, model = _train(reentrant, offload=True)
    per_layer = 2 * 8 * model.config.hidden_size * 4  # batch 2 x seq 8 x hidden, fp32
    for block, offloaded in records:
        assert offloaded == (LAYERS - block) * per_layer, (block, offloaded)


def test_no_host_allocation_after_the_first_step() -> None:
    _, _, allocations, offloader, _ = _train(False, offload=True)
    assert offloader.buffer.allocations >= 1
    assert len(set(allocations)) == 1, allocations


def test_apply_memory_savings_reserves_once_and_offloads_every_step() -> None:
    model = tiny_model("llama", num_layers=LAYERS)
    enable_checkpointing(model, reentrant=False)
    savings = apply_memory_savings(model, offload_checkpoints=True, min_offload_bytes=0)
    opt = BlockAdam(model, lr=1e-2, switch_every=1, switch_mode="ascending", backend="torch")
    seen = []
    for step in range(LAYERS):
        model(**tiny_batch(model, seed=step)).loss.backward()
        seen.append((savings.offloader.offloaded_bytes, savings.offloader.buffer.allocations))
        opt.step()
        opt.zero_grad()
    assert [b for b, _ in seen] == sorted((b for b, _ in seen), reverse=True) and seen[-1][0] > 0
    assert {a for _, a in seen} == {1}
    stats = savings.stats()
    assert stats["fused_loss"] and stats["host_allocations"] == 1
    savings.remove()
    assert not any(isinstance(layer.__dict__.get("_gradient_checkpointing_func"), OffloadingCheckpoint)
                   for layer in model.model.layers)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("active", [0, 2])
def test_pruning_still_stops_backward_at_the_active_block(reentrant: bool, active: int) -> None:
    model = tiny_model("llama", num_layers=LAYERS)
    enable_checkpointing(model, reentrant)
    record = add_probes(model)
    apply_memory_savings(model, offload_checkpoints=True, min_offload_bytes=0)
    opt = BlockAdam(model, lr=1e-2, switch_every=5, switch_mode="fixed", start_block=active, backend="torch")
    model(**tiny_batch(model)).loss.backward()
    assert record == set(range(active, LAYERS))
    assert checkpointing_info(model).reentrant is reentrant  # the pruner sees through the wrapper
    assert all(p.grad is not None for p in opt.active_params)


def test_rewraps_after_checkpointing_is_enabled_again() -> None:
    model = tiny_model("llama", num_layers=LAYERS)
    savings = apply_memory_savings(model, offload_checkpoints=True, min_offload_bytes=0)
    opt = BlockAdam(model, lr=1e-2, switch_every=5, backend="torch", switch_mode="fixed", start_block=1)
    enable_checkpointing(model, reentrant=True)  # after both, as HF Trainer does
    model(**tiny_batch(model)).loss.backward()
    assert savings.offloader.offloaded_bytes > 0
    opt.step()


def test_auto_stays_off_without_a_device_budget() -> None:
    model = tiny_model("llama", num_layers=LAYERS)
    enable_checkpointing(model, reentrant=False)
    savings = apply_memory_savings(model, offload_checkpoints="auto", min_offload_bytes=0)
    BlockAdam(model, lr=1e-2, backend="torch")
    model(**tiny_batch(model)).loss.backward()
    assert not savings.offloader.active and savings.offloader.offloaded_bytes == 0


def test_auto_stays_off_without_checkpointing() -> None:
    model = tiny_model("llama", num_layers=LAYERS)  # no gradient checkpointing: nothing to offload
    savings = apply_memory_savings(model, offload_checkpoints="auto", budget_gib=1e-6, min_offload_bytes=0)
    BlockAdam(model, lr=1e-2, backend="torch")
    model(**tiny_batch(model)).loss.backward()
    assert savings.decisions == {} and not savings.offloader.active


def test_a_graph_kept_alive_keeps_the_next_forward_on_the_device() -> None:
    model = tiny_model("llama", num_layers=LAYERS)
    enable_checkpointing(model, reentrant=False)
    savings = apply_memory_savings(model, offload_checkpoints=True, min_offload_bytes=0)
    opt = BlockAdam(model, lr=1e-2, switch_every=5, switch_mode="ascending", backend="torch")
    capacities, kept = [], []
    for step in range(4):  # backward(retain_graph=True), losses kept: every step's graph stays alive
        loss = model(**tiny_batch(model, seed=step)).loss
        loss.backward(retain_graph=True)
        kept.append(loss)
        capacities.append((savings.offloader.buffer.capacity_bytes, savings.offloader.offloaded_bytes))
        opt.step()
        opt.zero_grad()
    assert capacities[0][1] > 0
    assert all(c == capacities[0][0] and moved == 0 for c, moved in capacities[1:]), capacities


def test_a_failed_set_up_leaves_the_model_as_it_was(monkeypatch) -> None:
    from badam_ext.memory import savings as S

    model = tiny_model("llama", num_layers=2)
    enable_checkpointing(model, reentrant=False)

    def fail(*args, **kwargs):
        raise RuntimeError("no pinned memory")

    monkeypatch.setattr(S, "CheckpointOffloader", fail)
    with pytest.raises(RuntimeError, match="no pinned memory"):
        S.default_memory_savings(model, offload_checkpoints=True)
    assert "forward" not in model.__dict__ and getattr(model, "_badam_memory_savings", None) is None


def test_auto_turns_offload_on_when_the_plan_does_not_fit() -> None:
    # deep and long enough for the checkpointed inputs to decide the peak
    model = tiny_model("llama", num_layers=32, max_position_embeddings=256)
    enable_checkpointing(model, reentrant=False)
    from badam_ext.memory import planner as P
    from badam_ext.memory.planner import GIB, plan_memory

    plans = [plan_memory(model.config, batch_size=2, seq_len=256, fused_loss=True, offload=off, dtype=torch.float32,
                         fragmentation_gib=0) for off in (False, True)]
    assert plans[1].peak_bytes < plans[0].peak_bytes
    # a budget between the two plans (plus the default allocator slack): "auto" must choose offload
    budget = (plans[0].peak_bytes + plans[1].peak_bytes) / 2 / GIB + P.DEFAULT_FRAGMENTATION_GIB
    savings = apply_memory_savings(model, offload_checkpoints="auto", budget_gib=budget, min_offload_bytes=0)
    opt = BlockAdam(model, lr=1e-2, backend="torch")
    model(**tiny_batch(model, seq=256)).loss.backward()
    assert savings.decisions == {(2, 256, "fp32", True): True} and savings.offloader.offloaded_bytes > 0
    # a BlockAdam with compact states is planned with its own (smaller) arena, not the cached decision
    opt.close()
    opt = BlockAdam(model, lr=1e-2, backend="torch", states="8bit", master=False)
    model.zero_grad(set_to_none=True)
    model(**tiny_batch(model, seq=256)).loss.backward()
    assert set(savings.decisions) == {(2, 256, "fp32", True), (2, 256, "8bit", False)}


def test_bad_arguments() -> None:
    model = tiny_model("llama", num_layers=2)
    with pytest.raises(ValueError, match="offload_checkpoints"):
        apply_memory_savings(model, offload_checkpoints="yes")
    with pytest.raises(ValueError, match="budget_gib"):
        apply_memory_savings(model, budget_gib=-1)
    with pytest.raises(TypeError, match="nn.Module"):
        apply_memory_savings("model")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("reentrant", [False, True])
def test_block_epoch_bit_identical_with_offload_on_cuda(reentrant: bool) -> None:
    plain, *_ = _train(reentrant, offload=False, device="cuda", dtype=torch.bfloat16)
    offloaded, _, allocations, offloader, _ = _train(reentrant, offload=True, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(plain, offloaded)
    assert offloader.buffer.pinned and len(set(allocations)) == 1
