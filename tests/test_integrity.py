"""State integrity under misuse and bad input (issue 11): nothing lost, nothing silently wrong.

Each test drives BlockAdam the wrong way (weights loaded behind its back, corrupted state dicts,
refused steps, blocks it cannot step, copies, use after close, two optimizers on one model) and checks
that it either does the right thing or refuses, changing nothing.
"""
from __future__ import annotations

import copy
import gc
import io
import pickle
import re
import warnings
import weakref
from typing import Any, Callable

import pytest
import torch
from _tiny_models import tiny_model
from torch import nn

from badam_ext import BlockAdam
from badam_ext.launch_groups import LaunchGroup

UP = "model.layers.{}.mlp.up_proj.weight"  # a (64, 32) weight of each layer: one per block


def _model(dtype: torch.dtype = torch.float32, num_layers: int = 2, seed: int = 0) -> nn.Module:
    return tiny_model("llama", dtype=dtype, num_layers=num_layers, seed=seed)


def _opt(model: nn.Module, **kwargs: Any) -> BlockAdam:
    options = dict(lr=1e-2, switch_every=2, switch_mode="ascending", backend="torch")
    options.update(kwargs)
    return BlockAdam(model, **options)


def _set_grads(opt: BlockAdam, seed: int) -> None:
    """Seeded random gradients (never all zero) on the active block."""
    gen = torch.Generator().manual_seed(seed)
    for p in opt.active_params:
        p.grad = (torch.randn(p.shape, generator=gen) * 0.1 + 0.01).to(p.dtype)


