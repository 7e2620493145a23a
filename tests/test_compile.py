"""torch.compile under BAdam: regional compilation keeps the graphs few across block switches, and
block names (so checkpoints) do not depend on compilation."""
from __future__ import annotations

import functools
import warnings

import pytest
import torch
from _tiny_models import enable_checkpointing, tiny_batch, tiny_model

from badam_ext import BlockAdam, compile_layers
from badam_ext.compilation import TracedCheckpoint
from badam_ext.introspection import strip_compile_prefix

pytest.importorskip("transformers")


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _train(num_layers: int, compiled: bool, checkpointing: str | None, steps: int) -> tuple[list[float], list[int]]:
    """Losses and the running graph count of ``steps`` BlockAdam steps, one block per step."""
    torch._dynamo.reset()
    model = tiny_model("llama", num_layers=num_layers, use_cache=False)
    if checkpointing is not None:
        enable_checkpointing(model, reentrant=checkpointing == "reentrant")
    if compiled:
        # aot_eager: dynamo's guards and AOTAutograd's graphs as with inductor, without C++ code generation
        assert compile_layers(model, backend="aot_eager") == num_layers
    opt = BlockAdam(model, lr=1e-3, switch_every=1, switch_mode="ascending", backend="torch")
    batch = tiny_batch(model)
    losses, graphs = [], []
    before = _graphs()  # the counter is per process
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        graphs.append(_graphs() - before)
    return losses, graphs


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non-reentrant"])
def test_regional_compilation_graphs_stay_bounded_across_block_switches(checkpointing):
    layers = 8  # a whole-model compile would need one graph per block: 8, torch's default recompile limit
    compiled_losses, graphs = _train(layers, True, checkpointing, steps=2 * layers)  # two block epochs
    after_first_epoch = graphs[layers - 1]
    # A layer's graph depends on its role (below / active / above the active block, and with reentrant
    # checkpointing the grad mode of the recompute), not on which block is active: a few graphs in all
    # (3 to 5 seen on torch 2.13 with transformers 5.6 and 5.23), none added by the second block epoch.
    assert after_first_epoch <= 6 < layers
    assert graphs[-1] == after_first_epoch
    eager_losses, _ = _train(layers, False, checkpointing, steps=2 * layers)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)


def _checkpoint_outside_forward(model: torch.nn.Module) -> None:
    """Give the layers transformers 5.17's call structure where the installed version (>= 5.23)
    checkpoints inside ``forward``: ``__call__`` runs the checkpoint around ``nn.Module.__call__``,
    so around what ``layer.compile()`` compiles (the GPU failure of issue 12 had this structure)."""
    cls = type(model.model.layers[0])
    if cls.__call__ is not torch.nn.Module.__call__:
        return  # transformers < 5.23: already so

    class Legacy(cls):
        def __call__(self, *args, **kwargs):
            if self.gradient_checkpointing and self.training:
                return self._gradient_checkpointing_func(functools.partial(super().__call__, **kwargs), *args)
            return super().__call__(*args, **kwargs)

    Legacy.forward = cls.forward.__wrapped__  # the plain forward: 5.23 wraps every subclass's forward
    for layer in model.model.layers:
        layer.__class__ = Legacy  # one class for all layers: they share their graphs, as before


def _train_backward_elsewhere(compiled: bool, steps: int, traced: bool = True) -> tuple[list[float], int]:
    """Losses, and the graphs dynamo built during backward, of non-reentrant checkpointing with the
    checkpoint outside the compiled layers. Backward runs with another intra-op thread count, as on
    CUDA, whose backward runs on the autograd device thread: dynamo guards on that count, so a
    recompute that goes through dynamo's cache needs graphs of its own."""
    torch._dynamo.reset()
    model = tiny_model("llama", num_layers=3, use_cache=False)
    _checkpoint_outside_forward(model)
    enable_checkpointing(model, reentrant=False)
    if compiled:
        compile_layers(model, backend="aot_eager", traced_checkpoint=traced)
    enable_checkpointing(model, reentrant=False)  # again after compile_layers, as bench_e2e does
    opt = BlockAdam(model, lr=1e-3, switch_every=2, switch_mode="ascending", backend="torch")
    batch = tiny_batch(model)
    threads = torch.get_num_threads()
    losses, in_backward = [], 0
    try:
        for _ in range(steps):
            torch.set_num_threads(threads)
            loss = model(**batch).loss
            torch.set_num_threads(1 if threads > 1 else 2)
            before = _graphs()
            loss.backward()
            in_backward += _graphs() - before
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    if compiled and traced:
        assert all(isinstance(layer._gradient_checkpointing_func, TracedCheckpoint) for layer in model.model.layers)
    return losses, in_backward


