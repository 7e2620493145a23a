"""BlockAdam behaviour: schedule, requires_grad, arena reuse, accumulation, resume, validation."""
from __future__ import annotations

import copy

import pytest
import torch
from _tiny_models import tiny_model

from badam_ext import BlockAdam, BlockOptimizer


def _batches(n: int, seed: int = 7, bsz: int = 2, seq: int = 10):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (bsz, seq), generator=gen) for _ in range(n)]


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("mode", ["ascending", "descending", "random", "fixed"])
def test_each_block_gets_exactly_k_steps_and_only_it_trains(mode):
    model = tiny_model("llama", num_layers=4)
    opt = BlockAdam(model, lr=1e-3, switch_every=2, switch_mode=mode, backend="torch", seed=5,
                    start_block=2 if mode == "fixed" else None)
    sequence = []
    for ids in _batches(16, bsz=1, seq=6):
        active = opt.active_block
        block_names = {n for n, _ in opt.partition.block_params(active)}
        for n, p in model.named_parameters():
            assert p.requires_grad == (n in block_names), f"{n} requires_grad wrong in block {active}"
        _loss(model, ids).backward()
        opt.step()
        sequence.append(active)
    runs = [sequence[i:i + 2] for i in range(0, 16, 2)]
    assert all(len(set(r)) == 1 for r in runs), f"a block did not get exactly K=2 steps: {sequence}"
    firsts = [r[0] for r in runs]
    if mode == "ascending":
        assert firsts == [0, 1, 2, 3, 0, 1, 2, 3]
    elif mode == "descending":
        assert firsts == [3, 2, 1, 0, 3, 2, 1, 0]
    elif mode == "fixed":
        assert set(firsts) == {2}
    else:  # random: each block epoch is a permutation, reshuffled
        assert sorted(firsts[:4]) == [0, 1, 2, 3] and sorted(firsts[4:]) == [0, 1, 2, 3]


def test_switches_reuse_one_arena_allocation_and_no_empty_cache(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    model = tiny_model("llama", num_layers=3)
    opt = BlockAdam(model, switch_every=1, switch_mode="ascending", backend="torch",
                    include_embedding=True, include_lm_head=True)
    ptr = opt.arena.flat("master").data_ptr()
    for ids in _batches(7):
        _loss(model, ids).backward()
        opt.step()
    assert opt.arena.allocations == 1
    assert opt.arena.flat("master").data_ptr() == ptr
    assert opt.arena.switches >= 7
    assert not calls


def test_gradient_accumulation_equals_one_big_batch():
    ids = _batches(1, bsz=4)[0]
    finals = []
    for micro in (1, 2):
        model = tiny_model("llama", num_layers=2)
        opt = BlockAdam(model, lr=1e-2, switch_every=10, switch_mode="ascending", backend="torch")
        for part in ids.chunk(micro):
            (_loss(model, part) / micro).backward()
        opt.step()
        finals.append(dict(model.named_parameters()))
    for n, p in finals[0].items():
        torch.testing.assert_close(p, finals[1][n], rtol=1e-5, atol=1e-6)


def test_clip_grad_norm_on_the_model_also_works():
    ids = _batches(1)[0]
    results = []
    for use_optimizer_clip in (True, False):
        model = tiny_model("llama", num_layers=2)
        opt = BlockAdam(model, lr=1e-2, switch_every=10, backend="torch", switch_mode="ascending",
                        max_grad_norm=0.01 if use_optimizer_clip else None)
        _loss(model, ids).backward()
        if not use_optimizer_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        opt.step()
        results.append(dict(model.named_parameters()))
    for n, p in results[0].items():
        torch.testing.assert_close(p, results[1][n], rtol=1e-5, atol=1e-7)


def test_weight_decay_skips_biases_and_norms():
    model = tiny_model("llama", num_layers=2)
    opt = BlockAdam(model, lr=0.1, weight_decay=0.5, switch_every=10, backend="torch", switch_mode="ascending")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in opt.active_params:
        p.grad = torch.zeros_like(p)  # zero grad: only decay can move a weight
    opt.step()
    for n, _ in opt.partition.block_params(0):
        p = model.get_parameter(n)
        if "norm" in n:
            assert torch.equal(p, before[n]), f"{n} was decayed"
        else:
            torch.testing.assert_close(p, before[n] * (1 - 0.1 * 0.5))


@pytest.mark.parametrize("backend, extra", [
    ("torch", {}),
    ("triton", {}),
    ("triton", {"stochastic_rounding": True, "max_grad_norm": 0.05}),  # the SR stream and clipping resume too
])
def test_resume_from_state_dict_is_bit_identical(backend, extra, tmp_path):
    batches = _batches(12)
    kwargs = dict(lr=1e-2, weight_decay=0.01, switch_every=2, switch_mode="random", backend=backend, seed=3, **extra)

    model = tiny_model("llama", dtype=torch.bfloat16, num_layers=3)
    opt = BlockAdam(model, **kwargs)
    for ids in batches[:5]:
        _loss(model, ids).backward()
        opt.step()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    for ids in batches[5:]:
        _loss(model, ids).backward()
        opt.step()

    resumed = tiny_model("llama", dtype=torch.bfloat16, num_layers=3, seed=99)
    opt2 = BlockAdam(resumed, **kwargs)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    for ids in batches[5:]:
        _loss(resumed, ids).backward()
        opt2.step()
    assert opt2.active_block == opt.active_block
    for (n, p), (_, q) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), f"{n} differs after resume"
    for region_a, region_b in zip(opt._views, opt2._views):  # master, exp_avg, exp_avg_sq of the active block
        for a, b in zip(region_a, region_b):
            assert torch.equal(a, b)


