"""Layer kernels: Liger-Kernel's RMSNorm / SwiGLU functions patched into a model's instances.

On CPU (no Liger kernels there) the wiring is tested with exact torch stand-ins of the two
functions: a wrong argument order, epsilon or module would change the loss or a gradient bit.
On CUDA the real kernels are compared with Hugging Face's layers.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from _tiny_models import enable_checkpointing, tiny_batch, tiny_model

from badam_ext import apply_memory_savings
from badam_ext.memory.layer_kernels import LayerKernelsPatch, LayerKernelsUnavailable, why_unavailable

has_liger = importlib.util.find_spec("liger_kernel") is not None


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, mode: str,
                in_place: bool) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm, op for op, with Liger's argument list."""
    assert offset == 0.0 and mode == "llama" and in_place is False
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def hf_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class Recorder:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def _loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_patched_layers_compute_what_hugging_face_computes(family: str, checkpointing: bool) -> None:
    model = tiny_model(family, num_layers=3, seed=1)
    if checkpointing:
        enable_checkpointing(model, reentrant=False)
    # a non-default epsilon: the patch must read each module's own
    for m in model.modules():
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = 1e-3
    batch = tiny_batch(model, seq=9)
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    norm, silu_mul = Recorder(hf_rms_norm), Recorder(hf_silu_mul)
    patch = LayerKernelsPatch(model, functions=(norm, silu_mul))
    assert len(patch.norms) == 2 * 3 + 1 and len(patch.mlps) == 3
    loss, grads = _loss_and_grads(model, batch)
    assert norm.calls >= 7 and silu_mul.calls >= 3  # (twice as many with the recompute)
    assert torch.equal(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)
    patch.remove()
    assert all("forward" not in m.__dict__ for m in model.modules())
    calls = norm.calls
    loss, _ = _loss_and_grads(model, batch)
    assert norm.calls == calls and torch.equal(loss, ref_loss)


def test_a_swapped_gate_and_up_would_be_caught() -> None:
    model = tiny_model("llama", num_layers=2, seed=2)
    batch = tiny_batch(model)
    ref_loss, _ = _loss_and_grads(model, batch)
    LayerKernelsPatch(model, functions=(hf_rms_norm, lambda gate, up: F.silu(up) * gate))
    loss, _ = _loss_and_grads(model, batch)
    assert not torch.equal(loss, ref_loss)


def test_qwen3_head_norms_are_patched() -> None:
    model = tiny_model("qwen3", num_layers=2, seed=3)
    patch = LayerKernelsPatch(model, functions=(hf_rms_norm, hf_silu_mul))
    # per layer: input, post-attention, q_norm, k_norm; plus the final norm
    assert len(patch.norms) == 4 * 2 + 1 and len(patch.mlps) == 2


def test_an_instance_patched_by_someone_else_is_left_alone() -> None:
    model = tiny_model("llama", num_layers=2)
    final_norm = model.model.norm
    mine = final_norm.forward
    final_norm.forward = mine  # an instance attribute now
    patch = LayerKernelsPatch(model, functions=(hf_rms_norm, hf_silu_mul))
    assert final_norm not in patch.norms and final_norm.__dict__["forward"] is mine
    patch.remove()
    assert final_norm.__dict__["forward"] is mine


def test_unavailable_reasons_name_the_problem() -> None:
    gemma = tiny_model("gemma", num_layers=1)
    assert "model type 'gemma'" in why_unavailable(gemma)
    with pytest.raises(LayerKernelsUnavailable, match="model type 'gemma'"):
        LayerKernelsPatch(gemma)
    llama = tiny_model("llama", num_layers=1)
    if not torch.cuda.is_available():
        reason = why_unavailable(llama)
        assert ("Liger-Kernel" in reason) if not has_liger else ("CUDA" in reason)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU defaults")
def test_auto_stays_off_where_the_kernels_cannot_run_and_true_refuses() -> None:
    model = tiny_model("llama", num_layers=2)
    savings = apply_memory_savings(model, fused_loss=False, offload_checkpoints=False)
    assert savings.layers is None and savings.stats()["layer_kernels"] is False
    savings.remove()
    with pytest.raises(LayerKernelsUnavailable):
        apply_memory_savings(model, fused_loss=False, offload_checkpoints=False, layer_kernels=True)
    assert getattr(model, "_badam_memory_savings", None) is None  # nothing left behind
    with pytest.raises(ValueError, match="layer_kernels must be"):
        apply_memory_savings(model, fused_loss=False, offload_checkpoints=False, layer_kernels="yes")


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and has_liger), reason="needs CUDA and Liger-Kernel")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_liger_layers_match_hugging_face_on_cuda(family: str) -> None:
    model = tiny_model(family, dtype=torch.bfloat16, num_layers=3, vocab_size=1000, hidden_size=256,
                       intermediate_size=704, max_position_embeddings=512).cuda()
    enable_checkpointing(model, reentrant=False)
    batch = {k: v.cuda() for k, v in tiny_batch(model, batch=2, seq=300).items()}
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    patch = LayerKernelsPatch(model)
    loss, grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss.float(), ref_loss.float(), rtol=2e-3, atol=2e-3)
    for g, r in zip(grads, ref_grads):
        if r.float().norm() > 0:
            assert (g.float() - r.float()).norm() / r.float().norm() < 3e-2
    patch.remove()


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and has_liger), reason="needs CUDA and Liger-Kernel")
def test_liger_layers_hold_less_memory_in_backward() -> None:
    model = tiny_model("llama", dtype=torch.bfloat16, num_layers=2, vocab_size=1000, hidden_size=1024,
                       intermediate_size=4096, num_attention_heads=8, num_key_value_heads=8,
                       max_position_embeddings=4096).cuda()
    enable_checkpointing(model, reentrant=False)
    batch = {k: v.cuda() for k, v in tiny_batch(model, batch=1, seq=4096).items()}

    def peak() -> int:
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(**batch).loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    hf = peak()
    patch = LayerKernelsPatch(model)
    lean = peak()
    patch.remove()
    assert lean < 0.85 * hf, f"layer kernels peak {lean / 2**20:.0f} MiB vs Hugging Face's {hf / 2**20:.0f} MiB"
