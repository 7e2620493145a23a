"""The fused causal-LM loss: Hugging Face's loss semantics exactly, no full logits, frozen heads."""
from __future__ import annotations

import json
import subprocess
import zlib
import sys
import textwrap

import pytest
import torch
import transformers
from _tiny_models import tiny_model

from badam_ext import BlockAdam, apply_memory_savings
from badam_ext.memory import causal_lm_loss
from badam_ext.memory.causal_lm import FusedLossPatch
from badam_ext.memory.loss import liger_available, resolve_backend, torch_has_fused_loss

needs_fused = pytest.mark.skipif(not (torch_has_fused_loss() or liger_available()),
                                 reason="no fused cross-entropy in this environment")
pytestmark = needs_fused


def _batch(seed: int = 0, batch: int = 3, seq: int = 11, pad: bool = True) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    if pad:
        mask[1, -3:] = 0  # right padding
        ids[1, -3:] = 0
        labels[1, -3:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def hf_reference_loss(model: torch.nn.Module, **batch: torch.Tensor) -> torch.Tensor:
    """Hugging Face's own loss (the class's forward, full logits), whatever is patched on the instance."""
    return type(model).forward(model, **batch).loss


def _grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [g if g is not None else torch.zeros_like(t)
            for g, t in zip(torch.autograd.grad(loss, tensors, allow_unused=True), tensors)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("family,tied", [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True),
                                         ("gemma", True), ("phi3", False), ("mistral", False), ("qwen3", False)])
@pytest.mark.parametrize("items", [None, 37])
def test_loss_and_gradients_match_hugging_face(family: str, tied: bool, items) -> None:
    model = tiny_model(family, tie_word_embeddings=tied)
    batch = _batch(seed=zlib.crc32(f"{family}{tied}".encode()) % 1000)
    extra = {} if items is None else {"num_items_in_batch": torch.tensor(items)}
    params = list(model.parameters())
    ref = hf_reference_loss(model, **batch, **extra)
    ref_grads = _grads(ref, params)
    patch = FusedLossPatch(model)
    out = model(**batch, **extra)
    assert out.logits is None and patch.calls == 1
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    for p, g, r in zip(params, _grads(out.loss, params), ref_grads):
        assert _rel(g, r) < 1e-4 or r.norm() == 0, p.shape


def test_hidden_state_gradient_matches() -> None:
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 9, 16, generator=gen, requires_grad=True)
    weight = torch.randn(130, 16, generator=gen)  # a frozen head
    labels = torch.randint(0, 130, (2, 9), generator=gen)
    labels[1, :5] = -100
    loss = causal_lm_loss(hidden, weight, labels)
    (g,) = torch.autograd.grad(loss, hidden)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.double()
    logits = (h64 @ w64.T)[:, :-1].reshape(-1, 130)
    ref = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    (g64,) = torch.autograd.grad(ref, h64)
    assert abs(loss.item() - ref.item()) < 1e-5
    assert _rel(g.double(), g64) < 1e-5


def test_shift_labels_and_all_ignored() -> None:
    model = tiny_model("llama")
    batch = _batch(pad=False)
    shift = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[..., 1:].contiguous()
    ref = hf_reference_loss(model, input_ids=batch["input_ids"], labels=batch["labels"], shift_labels=shift)
    FusedLossPatch(model)
    out = model(input_ids=batch["input_ids"], labels=batch["labels"], shift_labels=shift)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    empty = torch.full_like(batch["labels"], -100)
    assert torch.isnan(model(input_ids=batch["input_ids"], labels=empty).loss)  # HF's mean over nothing


@pytest.mark.parametrize("items", [None, 29])
def test_bf16_loss_is_reduced_in_fp32_like_hugging_face(items) -> None:
    model = tiny_model("llama", dtype=torch.bfloat16)
    batch = _batch(seed=7, batch=4, seq=33, pad=False)
    extra = {} if items is None else {"num_items_in_batch": torch.tensor(items)}
    ref = hf_reference_loss(model, **batch, **extra)
    FusedLossPatch(model)
    out = model(**batch, **extra)
    assert out.loss.dtype == torch.float32 == ref.dtype
    # per-token losses are rounded to bf16 by the fused op; their fp32 mean stays within ~1e-3
    assert abs(out.loss.item() - ref.item()) <= 2e-3 * abs(ref.item())