def _train(opt: BlockAdam, steps: int, seed: int = 0) -> None:
    for i in range(steps):
        _set_grads(opt, seed + i)
        opt.step()


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Nested dicts / lists / tensors equal, tensors bit for bit (torch.equal)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _assert_unchanged(opt: BlockAdam, model: nn.Module, state: dict, weights: dict, trainable: set) -> None:
    _assert_same(opt.state_dict(), state)
    _assert_same(_weights(model), weights, "weights")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def _snapshot(opt: BlockAdam, model: nn.Module) -> tuple[dict, dict, set]:
    return opt.state_dict(), _weights(model), {n for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------ 1. weights written in place
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_loaded_after_construction_survive_a_step_at_lr_zero(backend, dtype):
    model, other = _model(dtype), _model(dtype, seed=1)
    opt = _opt(model, lr=0.0, weight_decay=0.1, backend=backend)
    _train(opt, 1)  # the master has been used once: a stale copy would win below
    model.load_state_dict(other.state_dict())
    _train(opt, 1, seed=5)
    for name, p in model.named_parameters():
        assert torch.equal(p, other.get_parameter(name)), f"{name}: the loaded weight was reverted"


def test_in_place_copy_keeps_moments_like_torch_adamw():
    model, other = _model(), _model(seed=1)
    reference = copy.deepcopy(model)
    opt = _opt(model, switch_every=10, betas=(0.9, 0.99))
    names = [n for n, _ in opt.partition.trainable_params(opt.active_block)]
    adamw = torch.optim.AdamW([reference.get_parameter(n) for n in names], lr=1e-2, betas=(0.9, 0.99),
                              weight_decay=0.0)
    for step in range(3):
        if step == 2:  # new values copied into the active block between steps
            with torch.no_grad():
                for n in names[:3]:
                    model.get_parameter(n).copy_(other.get_parameter(n))
                    reference.get_parameter(n).copy_(other.get_parameter(n))
        _set_grads(opt, step)
        for n in names:
            reference.get_parameter(n).grad = model.get_parameter(n).grad.clone()
        opt.step()
        adamw.step()
    for n in names:
        torch.testing.assert_close(model.get_parameter(n), reference.get_parameter(n), rtol=1e-6, atol=1e-7,
                                   msg=lambda m, n=n: f"{n}: {m}")


def test_state_dict_after_a_weight_load_saves_the_matching_master():
    model, other = _model(), _model(seed=1)
    opt = _opt(model)
    _train(opt, 1)
    model.load_state_dict(other.state_dict())
    saved = opt.state_dict()
    names = saved["active_param_names"]
    for name, master in zip(names, saved["master"]):
        assert torch.equal(master, other.get_parameter(name)), f"{name}: a stale master was saved"


def test_rewriting_the_same_values_keeps_the_masters_precision():
    """bf16 weights written back unchanged: the fp32 master (finer than bf16) must not be reset."""
    runs = []
    for rewrite in (False, True):
        model = _model(torch.bfloat16)
        opt = _opt(model, switch_every=10)
        _train(opt, 2)
        if rewrite:
            model.load_state_dict(model.state_dict())
        _train(opt, 2, seed=10)
        runs.append((_weights(model), opt.state_dict()))
    _assert_same(runs[1][0], runs[0][0], "weights")
    _assert_same(runs[1][1], runs[0][1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_our_own_writes_never_trigger_a_master_reload(backend, monkeypatch):
    calls = []
    monkeypatch.setattr(LaunchGroup, "resync_master", lambda self, *a: calls.append(self.names))
    opt = _opt(_model(torch.bfloat16), switch_every=2, backend=backend)
    _train(opt, 3)  # across a switch
    opt.found_inf = torch.ones((), dtype=torch.float32)  # a skipped (GradScaler) step writes too
    _train(opt, 1)
    del opt.found_inf
    opt.state_dict()
    assert calls == []


# ---------------------------------------------------------------- 2-3. load_state_dict validation
def _spoil_schedule_generator(s: dict) -> None:
    s["schedule"]["generator"] = "not a tensor"


def _spoil_schedule_block(s: dict) -> None:
    s["schedule"]["position"] = 0  # the saved active block is 1


CORRUPTIONS: dict[str, tuple[Callable[[dict], Any], str]] = {
    "truncated master": (lambda s: s["master"].pop(), r"state_dict\['master'\] must be a list of \d+ float32"),
    "truncated exp_avg": (lambda s: s["exp_avg"].pop(), r"state_dict\['exp_avg'\] must be a list of \d+ float32"),
    "one-element step_states": (lambda s: s.update(step_states=[torch.tensor([7.0], dtype=torch.float64)]),
                                r"state_dict\['step_states'\]\[0\] is a torch.float64 tensor of shape \(1,\); "
                                r"expected a float64 tensor \[t, beta1\^t, beta2\^t\] of shape \(3,\)"),
    "int64 exp_avg": (lambda s: s.update(exp_avg=[t.long() for t in s["exp_avg"]]),
                      r"state_dict\['exp_avg'\]\[0\] \(model.layers.1.\S+\) is a torch.int64 tensor of shape "
                      r"\(\d+, \d+\); expected a float32 tensor of shape"),
    "bf16 exp_avg_sq": (lambda s: s.update(exp_avg_sq=[t.bfloat16() for t in s["exp_avg_sq"]]),
                        r"state_dict\['exp_avg_sq'\]\[0\] .* is a torch.bfloat16 tensor"),
    "transposed master": (lambda s: s["master"].__setitem__(1, s["master"][1].t()),
                          r"state_dict\['master'\]\[1\] \(model.layers.1.\S+\) is a torch.float32 tensor of shape "
                          r"\((\d+), (\d+)\); expected a float32 tensor of shape \(\2, \1\)"),
    "lr -1": (lambda s: s["param_groups"][0].update(lr=-1),
              r"state_dict\['param_groups'\]\[0\]: invalid learning rate lr=-1"),
    "lr 'abc'": (lambda s: s["param_groups"][0].update(lr="abc"),
                 r"state_dict\['param_groups'\]\[0\]: invalid learning rate lr='abc'"),
    "NaN eps": (lambda s: s["param_groups"][0].update(eps=float("nan")), r"\['param_groups'\]\[0\]: invalid eps"),
    "no step_states": (lambda s: s.pop("step_states"), r"lacks key\(s\) \['step_states'\]"),
    "no master": (lambda s: s.pop("master"), r"lacks key\(s\) \['master'\]"),
    "no seed": (lambda s: s.pop("seed"), r"lacks key\(s\) \['seed'\]"),
    "seed 1.5": (lambda s: s.update(seed=1.5), r"state_dict\['seed'\] must be an int, got 1.5"),
    "sr_counter -1": (lambda s: s.update(sr_counter=-1), r"state_dict\['sr_counter'\] must be an int >= 0"),
    "NaN step": (lambda s: s["step_states"][0].fill_(float("nan")), r"\['step_states'\]\[0\] holds"),
    "bad generator": (_spoil_schedule_generator, r"state_dict\['schedule'\] does not load"),
    "schedule on another block": (_spoil_schedule_block, r"makes block 0 active but state_dict\['active_block'\] is 1"),
}


@pytest.fixture(scope="module")
def saved_on_block_1() -> dict:
    """A state one step into block 1 (t = 1, live moments), from a model nobody else trains."""
    opt = _opt(_model(), lr=3e-2)
    _train(opt, 3)
    assert opt.active_block == 1
    state = opt.state_dict()
    opt.close()
    return state


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupted_state_is_refused_and_changes_nothing(corruption, saved_on_block_1):
    spoil, match = CORRUPTIONS[corruption]
    model = _model()
    opt = _opt(model, lr=1e-3)
    _train(opt, 1)  # block 0, t = 1
    before = _snapshot(opt, model)
    state = copy.deepcopy(saved_on_block_1)
    spoil(state)
    with pytest.raises(Exception) as refused:
        opt.load_state_dict(state)
    _assert_unchanged(opt, model, *before)
    assert refused.type is ValueError and re.search(match, str(refused.value)), refused.value
    opt.load_state_dict(saved_on_block_1)  # the intact state still loads
    _assert_same(opt.state_dict()["master"], saved_on_block_1["master"])


# ------------------------------------------------------------------------- 4. refused steps
def _noncontiguous_grad(opt: BlockAdam) -> None:
    p = next(p for p in opt.active_params if p.dim() == 2)
    p.grad = p.grad.t().contiguous().t()


def _grad_data(transform: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[BlockAdam], None]:
    def spoil(opt: BlockAdam) -> None:
        p = next(p for p in opt.active_params if p.dim() == 2)
        p.grad.data = transform(p.grad.data)  # .data skips autograd's own dtype and shape checks
    return spoil


def _group_value(key: str, value: Any) -> Callable[[BlockAdam], None]:
    return lambda opt: opt.param_groups[0].__setitem__(key, value)


STEP_SPOILERS: dict[str, tuple[Callable[[BlockAdam], None], type, str]] = {
    "non-contiguous grad": (_noncontiguous_grad, ValueError, r"gradient of model.layers.0.\S+ .* is not contiguous"),
    "float64 grad": (_grad_data(lambda g: g.double()), TypeError,
                     r"gradient of model.layers.0.\S+ has dtype torch.float64"),
    "wrong-shape grad": (_grad_data(lambda g: g.reshape(-1)), ValueError, r"gradient of model.layers.0.\S+ has shape"),
    "NaN lr": (_group_value("lr", float("nan")), ValueError, r"param group 0: invalid learning rate lr=nan"),
    "inf eps": (_group_value("eps", float("inf")), ValueError, r"param group 0: invalid eps=inf"),
    "NaN weight decay": (_group_value("weight_decay", float("nan")), ValueError, "invalid weight_decay=nan"),
    "NaN max_grad_norm": (lambda opt: setattr(opt, "max_grad_norm", float("nan")), ValueError,
                          "invalid max_grad_norm=nan"),
}


@pytest.mark.parametrize("spoiler", list(STEP_SPOILERS))
def test_refused_step_does_not_advance(spoiler):
    spoil, error, match = STEP_SPOILERS[spoiler]
    models = [_model(), _model()]
    opts = [_opt(m, switch_every=2) for m in models]
    for opt in opts:
        _train(opt, 1)  # the next step ends block 0: a refused one must not switch either
    before = _snapshot(opts[0], models[0])
    _set_grads(opts[0], 1)
    saved = dict(opts[0].param_groups[0]), opts[0].max_grad_norm
    spoil(opts[0])
    with pytest.raises(Exception) as refused:
        opts[0].step()
    opts[0].param_groups[0].update(saved[0])
    opts[0].max_grad_norm = saved[1]
    _assert_unchanged(opts[0], models[0], *before)
    assert refused.type is error and re.search(match, str(refused.value)), refused.value
    for opt in opts:  # the next good step is the one a clean run takes
        _train(opt, 2, seed=1)
    _assert_same(_weights(models[0]), _weights(models[1]), "weights")
    _assert_same(opts[0].state_dict(), opts[1].state_dict())


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=float("nan")), "learning rate"), (dict(lr=float("inf")), "learning rate"),
    (dict(lr=True), "learning rate"), (dict(lr="abc"), "learning rate"),
    (dict(eps=float("nan")), "eps"), (dict(eps=float("inf")), "eps"),
    (dict(weight_decay=float("nan")), "weight_decay"), (dict(weight_decay=float("inf")), "weight_decay"),
    (dict(max_grad_norm=float("nan")), "max_grad_norm"), (dict(max_grad_norm=float("inf")), "max_grad_norm"),
    (dict(betas=(float("nan"), 0.9)), "betas"),
    (dict(param_groups=[{"params": None, "lr": float("nan")}]), "invalid learning rate"),
])
def test_non_finite_hyper_parameters_are_refused_at_construction(kwargs, match):
    model = _model(num_layers=1)
    if "param_groups" in kwargs:
        kwargs["param_groups"][0]["params"] = list(model.parameters())
    with pytest.raises(ValueError, match=match):
        _opt(model, **kwargs)