def test_state_dict_of_another_model_is_refused():
    opt = BlockAdam(tiny_model("llama", num_layers=3), backend="torch")
    other = BlockAdam(tiny_model("llama", num_layers=2), backend="torch")
    with pytest.raises(ValueError, match="another model or block partition"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="not a BlockAdam state_dict"):
        other.load_state_dict(torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()).state_dict())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(lr=-1.0), ValueError, "learning rate"),
        (dict(betas=(0.9, 1.0)), ValueError, "betas"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
        (dict(switch_every=0), ValueError, "switch_every"),
        (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
        (dict(switch_mode="sideways"), ValueError, "sideways"),
        (dict(backend="cuda-magic"), ValueError, "cuda-magic"),
        (dict(blocks=["model.layers.0.", "model.nothing."]), ValueError, "model.nothing."),
        (dict(block_param_names=[["model.layers.0.mlp.up_proj.weight"],
                                 ["model.layers.0.mlp.up_proj.weight"]]), ValueError, "two blocks|more than one"),
        (dict(block_param_names=[["model.layers.0.mlp.up_proj.weight"], []]), ValueError, "empty"),
    ],
)
def test_validation_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        BlockAdam(tiny_model("llama", num_layers=2), **kwargs)


def test_compat_constructor_refuses_what_it_cannot_honour():
    model = tiny_model("llama", num_layers=2)
    named = list(model.named_parameters())
    with pytest.raises(TypeError, match="Adam or AdamW base optimizer; got SGD"):
        BlockOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named)
    with pytest.raises(ValueError, match="amsgrad"):
        BlockOptimizer(torch.optim.AdamW(model.parameters(), amsgrad=True), named)
    with pytest.raises(ValueError, match="decoupled"):
        BlockOptimizer(torch.optim.Adam(model.parameters(), weight_decay=0.1), named)


def test_compat_honours_per_group_weight_decay_and_lr():
    model = tiny_model("llama", num_layers=2)
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.dim() >= 2]
    no_decay = [p for n, p in named if p.dim() < 2]
    base = torch.optim.AdamW([{"params": decay, "weight_decay": 0.3, "lr": 0.2},
                              {"params": no_decay, "weight_decay": 0.0}], lr=0.1)
    opt = BlockOptimizer(base, named, switch_block_every=5, switch_mode="ascending", backend="torch")
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.1]
    before = {n: p.detach().clone() for n, p in named}
    for p in opt.active_params:
        p.grad = torch.zeros_like(p)
    opt.step()
    w = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(model.get_parameter(w), before[w] * (1 - 0.2 * 0.3))


def test_switch_hook_reports_block_info():
    model = tiny_model("llama", num_layers=3)
    opt = BlockAdam(model, switch_every=1, switch_mode="ascending", backend="torch")
    events = []
    handle = opt.add_switch_hook(lambda old, new, info: events.append((old, new, info)))
    for ids in _batches(2):
        _loss(model, ids).backward()
        opt.step()
    handle.remove()
    assert [(o, n) for o, n, _ in events] == [(None, 0), (0, 1), (1, 2)]
    info = events[1][2]
    assert info["num_params"] == sum(p.numel() for _, p in opt.partition.block_params(1))
    assert info["arena_bytes"] >= 12 * info["num_params"]


