"""BlockAdam against a float64 re-implementation, step by step, across block switches."""
from __future__ import annotations

import pytest
import torch
from _float64_badam import Float64BlockAdamW
from _kernel_helpers import ulp_distance
from _tiny_models import tiny_model

from badam_ext import BlockAdam
from badam_ext.optimizer import default_no_decay

BACKENDS = ["torch", "triton"]


def _random_grads(opt: BlockAdam, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Fresh random gradients (never zeros) on the active block, set as .grad; returned by name."""
    grads = {}
    for lg in opt._launch_groups:
        for name, p in zip(lg.names, lg.params):
            g = (torch.randn(p.shape, generator=gen) * 0.1 + 0.01).to(p.dtype)
            p.grad = g.clone()
            grads[name] = g
    return grads


def _setup(dtype, backend, order_mode="ascending", k=2, wd=0.1, num_layers=3):
    model = tiny_model("llama", dtype=dtype, num_layers=num_layers)
    opt = BlockAdam(model, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd,
                    switch_every=k, switch_mode=order_mode, backend=backend)
    blocks = [opt.partition.block_params(i) for i in range(len(opt.partition))]
    n = len(blocks)
    order = list(range(n)) if order_mode == "ascending" else list(range(n - 1, -1, -1))
    decays = {name: not default_no_decay(name, p) for blk in blocks for name, p in blk}
    ref_model = tiny_model("llama", dtype=dtype, num_layers=num_layers)
    ref_params = dict(ref_model.named_parameters())
    ref_blocks = [[(name, ref_params[name]) for name, _ in blk] for blk in blocks]
    ref = Float64BlockAdamW(ref_blocks, order, k, 1e-2, (0.9, 0.99), 1e-8, wd, decays)
    return model, opt, ref_model, ref


def _assert_close_weights(model, ref_model, dtype):
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        if dtype == torch.float32:
            err = (p.double() - q.double()).norm() / q.double().norm()
            assert err < 2e-6, f"{name}: relative error {err:.2e}"
        else:
            # Within one ulp of the fp64 reference's rounding, except near zero, where the fp32 master's
            # own error (relative to the tensor's scale) spans several of the tiny value's ulps.
            ulps = ulp_distance(p.detach(), q.detach())
            near_zero = (p.float() - q.float()).abs() <= 1e-6 * q.float().abs().max()
            assert (ulps <= 1).logical_or(near_zero).all(), f"{name}: {ulps.max()} ulps from the float64 reference"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["ascending", "descending"])
def test_matches_float64_reference_across_switches(backend, dtype, mode):
    model, opt, ref_model, ref = _setup(dtype, backend, mode, k=2)
    gen = torch.Generator().manual_seed(0)
    seen_blocks = []
    for _ in range(7):  # 3 blocks, K=2: crosses three switches
        seen_blocks.append(opt.active_block)
        assert ref.active == opt.active_block
        grads = _random_grads(opt, gen)
        opt.step()
        ref.step(grads)
        _assert_close_weights(model, ref_model, dtype)
    assert len(set(seen_blocks)) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_from_param_groups_and_scheduler(backend):
    model, opt, ref_model, ref = _setup(torch.float32, backend, k=3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        lr = opt.param_groups[0]["lr"]
        assert lr == pytest.approx(1e-2 / (1 + step))
        grads = _random_grads(opt, gen)
        opt.step()
        ref.step(grads, lr=lr)
        sched.step()
    _assert_close_weights(model, ref_model, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_clipping_matches_scaled_reference(backend):
    model, opt, ref_model, ref = _setup(torch.float32, backend, k=4)
    opt.max_grad_norm = 0.05
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        grads = _random_grads(opt, gen)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
        opt.step()
        assert opt.last_grad_norm.item() == pytest.approx(norm.item(), rel=1e-5)
        ref.step(grads, grad_scale=min(1.0, 0.05 / (norm.item() + 1e-6)))
    _assert_close_weights(model, ref_model, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_skips_step_on_device(backend):
    model, opt, ref_model, ref = _setup(torch.float32, backend, k=5)
    gen = torch.Generator().manual_seed(3)
    grads = _random_grads(opt, gen)
    opt.step()
    ref.step(grads)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _random_grads(opt, gen)
    opt.found_inf = torch.ones((), dtype=torch.float32)
    opt.grad_scale = torch.full((), 1024.0)
    opt.step()
    del opt.found_inf, opt.grad_scale
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed on a skipped step"
    # The next real step uses step count 2, as if the skipped one never happened.
    grads = _random_grads(opt, gen)
    opt.grad_scale = torch.full((), 4.0)
    opt.found_inf = torch.zeros((), dtype=torch.float32)
    opt.step()
    ref.step(grads, grad_scale=0.25)
    _assert_close_weights(model, ref_model, torch.float32)


def test_backends_agree_on_bf16_weights():
    models = []
    for backend in BACKENDS:
        model, opt, _, _ = _setup(torch.bfloat16, backend, k=2)
        gen = torch.Generator().manual_seed(4)
        for _ in range(5):
            _random_grads(opt, gen)
            opt.step()
        models.append(model)
    for (n, p), (_, q) in zip(models[0].named_parameters(), models[1].named_parameters()):
        ulps = ulp_distance(p.detach(), q.detach())
        assert ulps.max() <= 1, f"{n}: torch and triton backends differ by {ulps.max()} ulps"
        assert (ulps == 0).float().mean() > 0.99, f"{n}: torch and triton backends differ too often"


def test_missing_grad_is_an_error_not_a_skip():
    model, opt, _, _ = _setup(torch.float32, "torch")
    _random_grads(opt, torch.Generator().manual_seed(0))
    opt.active_params[0].grad = None
    with pytest.raises(RuntimeError, match="no gradient for 1 parameter"):
        opt.step()