# ------------------------------------------------------------- 5. blocks that cannot be stepped
def _float64_weight(model: nn.Module) -> None:
    model.model.layers[1].mlp.up_proj.to(torch.float64)


def _int64_parameter(model: nn.Module) -> None:
    model.model.layers[1].mlp.register_parameter("steps", nn.Parameter(torch.zeros(3, dtype=torch.int64),
                                                                       requires_grad=False))


def _noncontiguous_weight(model: nn.Module) -> None:
    weight = model.get_parameter(UP.format(1))
    weight.data = weight.data.t().contiguous().t()


@pytest.mark.parametrize("spoil, error, match", [
    (_float64_weight, TypeError, r"'model.layers.1.mlp.up_proj.weight' of block 1 .* has dtype torch.float64"),
    (_int64_parameter, TypeError, r"'model.layers.1.mlp.steps' of block 1 .* has dtype torch.int64"),
    (_noncontiguous_weight, ValueError, r"'model.layers.1.mlp.up_proj.weight' of block 1 .* is not contiguous"),
])
def test_block_that_cannot_be_stepped_is_refused_at_construction(spoil, error, match):
    model = _model()
    spoil(model)
    with pytest.raises(error, match=match):
        _opt(model)
    assert all(p.requires_grad for p in model.parameters() if p.is_floating_point()), "construction changed the model"


