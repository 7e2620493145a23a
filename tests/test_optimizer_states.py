"""BlockAdam with compact states: every format trains, resumes bit-identically, reports its arena
bytes from the spec, refuses another format's state and bad arguments; the two backends agree."""
from __future__ import annotations

import re

import pytest
import torch
from _tiny_models import tiny_batch, tiny_model

from badam_ext import BlockAdam
from badam_ext import kernels as K
from badam_ext.states import state_spec

FORMATS = [("fp32", True), ("8bit", True), ("8bit", False), ("fp32", False)]
FORMAT_IDS = ["fp32", "8bit", "8bit-nomaster", "fp32-nomaster"]


def _loss(model, seed: int) -> torch.Tensor:
    batch = tiny_batch(model, seed=seed)
    return model(**batch).loss


def _train(opt: BlockAdam, model, seeds) -> list[float]:
    losses = []
    for s in seeds:
        loss = _loss(model, s)
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
    return losses


@pytest.mark.parametrize("states, master", FORMATS, ids=FORMAT_IDS)
def test_every_format_trains_and_reports_its_bytes(states: str, master: bool):
    model = tiny_model("llama", dtype=torch.bfloat16, num_layers=2)
    opt = BlockAdam(model, lr=3e-3, switch_every=6, switch_mode="ascending", backend="torch", states=states,
                    master=master)
    spec = state_spec(states, master)
    assert opt.arena.spec == spec and opt.arena.allocations == 1
    for i in range(len(opt.partition)):
        numels = [p.numel() for _, p in opt.partition.trainable_params(i)]
        from badam_ext.arena import required_capacity
        assert opt.block_info(i)["arena_bytes"] == spec.bytes(required_capacity(numels, spec))
    losses = _train(opt, model, [0] * 12)
    assert losses[-1] < losses[0], losses
    assert opt.arena.allocations == 1  # switches reuse the one allocation
    assert f"states={states!r}, master={master}" in repr(opt)


def test_compact_formats_use_less_arena():
    model = tiny_model("llama", dtype=torch.bfloat16, num_layers=2)
    sizes = {}
    for states, master in FORMATS:
        opt = BlockAdam(model, backend="torch", states=states, master=master)
        sizes[(states, master)] = opt.arena.capacity_bytes
        opt.close()
    full = sizes[("fp32", True)]
    assert sizes[("8bit", True)] < 0.55 * full
    assert sizes[("8bit", False)] < 0.2 * full
    assert sizes[("fp32", False)] < 0.7 * full


@pytest.mark.parametrize("states, master", FORMATS, ids=FORMAT_IDS)
def test_state_dict_round_trips_bit_identically(states: str, master: bool, tmp_path):
    kwargs = dict(lr=1e-2, weight_decay=0.01, switch_every=2, switch_mode="random", backend="torch", seed=3,
                  states=states, master=master)
    model = tiny_model("llama", dtype=torch.bfloat16, num_layers=3)
    opt = BlockAdam(model, **kwargs)
    _train(opt, model, range(5))
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    _train(opt, model, range(5, 10))

    resumed = tiny_model("llama", dtype=torch.bfloat16, num_layers=3, seed=99)
    opt2 = BlockAdam(resumed, **kwargs)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    again = opt2.state_dict()
    for key, value in ckpt["opt"].items():  # what was saved loads back unchanged
        if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            assert all(torch.equal(a, b) for a, b in zip(value, again[key])), key
    _train(opt2, resumed, range(5, 10))
    for (n, p), (_, q) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), f"{n} differs after resume"
    assert list(opt._state_views) == state_spec(states, master).region_names
    for name in opt._state_views:
        for a, b in zip(opt._state_views[name], opt2._state_views[name]):
            assert torch.equal(a, b), name


def test_loading_another_format_is_refused_naming_both():
    model = tiny_model("llama", dtype=torch.bfloat16, num_layers=2)
    saved = {}
    for states, master in FORMATS:
        opt = BlockAdam(model, backend="torch", states=states, master=master)
        _train(opt, model, [0])
        saved[(states, master)] = opt.state_dict()
        opt.close()
    assert "states" not in saved[("fp32", True)]  # the default format's state is unchanged
    opt = BlockAdam(model, backend="torch", states="8bit")
    for fmt, state in saved.items():
        if fmt == ("8bit", True):
            continue
        before = [t.clone() for t in opt._state_views["exp_avg"]]
        message = (f"this state_dict holds states={fmt[0]!r}, master={fmt[1]} optimizer states but this BlockAdam "
                   "uses states='8bit', master=True: loading one state format into another is refused")
        with pytest.raises(ValueError, match=re.escape(message)):
            opt.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(before, opt._state_views["exp_avg"]))  # nothing applied
    opt.load_state_dict(saved[("8bit", True)])
    broken = dict(saved[("8bit", True)])
    broken["exp_avg"] = [t.float() for t in broken["exp_avg"]]
    with pytest.raises(ValueError, match=r"state_dict\['exp_avg'\]\[0\] .* expected a uint8 tensor"):
        opt.load_state_dict(broken)
    del broken["exp_avg_scale"]
    with pytest.raises(ValueError, match=re.escape("lacks key(s) ['exp_avg_scale'] of its state format")):
        opt.load_state_dict(broken)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(states="int8"), ValueError, "unknown states='int8': choose one of 'fp32', '8bit'"),
    (dict(states=None), ValueError, "unknown states=None"),
    (dict(master="no"), TypeError, "master must be a bool, got str"),
])
def test_bad_state_arguments(kwargs, exc, match):
    model = tiny_model("llama", dtype=torch.bfloat16, num_layers=2)
    with pytest.raises(exc, match=re.escape(match)):
        BlockAdam(model, backend="torch", **kwargs)


