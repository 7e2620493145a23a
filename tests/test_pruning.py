"""Backward pruning: which layers run backward, and the trainable gradients stay exact.

Each layer's parameterised submodules get a probe on their output: an identity autograd function
whose backward records the layer index. A probe's backward runs exactly when autograd executes that
part of the layer (in the recomputation, under reentrant checkpointing), so the recorded set is the
set of layers backward went through.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from _probes import add_probes
from _tiny_models import enable_checkpointing, tiny_batch, tiny_model
from badam_ext import BlockAdam
from badam_ext.introspection import find_layer_container
from badam_ext.partition import BlockPartition, apply_requires_grad, infer_partition
from badam_ext.pruning import (
    BackwardPruner,
    CheckpointingInfo,
    checkpointing_info,
    remove_input_require_grads,
)

LAYERS = 4


def setup(family: str = "llama", ckpt: bool | None = None, **part_kwargs: Any) -> tuple[nn.Module, BlockPartition]:
    """A tiny model (same weights every call), its partition, checkpointing off / non-reentrant / reentrant."""
    model = tiny_model(family, num_layers=LAYERS)
    if ckpt is not None:
        enable_checkpointing(model, reentrant=ckpt)
    return model, infer_partition(model, **part_kwargs)


def backward(model: nn.Module, part: BlockPartition, active: int, *, prune: bool,
             pruner: BackwardPruner | None = None) -> tuple[set[int], dict[str, torch.Tensor]]:
    """One forward/backward with block ``active`` trainable; the layers backward ran and the grads."""
    apply_requires_grad(part, active)
    if prune:
        if pruner is None:
            pruner = BackwardPruner(model, part)
        pruner.on_switch(active)
    record = add_probes(model)
    for p in model.parameters():
        p.grad = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reentrant checkpoint warns when no input requires grad
        model(**tiny_batch(model)).loss.backward()
    grads = {n: p.grad for n, p in part.trainable_params(active)}
    return record, grads


def assert_grads_equal(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert got.keys() == ref.keys()
    for name in ref:
        assert ref[name] is not None and got[name] is not None, f"{name}: no gradient"
        assert ref[name].abs().sum() > 0, f"{name}: zero reference gradient"
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def reference() -> dict[int, dict[str, torch.Tensor]]:
    """Gradients without checkpointing and without pruner, per active layer block."""
    out = {}
    for active in range(LAYERS):
        model, part = setup()
        out[active] = backward(model, part, active, prune=False)[1]
    return out


def test_no_checkpointing_autograd_already_prunes(reference: dict) -> None:
    model, part = setup()
    ran, grads = backward(model, part, 2, prune=False)
    assert ran == {2, 3}
    model, part = setup()
    ran, grads = backward(model, part, 2, prune=True)
    assert ran == {2, 3}
    assert_grads_equal(grads, reference[2])


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_hf_checkpointing_runs_all_layers_without_pruner(reentrant: bool, reference: dict) -> None:
    model, part = setup(ckpt=reentrant)
    assert checkpointing_info(model) == CheckpointingInfo(True, reentrant, checkpointing_info(model).checkpointed_modules)
    ran, grads = backward(model, part, 2, prune=False)
    assert ran == set(range(LAYERS)), "HF's input-grad hook drags backward through every layer"
    assert_grads_equal(grads, reference[2])


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("active", range(LAYERS))
def test_pruner_stops_at_active_layer(reentrant: bool, active: int, reference: dict) -> None:
    model, part = setup(ckpt=reentrant)
    pruner = BackwardPruner(model, part)
    ran, grads = backward(model, part, active, prune=True, pruner=pruner)
    assert ran == set(range(active, LAYERS))
    assert_grads_equal(grads, reference[active])
    info = pruner.describe()
    assert info["removed_input_require_grads_hook"] and info["lowest_trainable_layer"] == active
    assert info["input_grad_layer"] == (active if reentrant else None)


def test_reentrant_needs_the_input_grad_of_the_active_layer() -> None:
    """Only removing HF's hook under reentrant checkpointing silently loses the active block's grads."""
    model, part = setup(ckpt=True)
    assert remove_input_require_grads(model)
    apply_requires_grad(part, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = model(**tiny_batch(model)).loss
    assert not loss.requires_grad, "layer 2 dropped out of the graph: no gradient can reach it"
    model, part = setup(ckpt=True)
    pruner = BackwardPruner(model, part, active_index=2)
    assert backward(model, part, 2, prune=True, pruner=pruner)[0] == {2, 3}


def test_switching_moves_the_wrapper(reference: dict) -> None:
    model, part = setup(ckpt=True)
    layers = find_layer_container(model).layers
    original = [layer._gradient_checkpointing_func for layer in layers]
    pruner = BackwardPruner(model, part, active_index=1)
    assert layers[1]._gradient_checkpointing_func is not original[1]
    for active in (3, 0, 2):
        ran, grads = backward(model, part, active, prune=True, pruner=pruner)
        assert ran == set(range(active, LAYERS))
        assert_grads_equal(grads, reference[active])
        wrapped = [i for i, layer in enumerate(layers) if layer._gradient_checkpointing_func is not original[i]]
        assert wrapped == [active]
    pruner.remove()
    assert all(layer._gradient_checkpointing_func is original[i] for i, layer in enumerate(layers))


def test_rechecks_after_checkpointing_is_enabled_again() -> None:
    model, part = setup(ckpt=False)
    pruner = BackwardPruner(model, part, active_index=2)
    enable_checkpointing(model, reentrant=True)  # re-adds HF's hook, replaces the functions
    assert backward(model, part, 2, prune=False)[0] == set(range(LAYERS))
    ran, grads = backward(model, part, 2, prune=True, pruner=pruner)
    assert ran == {2, 3} and pruner.checkpointing.reentrant is True
    assert all(g is not None for g in grads.values())


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_embedding_and_lm_head_blocks(reentrant: bool) -> None:
    kwargs = dict(include_embedding=True, include_lm_head=True)
    ref_model, ref_part = setup(**kwargs)
    last = len(ref_part) - 1
    ref_emb = backward(ref_model, ref_part, 0, prune=False)[1]
    ref_model, ref_part = setup(**kwargs)
    ref_head = backward(ref_model, ref_part, last, prune=False)[1]

    model, part = setup(ckpt=reentrant, **kwargs)
    pruner = BackwardPruner(model, part)
    ran, grads = backward(model, part, 0, prune=True, pruner=pruner)
    assert ran == set(range(LAYERS)) and pruner.lowest_layer is None
    assert_grads_equal(grads, ref_emb)
    ran, grads = backward(model, part, last, prune=True, pruner=pruner)
    assert ran == set() and pruner.input_grad_layer is None
    assert_grads_equal(grads, ref_head)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_always_active_embedding_keeps_full_backward(reentrant: bool) -> None:
    """A trainable module below the active layer: the pruner must not cut its gradient path."""
    ref_model, ref_part = setup(active_modules=["model.embed_tokens"])
    ref = backward(ref_model, ref_part, 2, prune=False)[1]
    model, part = setup(ckpt=reentrant, active_modules=["model.embed_tokens"])
    ran, grads = backward(model, part, 2, prune=True)
    assert ran == set(range(LAYERS))
    assert "model.embed_tokens.weight" in grads
    assert_grads_equal(grads, ref)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "opt", "falcon", "bloom", "bert", "gemma3"])
def test_families_reentrant(family: str) -> None:
    ref_model, ref_part = setup(family)
    ref = backward(ref_model, ref_part, 1, prune=False)[1]
    model, part = setup(family, ckpt=True)
    assert backward(model, part, 1, prune=False)[0] == set(range(LAYERS))
    model, part = setup(family, ckpt=True)
    ran, grads = backward(model, part, 1, prune=True)
    assert ran == set(range(1, LAYERS))
    assert_grads_equal(grads, ref)


def test_remove_input_require_grads_and_checkpointing_info() -> None:
    model = tiny_model("llama", num_layers=2)
    assert not remove_input_require_grads(model)
    assert checkpointing_info(model) == CheckpointingInfo(False, None, 0)
    enable_checkpointing(model, reentrant=False)
    emb = model.get_input_embeddings()
    assert emb(torch.tensor([[3, 4]])).requires_grad  # HF's hook at work (the weight is trainable too)
    model.requires_grad_(False)
    assert emb(torch.tensor([[3, 4]])).requires_grad
    assert remove_input_require_grads(model)
    assert not emb(torch.tensor([[3, 4]])).requires_grad
    assert not remove_input_require_grads(model)
    assert not hasattr(model, "_require_grads_hook")
    # A partial without use_reentrant means torch's default (reentrant); an opaque function: unknown.
    for layer in find_layer_container(model).layers:
        layer._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint)
    assert checkpointing_info(model).reentrant is True
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False):
            m._gradient_checkpointing_func = lambda fn, *a, **k: fn(*a, **k)
    assert checkpointing_info(model) == CheckpointingInfo(True, None, checkpointing_info(model).checkpointed_modules)


def test_hooks_of_a_repeated_gradient_checkpointing_enable_are_removed() -> None:
    """``gradient_checkpointing_enable()`` twice leaves a hook that Hugging Face no longer tracks (and
    ``disable_input_require_grads()`` keeps): BlockAdam removes it too, so backward stops at the active
    block (the 8B bench's compiled variant enabled checkpointing twice and ran every layer's backward)."""
    model = tiny_model("llama", num_layers=3)
    for _ in range(2):
        enable_checkpointing(model, reentrant=False)
    emb = model.get_input_embeddings()
    model.requires_grad_(False)
    model.disable_input_require_grads()
    assert emb(torch.tensor([[3, 4]])).requires_grad  # the first hook is still there
    opt = BlockAdam(model, lr=1e-3, switch_every=1, start_block=2, backend="torch")
    assert opt.pruner.removed_input_hook
    out = model(**tiny_batch(model), output_hidden_states=True)
    assert [h.requires_grad for h in out.hidden_states] == [False, False, False, True]
    assert not remove_input_require_grads(model)


def test_unknown_checkpoint_function_is_treated_as_reentrant(reference: dict) -> None:
    model, part = setup(ckpt=True)
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False):
            m._gradient_checkpointing_func = lambda fn, *a, **k: torch.utils.checkpoint.checkpoint(
                fn, *a, use_reentrant=True, **k)
    pruner = BackwardPruner(model, part)
    ran, grads = backward(model, part, 2, prune=True, pruner=pruner)
    assert pruner.checkpointing.reentrant is None and pruner.input_grad_layer == 2
    assert ran == {2, 3}
    assert_grads_equal(grads, reference[2])


def test_pruner_validation() -> None:
    model, part = setup()
    other, _ = setup()
    with pytest.raises(ValueError, match="not this model's parameters"):
        BackwardPruner(other, part)
    with pytest.raises(TypeError, match="nn.Module"):
        BackwardPruner(list(model.parameters()), part)  # type: ignore[arg-type]
    with pytest.raises(IndexError):
        BackwardPruner(model, part, active_index=LAYERS)


@pytest.mark.parametrize("reentrant", [False, True])
def test_refresh_reprunes_only_when_checkpointing_changes(reentrant: bool, monkeypatch) -> None:
    model, part = setup()
    apply_requires_grad(part, 2)
    pruner = BackwardPruner(model, part, active_index=2)
    calls = []
    original = pruner.on_switch
    monkeypatch.setattr(pruner, "on_switch", lambda i: (calls.append(i), original(i)))
    pruner.refresh()
    assert calls == []  # nothing changed
    enable_checkpointing(model, reentrant=reentrant)  # HF's gradient_checkpointing_enable (input-grad hook on)
    pruner.refresh()
    assert calls == [2]
    pruner.refresh()
    assert calls == [2]  # stable after re-pruning
    record = add_probes(model)
    model(**tiny_batch(model)).loss.backward()
    assert record == {2, 3}