def test_failing_switch_leaves_the_optimizer_on_its_block():
    model = _model()
    opt = _opt(model, switch_every=2)
    _train(opt, 1)
    weight = model.get_parameter(UP.format(1))
    weight.data = weight.data.double()  # after construction: the switch into block 1 cannot lay it out
    before = _snapshot(opt, model)
    _set_grads(opt, 1)
    with pytest.raises(Exception) as refused:
        opt.step()
    _assert_unchanged(opt, model, *before)
    assert re.search(r"'model.layers.1.mlp.up_proj.weight' of block 1 .* torch.float64", str(refused.value))
    assert opt.active_block == 0 and len(before[0]["master"]) > 0
    weight.data = weight.data.float()  # repaired: training goes on from where it was
    _set_grads(opt, 1)
    opt.step()
    assert opt.active_block == 1 and opt.schedule.global_step == 2


# ------------------------------------------------------------ 6-7. add_param_group and copies
def test_add_param_group_is_refused():
    opt = _opt(_model(num_layers=1))
    with pytest.raises(RuntimeError, match="does not support add_param_group.*fixed when it is built"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "copy", "torch.save"])
def test_copies_are_refused_with_a_pointer_to_state_dict(how):
    opt = _opt(_model(num_layers=1))
    copies = {
        "pickle": lambda: pickle.dumps(opt),
        "deepcopy": lambda: copy.deepcopy(opt),
        "copy": lambda: copy.copy(opt),
        "torch.save": lambda: torch.save(opt, io.BytesIO()),
    }
    with pytest.raises(TypeError, match=r"cannot be pickled or copied.*opt.state_dict\(\)"):
        copies[how]()
    torch.save(opt.state_dict(), io.BytesIO())  # what to do instead


