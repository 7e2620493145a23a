"""BlockAdam on CUDA: parity in bf16 with the float64 oracle and the reference, and a Llama-3-8B-shaped
model stepping through a full block epoch (random weights from a config)."""
from __future__ import annotations

import pytest
import torch
from _float64_badam import Float64BlockAdamW
from _kernel_helpers import ulp_distance
from _tiny_models import tiny_model

from badam_ext import BlockAdam, BlockOptimizer
from badam_ext.optimizer import default_no_decay

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_bf16_matches_float64_oracle_on_cuda():
    model = tiny_model("llama", dtype=torch.bfloat16, num_layers=3).cuda()
    ref_model = tiny_model("llama", dtype=torch.bfloat16, num_layers=3).cuda()
    opt = BlockAdam(model, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, switch_every=2,
                    switch_mode="ascending")
    assert opt._ops.name == "triton"
    blocks = [opt.partition.block_params(i) for i in range(len(opt.partition))]
    ref_params = dict(ref_model.named_parameters())
    ref = Float64BlockAdamW([[(n, ref_params[n]) for n, _ in b] for b in blocks], [0, 1, 2], 2, 1e-2, (0.9, 0.99),
                            1e-8, 0.1, {n: not default_no_decay(n, p) for b in blocks for n, p in b})
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(7):
        grads = {}
        for n, p in opt.partition.trainable_params(opt.active_block):
            g = (torch.randn(p.shape, device="cuda", generator=gen) * 0.1 + 0.01).to(p.dtype)
            p.grad = g.clone()
            grads[n] = g
        opt.step()
        ref.step(grads)
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        ulps = ulp_distance(p.detach(), q.detach())
        near_zero = ((p.float() - q.float()).abs() <= 1e-6 * q.float().abs().max()).cpu()
        assert (ulps <= 1).logical_or(near_zero).all(), f"{n}: {ulps.max()} ulps from the float64 oracle"


def test_bf16_parity_with_reference_badam_on_cuda():
    badam = pytest.importorskip("badam")
    ids = torch.randint(3, 128, (6, 2, 12), generator=torch.Generator().manual_seed(5)).cuda()
    models = []
    for ours in (False, True):
        model = tiny_model("llama", dtype=torch.bfloat16, num_layers=3).cuda()
        base = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        make = BlockOptimizer if ours else badam.BlockOptimizer
        opt = make(base_optimizer=base, named_parameters_list=list(model.named_parameters()),
                   switch_block_every=1, switch_mode="ascending", verbose=0)
        for batch in ids:
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        models.append(model)
    for (n, p), (_, q) in zip(models[1].named_parameters(), models[0].named_parameters()):
        ulps = ulp_distance(p.detach(), q.detach())
        assert ulps.max() <= 1, f"{n}: {ulps.max()} ulps from the reference"


def test_llama3_8b_shape_full_block_epoch():
    transformers = pytest.importorskip("transformers")
    if torch.cuda.get_device_properties(0).total_memory < 60 * 2**30:
        pytest.skip("needs ~40 GB of GPU memory")
    config = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    # Skip HF's initialisation (slow at this size); a plain normal_ below is enough for a smoke run.
    import importlib

    try:
        init_mod = importlib.import_module("transformers.initialization")  # transformers >= 5.x
    except ImportError:
        init_mod = transformers.modeling_utils
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            with init_mod.no_init_weights():
                model = transformers.LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.gradient_checkpointing_enable()
    opt = BlockAdam(model, lr=1e-5, switch_every=1, switch_mode="ascending")
    assert len(opt.partition) == 32
    assert opt.arena.allocations == 1
    ids = torch.randint(0, 128256, (1, 256), device="cuda")
    visited = []
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    for _ in range(32):
        visited.append(opt.active_block)
        loss = model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    assert visited == list(range(32))
    assert opt.arena.allocations == 1 and opt.arena.switches >= 32
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, before)
    # one 8B layer: 218.1M params; arena holds 3 fp32 copies of the largest block
    assert opt.arena.capacity_bytes < 3 * 4 * 219_000_000 + 4096


def test_state_dict_moved_to_the_gpu_loads():
    """accelerate (HF Trainer) moves optimizer state_dicts to the device before loading them."""
    model = tiny_model("llama", dtype=torch.bfloat16, num_layers=2).cuda()
    opt = BlockAdam(model, switch_every=1, switch_mode="random")
    state = opt.state_dict()

    def to_cuda(x):
        if isinstance(x, torch.Tensor):
            return x.cuda()
        if isinstance(x, dict):
            return {k: to_cuda(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(to_cuda(v) for v in x)
        return x

    opt.load_state_dict(to_cuda(state))
    assert opt.schedule.state_dict()["order"] == state["schedule"]["order"]
