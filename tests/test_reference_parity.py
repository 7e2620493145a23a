"""BlockAdam against the reference BAdam (PyPI ``badam==1.4``) on a tiny Llama, same seed and data.

Compared where the reference is right: weight decay 0 (it decays norms and overrides group decay)
and K=1 (it gives the first block K-1 steps). Our behaviour there is tested in test_behaviour.py.
"""
from __future__ import annotations

import pytest
import torch
from _kernel_helpers import ulp_distance
from _tiny_models import tiny_model

from badam_ext import BlockAdam, BlockOptimizer

badam = pytest.importorskip("badam", reason="the reference badam==1.4 is a test dependency")

STEPS = 6


def _batches(n: int, vocab: int = 128, seq: int = 12, bsz: int = 2):
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (bsz, seq), generator=gen) for _ in range(n)]


def _train(model, opt, batches):
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _reference_run(dtype, mode):
    model = tiny_model("llama", dtype=dtype, num_layers=3)
    base = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    opt = badam.BlockOptimizer(base_optimizer=base, named_parameters_list=list(model.named_parameters()),
                               switch_block_every=1, switch_mode=mode, verbose=0)
    _train(model, opt, _batches(STEPS))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["ascending", "descending"])
def test_parity_with_reference_badam(dtype, mode):
    ref = _reference_run(dtype, mode)
    model = tiny_model("llama", dtype=dtype, num_layers=3)
    base = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    opt = BlockOptimizer(base_optimizer=base, named_parameters_list=list(model.named_parameters()),
                         switch_block_every=1, switch_mode=mode, verbose=0)
    assert isinstance(opt, BlockAdam)
    _train(model, opt, _batches(STEPS))
    initial = dict(tiny_model("llama", dtype=dtype, num_layers=3).named_parameters())
    changed = 0
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        changed += int(not torch.equal(q, initial[name]))
        if dtype == torch.float32:
            err = ((p.double() - q.double()).norm() / q.double().norm()).item()
            assert err < 1e-5, f"{name}: relative error {err:.2e} vs the reference"
        else:
            ulps = ulp_distance(p.detach(), q.detach())
            frac_equal = (ulps == 0).float().mean().item()
            assert ulps.max() <= 1, f"{name}: {ulps.max()} ulps from the reference"
            assert frac_equal > 0.99, f"{name}: only {frac_equal:.3f} of elements equal the reference"
    assert changed > 0, "nothing was trained"