# ----------------------------------------------------------------------------------- 8. close
def test_close_frees_the_arena_and_later_use_raises():
    model = _model(num_layers=1)
    opt = _opt(model)
    _train(opt, 1)
    state = opt.state_dict()
    storage = weakref.ref(opt.arena.buffer().untyped_storage())
    opt.close()
    gc.collect()
    assert storage() is None, "the arena's memory is still held after close()"
    for call in (opt.step, opt.state_dict, lambda: opt.load_state_dict(state), opt.zero_grad):
        with pytest.raises(RuntimeError, match=r"after close\(\)"):
            call()
    opt.close()  # a second close does nothing
    assert opt.closed and "closed)" in repr(opt)


# ------------------------------------------------------------------------------ 9. the rest
def test_second_optimizer_on_one_model_closes_the_first_explicitly():
    model = _model()
    first = _opt(model, switch_mode="descending")
    _train(first, 1)
    storage = weakref.ref(first.arena.buffer().untyped_storage())
    with pytest.warns(UserWarning, match=r"another BlockAdam was still open on these parameters .* closed now"):
        second = _opt(model)
    assert first.closed and storage() is None, "the first optimizer's arena is still allocated"
    with pytest.raises(RuntimeError, match=r"after a newer BlockAdam was built on the same parameters"):
        _train(first, 1)
    assert len(model._forward_pre_hooks) == 1, "the first optimizer's pruning hook is still on the model"
    trainable = {n for n, _ in second.partition.trainable_params(second.active_block)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    _train(second, 1)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when the previous one is closed or collected
        second.close()
        third = _opt(model)
        del third
        fourth = _opt(list(model.named_parameters()))
        assert fourth.active_block == 0
        _opt(_model())  # another model is another matter


def test_replaced_parameter_is_named():
    model = _model()
    opt = _opt(model, switch_every=2)
    mlp = model.model.layers[0].mlp
    mlp.up_proj.weight = nn.Parameter(mlp.up_proj.weight.detach().clone())
    model(input_ids=torch.arange(3, 11).reshape(1, 8), labels=torch.arange(3, 11).reshape(1, 8)).loss.backward()
    with pytest.raises(RuntimeError, match=r"\['model.layers.0.mlp.up_proj.weight'\] were replaced on the model"):
        opt.step()


def test_replaced_parameter_in_the_next_block_stops_the_switch():
    model = _model()
    opt = _opt(model, switch_every=1)
    mlp = model.model.layers[1].mlp
    mlp.up_proj.weight = nn.Parameter(mlp.up_proj.weight.detach().clone())
    before = _snapshot(opt, model)
    _set_grads(opt, 0)
    with pytest.raises(RuntimeError, match=r"model.layers.1.mlp.up_proj.weight'\] were replaced"):
        opt.step()
    _assert_unchanged(opt, model, *before)