def test_fallbacks_to_the_models_own_forward() -> None:
    model = tiny_model("llama")
    batch = _batch()
    patch = FusedLossPatch(model)
    # logits_to_keep as a tensor: the model's own forward, which refuses labels of another length too
    with pytest.raises(ValueError, match="batch_size"):
        model(**batch, logits_to_keep=torch.tensor([0, 1]))
    assert patch.calls == 0
    as_tuple = model(**batch, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.is_tensor(as_tuple[0]) and patch.calls == 1
    model.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().mean()
    assert model(**batch).logits is not None and patch.calls == 1  # the user's own loss is kept


def test_eval_mode_and_no_labels_keep_logits() -> None:
    model = tiny_model("llama")
    batch = _batch()
    patch = FusedLossPatch(model)
    assert model(input_ids=batch["input_ids"]).logits.shape == (3, 11, 128)
    model.eval()
    out = model(**batch)
    assert out.logits is not None and out.loss is not None
    assert patch.calls == 0
    model.train()
    patch.remove()
    assert "forward" not in model.__dict__
    assert model(**batch).logits is not None


def test_lm_head_gradient_only_when_its_block_is_active() -> None:
    model = tiny_model("llama", num_layers=2)
    apply_memory_savings(model, offload_checkpoints=False)
    opt = BlockAdam(model, lr=1e-3, switch_every=1, switch_mode="ascending", include_lm_head=True, backend="torch")
    head = model.lm_head.weight
    seen = []
    for _ in range(3):  # layer 0, layer 1, lm_head
        block = opt.partition.blocks[opt.active_block].name
        model(**_batch()).loss.backward()
        seen.append((block, head.grad is not None))
        opt.step()
        opt.zero_grad()
    assert seen == [("model.layers.0", False), ("model.layers.1", False), ("lm_head", True)]


def test_trainer_gradient_accumulation_matches_hf(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 16

        def __getitem__(self, i: int) -> dict:
            b = _batch(seed=i, batch=2, seq=10)  # row 0 has a prompt, row 1 padding
            return {k: v[i % 2] for k, v in b.items()}

    def run(fused: bool) -> list[float]:
        model = tiny_model("llama", num_layers=2)
        if fused:
            apply_memory_savings(model, offload_checkpoints=False)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(fused)), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=3, learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0,
            disable_tqdm=True, save_strategy="no")
        opt = BlockAdam(model, lr=1e-2, switch_every=2, switch_mode="ascending", backend="torch")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, None))
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h] + [
            float(torch.cat([p.detach().flatten() for p in model.parameters()]).double().sum())]

    fused, hf = run(True), run(False)
    assert len(fused) == 4
    for a, b in zip(fused, hf):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (fused, hf)


def test_unsupported_models_and_backends_are_refused() -> None:
    with pytest.raises(ValueError, match="model type 'gpt2'"):
        FusedLossPatch(tiny_model("gpt2"))
    moe = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1))
    with pytest.raises(ValueError, match="model type 'mixtral'"):  # its router aux loss would be dropped
        FusedLossPatch(moe)
    with pytest.raises(ValueError, match="unknown fused-loss backend"):
        resolve_backend("fast")
    if torch_has_fused_loss():
        with pytest.raises(ValueError, match="soft-capping"):
            resolve_backend("torch", softcap=30.0)
        with pytest.raises(ValueError, match="final_logit_softcapping"):
            FusedLossPatch(tiny_model("gemma2", final_logit_softcapping=30.0), backend="torch")
    if not liger_available():
        with pytest.raises(RuntimeError, match="badam-ext\\[liger\\]"):
            resolve_backend("liger")


_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    import transformers
    from badam_ext.memory.causal_lm import FusedLossPatch
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).train()
    for p in model.model.parameters():
        p.requires_grad_(False)          # BAdam with the head frozen too: only hidden-state gradients
    model.model.norm.weight.requires_grad_(True)
    if sys.argv[1] == "fused":
        FusedLossPatch(model)
    ids = torch.randint(0, 128256, (1, 4096))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = model(input_ids=ids, labels=ids).loss
    if sys.argv[1] == "fused":  # the HF run stops after forward: its logits alone decide the check
        loss.backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_mib": (after - before) / 1024}))
""")


def _rss_growth_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, mode], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["growth_mib"]


@pytest.mark.skipif(not torch_has_fused_loss(), reason="the CPU check uses torch's linear_cross_entropy")
def test_full_logits_are_never_materialized() -> None:
    # 4096 tokens x 128256 vocab: the fp32 logits alone are 2 GiB; Hugging Face's loss makes several.
    fused = _rss_growth_mib("fused")
    assert fused < 700, f"the fused loss grew the process by {fused:.0f} MiB"
    hf = _rss_growth_mib("hf")
    assert hf > 2048, f"the check cannot tell: Hugging Face's own loss grew only {hf:.0f} MiB"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", True)])
def test_fused_loss_matches_hugging_face_on_cuda(family: str, tied: bool) -> None:
    model = tiny_model(family, dtype=torch.bfloat16, tie_word_embeddings=tied, vocab_size=1000,
                       max_position_embeddings=512).cuda()
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 1000, (2, 300), generator=gen).cuda()
    labels = ids.clone()
    labels[0, :50] = -100
    params = list(model.parameters())
    ref = hf_reference_loss(model, input_ids=ids, labels=labels)
    ref_grads = _grads(ref, params)
    patch = FusedLossPatch(model)
    out = model(input_ids=ids, labels=labels)
    assert patch.calls == 1
    torch.testing.assert_close(out.loss.float(), ref.float(), rtol=2e-3, atol=2e-3)
    for g, r in zip(_grads(out.loss, params), ref_grads):
        if r.norm() > 0:
            assert _rel(g.float(), r.float()) < 2e-2