def test_deepcopy_free_construction_keeps_model_untouched_outside_active_block():
    model = tiny_model("llama", num_layers=3)
    snapshot = copy.deepcopy(model.state_dict())
    opt = BlockAdam(model, lr=1e-2, switch_every=5, switch_mode="ascending", backend="torch")
    _loss(model, _batches(1)[0]).backward()
    opt.step()
    active = {n for n, _ in opt.partition.block_params(0)}
    for n, p in model.named_parameters():
        if n not in active:
            assert torch.equal(p, snapshot[n]), f"{n} changed outside the active block"


def test_fp16_with_grad_scaler_skips_overflowing_steps_on_device():
    """torch GradScaler hands BlockAdam grad_scale / found_inf; overflowing steps change nothing."""
    model = tiny_model("llama", dtype=torch.float16, num_layers=2)
    opt = BlockAdam(model, lr=1e-2, switch_every=10, switch_mode="ascending", backend="torch", max_grad_norm=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)  # overflows fp16 grads at first
    ids = _batches(1)[0]
    adam_steps = []
    for _ in range(5):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        scaler.scale(_loss(model, ids)).backward()
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        changed = any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
        skipped = scaler.get_scale() < scale
        assert changed != skipped, "a skipped step changed weights, or a real step did not"
        adam_steps.append(int(opt._step_states[0][0].item()))
    assert adam_steps[0] == 0, "the first (overflowing) step should have been skipped"
    assert adam_steps[-1] >= 1, "no step was ever taken"
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("reentrant", [False, True])
def test_backward_stops_at_active_block_when_checkpointing_is_enabled_after_construction(reentrant):
    """The HF Trainer order: optimizer first, then gradient_checkpointing_enable() (input grads on)."""
    from _probes import add_probes

    model = tiny_model("llama", num_layers=4)
    opt = BlockAdam(model, lr=1e-3, switch_every=1, switch_mode="descending", backend="torch")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    record = add_probes(model)
    for ids in _batches(2):
        active = opt.active_block
        record.clear()
        _loss(model, ids).backward()
        assert record == set(range(active, 4)), f"block {active}: backward ran through layers {sorted(record)}"
        assert all(p.grad is not None for p in opt.active_params)
        opt.step()


def test_compat_constructor_with_model_gets_backward_pruning():
    model = tiny_model("llama", num_layers=2)
    named = list(model.named_parameters())
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert BlockOptimizer(base, named, backend="torch").pruner is None
    assert BlockOptimizer(base, named, backend="torch", model=model).pruner is not None
    with pytest.raises(ValueError, match="model= must be the module"):
        BlockOptimizer(base, named, backend="torch", model=tiny_model("llama", num_layers=2))


def test_refused_state_dict_leaves_the_optimizer_unchanged():
    opt = BlockAdam(tiny_model("llama", num_layers=3), lr=1e-3, backend="torch", switch_mode="ascending")
    state = opt.state_dict()
    state["param_groups"][0]["lr"] = 123.0
    state["schedule"]["global_step"] = 999
    state["active_param_names"] = ["not.a.param"]
    with pytest.raises(ValueError, match="do not match"):
        opt.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.schedule.global_step == 0


def test_state_dict_holds_host_copies():
    opt = BlockAdam(tiny_model("llama", num_layers=2), backend="torch")
    state = opt.state_dict()
    for key in ("master", "exp_avg", "exp_avg_sq"):
        for saved, view in zip(state[key], opt._views[("master", "exp_avg", "exp_avg_sq").index(key)]):
            assert saved.device.type == "cpu" and saved.data_ptr() != view.data_ptr()


def test_step_refuses_weights_reallocated_after_construction():
    model = tiny_model("llama", num_layers=2)
    opt = BlockAdam(model, backend="torch")
    model.to(torch.float64)  # new storage: the optimizer's tables point at the old tensors
    _loss(model, _batches(1)[0]).backward()
    with pytest.raises(RuntimeError, match="re-allocated after BlockAdam was built"):
        opt.step()


def test_discarded_optimizer_is_freed_and_close_detaches():
    import gc
    import weakref

    model = tiny_model("llama", num_layers=2)
    ref = weakref.ref(BlockAdam(model, backend="torch"))
    gc.collect()
    assert ref() is None, "the model's forward hook kept a discarded optimizer alive"
    opt = BlockAdam(model, backend="torch")
    opt.close()
    assert opt.arena.released and not model._forward_pre_hooks