def test_no_master_refuses_fp16_weights():
    model = tiny_model("llama", dtype=torch.float16, num_layers=2)
    with pytest.raises(TypeError, match="is float16: master=False updates the weights directly"):
        BlockAdam(model, backend="torch", master=False)


@pytest.mark.parametrize("states", ["8bit", "fp32"])
def test_tables_are_built_for_the_formats_step(states: str, monkeypatch):
    """Each format's step has its own launch configuration: BlockAdam names the format to the tables."""
    from badam_ext import torch_ops

    seen = []
    build = torch_ops.TorchTables.build.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("states"))
        return build(cls, *args, **kwargs)

    monkeypatch.setattr(torch_ops.TorchTables, "build", classmethod(spy))
    model = tiny_model("llama", dtype=torch.bfloat16, num_layers=2)
    opt = BlockAdam(model, lr=1e-2, backend="torch", states=states)
    _train(opt, model, range(1))
    assert seen and set(seen) == {states}


@pytest.mark.skipif(not K.interpreted(), reason="compares the backends on CPU, in the Triton interpreter")
@pytest.mark.parametrize("master", [True, False])
def test_triton_and_torch_backends_agree_on_8bit(master: bool):
    """The same run on both backends: bit-identical weights and codes (with a master: round to
    nearest; without: both round stochastically from different streams, so the codes only)."""
    runs = {}
    for name in ("torch", "triton"):
        model = tiny_model("llama", dtype=torch.bfloat16, num_layers=2)
        opt = BlockAdam(model, lr=1e-2, switch_every=2, switch_mode="ascending", backend=name, states="8bit",
                        master=master)
        _train(opt, model, range(3 if master else 1))
        runs[name] = (model, opt)
    (m1, o1), (m2, o2) = runs["torch"], runs["triton"]
    if master:
        for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
            assert torch.equal(p, q), n
    for name in o1._state_views:
        for a, b in zip(o1._state_views[name], o2._state_views[name]):
            assert torch.equal(a, b), name


@pytest.mark.skipif(not K.interpreted(), reason="compares the backends on CPU, in the Triton interpreter")
@pytest.mark.parametrize("states", ["8bit", "fp32"])
def test_backends_agree_without_a_master_on_fp32_weights(states: str):
    """fp32 weights round exactly (no stochastic rounding): without a master, BlockAdam's weight update
    must give the same weights on both backends over several steps and a switch."""
    runs = {}
    for name in ("torch", "triton"):
        model = tiny_model("llama", dtype=torch.float32, num_layers=2)
        opt = BlockAdam(model, lr=1e-2, switch_every=2, switch_mode="ascending", backend=name, states=states,
                        master=False)
        _train(opt, model, range(5))
        runs[name] = model
    moved = 0
    reference = tiny_model("llama", dtype=torch.float32, num_layers=2)
    for (n, p), (_, q), (_, r) in zip(runs["torch"].named_parameters(), runs["triton"].named_parameters(),
                                      reference.named_parameters()):
        assert torch.equal(p, q), n
        moved += int(not torch.equal(p, r))
    assert moved > 0  # the weights did train


def test_no_master_sees_weights_written_in_place():
    """Without a master the weights are the state: a load_state_dict into the model is simply used."""
    model = tiny_model("llama", dtype=torch.bfloat16, num_layers=2)
    opt = BlockAdam(model, lr=1e-3, switch_every=4, backend="torch", master=False, states="8bit")
    _train(opt, model, [0])
    p = opt.active_params[0]
    with torch.no_grad():
        p.fill_(0.25)
    p.grad = torch.zeros_like(p)
    for q in opt.active_params[1:]:
        q.grad = torch.zeros_like(q)
    opt.step()
    # the written values, moved by one step of lr 1e-3 (the old weights, ~0.02, would be far off)
    assert float((p.detach().float() - 0.25).abs().max()) < 1e-2


def _cuda_loss(model, seed: int) -> torch.Tensor:
    batch = {k: v.cuda() for k, v in tiny_batch(model, seed=seed).items()}
    return model(**batch).loss


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("states, master", FORMATS, ids=FORMAT_IDS)
def test_gpu_every_format_resumes_bit_identically(states: str, master: bool, tmp_path):
    """On the GPU with the Triton kernels: train, checkpoint, resume; the same weights bit for bit."""
    kwargs = dict(lr=1e-2, weight_decay=0.01, switch_every=2, switch_mode="random", seed=3, states=states,
                  master=master)
    model = tiny_model("llama", dtype=torch.bfloat16, num_layers=3).cuda()
    opt = BlockAdam(model, **kwargs)
    assert opt._ops.name == "triton"
    for s in range(4):
        _cuda_loss(model, s).backward()
        opt.step()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    for s in range(4, 8):
        _cuda_loss(model, s).backward()
        opt.step()
    resumed = tiny_model("llama", dtype=torch.bfloat16, num_layers=3, seed=99).cuda()
    opt2 = BlockAdam(resumed, **kwargs)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    for s in range(4, 8):
        _cuda_loss(resumed, s).backward()
        opt2.step()
    for (n, p), (_, q) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), f"{n} differs after resume"