def test_non_reentrant_checkpoint_around_a_compiled_layer_recomputes_in_the_compiled_backward():
    # Issue 12 (H200, transformers 5.17): a checkpoint around the compiled layer recomputes by calling
    # it again in backward, through dynamo's cache, where another graph than the forward's can run.
    # Here the recompute's thread count misses every forward graph and the recompile there exceeds
    # the recompile limit (3 here for a tiny model, 8 by default for roles x threads x ...), so the
    # recompute runs eagerly and saves other tensors: CheckpointError without the fix. compile_layers
    # traces the checkpoint with the layer, so the recompute is in the compiled backward.
    steps = 6  # three blocks, two switches
    with torch._dynamo.config.patch(recompile_limit=3):
        losses, in_backward = _train_backward_elsewhere(True, steps)
    assert in_backward == 0
    eager, _ = _train_backward_elsewhere(False, steps)
    assert losses == pytest.approx(eager, rel=1e-5)


def test_names_do_not_carry_the_compile_wrapper():
    model = tiny_model("llama", num_layers=2)
    with pytest.warns(UserWarning, match="compile_layers"):
        opt = BlockAdam(torch.compile(model), backend="torch", switch_every=1)
    assert [b.name for b in opt.partition.blocks] == ["model.layers.0", "model.layers.1"]
    assert not any("_orig_mod" in n for n in opt.partition.params)
    assert opt.pruner is not None and opt.pruner.container.prefix == "model.layers"
    assert strip_compile_prefix("model.layers.0._orig_mod.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"


def test_state_saved_from_a_compiled_model_loads_into_an_uncompiled_one():
    model = tiny_model("llama", num_layers=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the whole-model compile advice
        opt = BlockAdam(torch.compile(model), lr=1e-2, backend="torch", switch_every=2, switch_mode="random", seed=3)
    batch = tiny_batch(model)
    for _ in range(3):  # into the second block, mid-way
        model(**batch).loss.backward()  # eager forward: the wrapper shares the parameters
        opt.step()
    state = opt.state_dict()
    assert not any("_orig_mod" in n for n in state["active_param_names"])

    plain = tiny_model("llama", num_layers=3)
    plain.load_state_dict(model.state_dict())
    resumed = BlockAdam(plain, lr=1e-2, backend="torch", switch_every=2, switch_mode="random", seed=3)
    resumed.load_state_dict(state)  # same fingerprint: the names match
    assert resumed.active_block == opt.active_block
    for m, o in ((model, opt), (plain, resumed)):
        m(**batch).loss.backward()
        o.step()
    for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q), n


def test_compile_layers_refuses_what_it_cannot_compile_per_layer():
    model = tiny_model("llama", num_layers=2)
    with pytest.raises(ValueError, match="uncompiled model"):
        compile_layers(torch.compile(model))
    with pytest.raises(ValueError, match="no repeated layer stack"):
        compile_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.warns(UserWarning, match="use_cache"):
        compile_layers(tiny_model("llama", num_layers=2, use_cache=True), backend="eager")


def test_memory_savings_leave_checkpoint_offload_to_eager_layers():
    """Checkpoint offload wraps each layer's checkpoint eagerly; compiled layers own theirs (an eager
    checkpoint around a compiled layer failed after a block switch on the H200): "auto" stays off,
    True and the other order are refused with a message."""
    from badam_ext import apply_memory_savings

    model = tiny_model("llama", num_layers=2, use_cache=False)
    enable_checkpointing(model, reentrant=False)
    compile_layers(model, backend="aot_eager")
    with pytest.raises(ValueError, match="offload_checkpoints=False"):
        apply_memory_savings(model, offload_checkpoints=True)
    savings = apply_memory_savings(model, offload_checkpoints="auto", layer_kernels=False)
    assert savings.offloader is None
    opt = BlockAdam(model, lr=1e-3, switch_every=1, backend="torch")
    batch = tiny_batch(model)
    for _ in range(3):  # across block switches
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    savings.remove()

    eager = tiny_model("llama", num_layers=2, use_cache=False)
    enable_checkpointing(eager, reentrant=False)
    apply_memory_savings(eager, offload_checkpoints=True)
    with pytest.raises(ValueError, match="call compile_layers first"):
        compile_layers(eager, backend="aot_eager")
