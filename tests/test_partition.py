"""Block partitions: inference per model family, explicit builders, validation, requires_grad."""
from __future__ import annotations

import io
import logging
import random

import pytest
import torch
from torch import nn

from _tiny_models import FAMILIES, LAYER_PREFIX, tiny_model
from badam_ext.introspection import find_layer_container, layer_index_map, lowest_trainable_layer
from badam_ext.partition import (
    Block,
    BlockPartition,
    apply_requires_grad,
    infer_partition,
    partition_from_blocks,
    partition_from_prefixes,
)

NUM_LAYERS = 4


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {f: tiny_model(f, num_layers=NUM_LAYERS) for f in FAMILIES}


@pytest.fixture
def llama() -> nn.Module:
    return tiny_model("llama", num_layers=NUM_LAYERS)


def _covers_all_once(part: BlockPartition) -> None:
    names = [n for b in part.blocks for n in b.param_names] + list(part.active_modules) + list(part.frozen)
    assert sorted(names) == sorted(part.params), "every parameter exactly once in blocks/active/frozen"


@pytest.mark.parametrize("family", FAMILIES)
def test_infer_one_block_per_layer(models: dict[str, nn.Module], family: str) -> None:
    model = models[family]
    prefix = LAYER_PREFIX[family]
    part = infer_partition(model)
    assert [b.name for b in part.blocks] == [f"{prefix}.{i}" for i in range(NUM_LAYERS)]
    for i, block in enumerate(part.blocks):
        expected = [n for n, _ in model.named_parameters() if n.startswith(f"{prefix}.{i}.")]
        assert list(block.param_names) == expected and expected
    _covers_all_once(part)
    # The embedding is frozen by default, and names alone (no module) give the same layer blocks.
    emb = [n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight]
    assert emb and emb[0] in part.frozen
    by_names = infer_partition(list(model.named_parameters()))
    assert [b.param_names for b in by_names.blocks] == [b.param_names for b in part.blocks]


@pytest.mark.parametrize("family", FAMILIES)
def test_infer_embedding_block_first(models: dict[str, nn.Module], family: str) -> None:
    model = models[family]
    part = infer_partition(model, include_embedding=True)
    assert part.blocks[0].name == "embedding" and len(part) == NUM_LAYERS + 1
    emb_weight = model.get_input_embeddings().weight
    assert any(part.params[n] is emb_weight for n in part.blocks[0].param_names)
    assert not any(n.startswith(LAYER_PREFIX[family] + ".") for n in part.blocks[0].param_names)
    _covers_all_once(part)


def test_embedding_block_contents() -> None:
    gpt2 = infer_partition(tiny_model("gpt2"), include_embedding=True)
    assert gpt2.blocks[0].param_names == ("transformer.wte.weight", "transformer.wpe.weight")
    opt = infer_partition(tiny_model("opt"), include_embedding=True)
    assert opt.blocks[0].param_names == ("model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight")


def test_lm_head_block_last_untied(llama: nn.Module) -> None:
    part = infer_partition(llama, include_embedding=True, include_lm_head=True)
    assert [b.name for b in part.blocks] == ["embedding", *[f"model.layers.{i}" for i in range(4)], "lm_head"]
    assert part.blocks[-1].param_names == ("lm_head.weight",)
    assert part.frozen == ("model.norm.weight",)
    neox = infer_partition(tiny_model("gpt_neox"), include_lm_head=True)
    assert neox.blocks[-1].param_names == ("lm_head.weight",)


@pytest.mark.parametrize("family", ["gemma", "gpt2", "falcon", "bert"])
def test_lm_head_on_tied_model_raises(models: dict[str, nn.Module], family: str) -> None:
    model = models[family]
    with pytest.raises(ValueError, match="shares its weight"):
        infer_partition(model, include_lm_head=True)
    # Tied and untied heads give the same layer blocks.
    assert len(infer_partition(model, include_embedding=True)) == NUM_LAYERS + 1


def test_lm_head_tied_by_names_raises() -> None:
    named = list(tiny_model("llama", tie_word_embeddings=True).named_parameters())
    assert "lm_head.weight" not in dict(named)
    with pytest.raises(ValueError, match="no lm_head parameters"):
        infer_partition(named, include_lm_head=True)


def test_numeric_layer_order_and_exact_prefixes() -> None:
    model = tiny_model("llama", num_layers=12)
    part = infer_partition(model)
    assert [b.name for b in part.blocks] == [f"model.layers.{i}" for i in range(12)]
    assert all(n.startswith("model.layers.1.") for n in part.blocks[1].param_names)
    # Names only, shuffled: still numeric order, and layer 1 never takes layers 10 and 11.
    named = list(model.named_parameters())
    random.Random(0).shuffle(named)
    shuffled = infer_partition(named)
    assert [b.name for b in shuffled.blocks] == [f"model.layers.{i}" for i in range(12)]
    assert sorted(shuffled.blocks[1].param_names) == sorted(part.blocks[1].param_names)
    # An explicit prefix without a trailing dot matches layer 1 only (the reference matches substrings,
    # so "model.layers.1" would also take layers 10 and 11 there).
    explicit = partition_from_prefixes(model, ["model.layers.1", ["model.layers.10.", "model.layers.11"]])
    assert explicit.blocks[0].param_names == part.blocks[1].param_names
    assert explicit.blocks[1].param_names == part.blocks[10].param_names + part.blocks[11].param_names
    assert explicit.blocks[1].name == "model.layers.10+model.layers.11"
    assert any("model.layers.10." in n for n, _ in named) and "model.layers.1" in "model.layers.10.mlp"


def test_layer_blocks_match_reference_inference() -> None:
    """The reference BAdam's own name-based inference, as an oracle on a model with >= 10 layers."""
    badam = pytest.importorskip("badam")
    model = tiny_model("qwen2", num_layers=11)
    names = [n for n, _ in model.named_parameters()]
    prefixes = badam.BlockOptimizer.infer_param_groups(None, names, False, False)
    ref = [tuple(n for n in names if any(p in n for p in pre)) for pre in prefixes]
    assert [b.param_names for b in infer_partition(model).blocks] == ref


def test_stray_policies(llama: nn.Module, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="badam_ext.partition"):
        frozen = infer_partition(llama)
    assert frozen.stray == ("model.norm.weight",) and "model.norm.weight" in frozen.frozen
    assert "model.norm.weight" in caplog.text  # reported, not silent
    own = infer_partition(llama, include_lm_head=True, stray="own_block")
    assert [b.name for b in own.blocks][-2:] == ["other", "lm_head"]
    assert own.blocks[-2].param_names == ("model.norm.weight",)
    last = infer_partition(llama, include_lm_head=True, stray="last_block")
    assert last.blocks[-2].name == "model.layers.3" and last.blocks[-2].param_names[-1] == "model.norm.weight"
    assert last.blocks[-1].name == "lm_head"
    with pytest.raises(ValueError, match="model.norm.weight"):
        infer_partition(llama, stray="error")
    with pytest.raises(ValueError, match="stray must be one of"):
        infer_partition(llama, stray="drop")  # type: ignore[arg-type]


def test_bert_pooler_is_stray() -> None:
    from transformers import BertModel

    from _tiny_models import tiny_config

    with torch.random.fork_rng(devices=[]):
        model = BertModel(tiny_config("bert"))
    part = infer_partition(model, include_embedding=True, stray="own_block")
    assert part.blocks[-1].name == "other"
    assert all(n.startswith("pooler.") for n in part.blocks[-1].param_names)
    assert [b.name for b in part.blocks[1:-1]] == [f"encoder.layer.{i}" for i in range(4)]


def test_active_modules(llama: nn.Module) -> None:
    part = infer_partition(llama, active_modules=["model.embed_tokens"])
    assert part.active_modules == ("model.embed_tokens.weight",)
    assert "model.embed_tokens.weight" not in part.frozen
    # Inferred layer blocks give up what active_modules takes.
    carved = infer_partition(llama, active_modules=["model.layers.0.input_layernorm.weight"])
    assert "model.layers.0.input_layernorm.weight" not in carved.blocks[0].param_names
    assert carved.active_modules == ("model.layers.0.input_layernorm.weight",)
    _covers_all_once(carved)
    with pytest.raises(ValueError, match="model.nope"):
        infer_partition(llama, active_modules=["model.nope"])
    with pytest.raises(ValueError, match="both in a block and in active_modules"):
        partition_from_prefixes(llama, ["model.layers.0"], active_modules=["model.layers.0.mlp"])
    with pytest.raises(ValueError, match="both in block_prefixes and active_modules"):
        infer_partition(llama, block_prefixes=["model.layers.0"], active_modules=["model.layers.0.mlp"])
    with pytest.raises(ValueError, match="both in a block and in active_modules"):
        BlockPartition([Block("b", ("lm_head.weight",))], dict(llama.named_parameters()),
                       active_modules=["lm_head.weight"])


def test_explicit_builders(llama: nn.Module) -> None:
    params = dict(llama.named_parameters())
    by_prefix = partition_from_prefixes(llama, [["model.layers.0.", "model.layers.1."], "model.layers.3"])
    assert len(by_prefix) == 2
    assert set(by_prefix.blocks[0].param_names) == {n for n in params if n.startswith(("model.layers.0.", "model.layers.1."))}
    assert all(n in by_prefix.frozen for n in params if n.startswith("model.layers.2."))
    names = [["lm_head.weight"], ["model.norm.weight", "model.embed_tokens.weight"]]
    by_names = partition_from_blocks(list(llama.named_parameters()), names, names=["head", "ends"])
    assert [b.name for b in by_names.blocks] == ["head", "ends"]
    assert by_names.blocks[1].param_names == ("model.norm.weight", "model.embed_tokens.weight")
    assert len(by_names.frozen) == len(params) - 3
    own = partition_from_blocks(llama, [["lm_head.weight"]], stray="own_block")
    assert own.blocks[-1].name == "other" and len(own.blocks[-1].param_names) == len(params) - 1
    via_infer = infer_partition(llama, block_prefixes=["model.layers.2", "model.layers.0"], include_lm_head=True)
    assert [b.name for b in via_infer.blocks] == ["model.layers.2", "model.layers.0", "lm_head"]


def test_validation_errors(llama: nn.Module) -> None:
    named = list(llama.named_parameters())
    with pytest.raises(ValueError, match="'model.layers.0.mlp.up_proj.weight' is in two blocks"):
        partition_from_blocks(named, [["model.layers.0.mlp.up_proj.weight"], ["model.layers.0.mlp.up_proj.weight"]])
    with pytest.raises(ValueError, match="matches block_prefixes\\[0\\] and block_prefixes\\[1\\]"):
        partition_from_prefixes(named, ["model.layers.0", "model.layers.0.mlp"])
    with pytest.raises(ValueError, match="block 1 .*is empty"):
        partition_from_blocks(named, [["lm_head.weight"], []])
    with pytest.raises(ValueError, match="block_prefixes\\[0\\] is empty"):
        partition_from_prefixes(named, [[]])
    with pytest.raises(ValueError, match="'model.layer.0'"):
        partition_from_prefixes(named, ["model.layers.1", "model.layer.0"])
    with pytest.raises(ValueError, match="unknown parameters: \\['lm_head.bias'\\]"):
        partition_from_blocks(named, [["lm_head.bias"]])
    with pytest.raises(ValueError, match="no blocks"):
        partition_from_blocks(named, [])
    with pytest.raises(ValueError, match="two blocks are named 'x'"):
        partition_from_blocks(named, [["lm_head.weight"], ["model.norm.weight"]], names=["x", "x"])
    with pytest.raises(ValueError, match="no repeated layer stack"):
        infer_partition([("encoder.w", torch.zeros(2, requires_grad=True))])
    with pytest.raises(ValueError, match="no parameters"):
        infer_partition([])
    with pytest.raises(ValueError, match="appears twice"):
        partition_from_blocks(named + named[:1], [["lm_head.weight"]])
    w = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="same tensor"):
        partition_from_blocks([("a.w", w), ("b.w", w)], [["a.w"]])
    with pytest.raises(TypeError, match="not a tensor"):
        partition_from_blocks([("a.w", 3.0)], [["a.w"]])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="not a leaf"):
        partition_from_blocks([("a.w", w * 2)], [["a.w"]])
    with pytest.raises(TypeError, match="is a string"):
        partition_from_blocks(named, ["lm_head.weight"])
    with pytest.raises(TypeError, match="nn.Module or an iterable"):
        infer_partition({"a": w})  # type: ignore[arg-type]


def test_frozen_by_design_parameters_are_still_assigned(llama: nn.Module) -> None:
    for p in llama.parameters():
        p.requires_grad_(False)
    part = infer_partition(llama, include_embedding=True, include_lm_head=True)
    assert len(part) == 6 and part.frozen == ("model.norm.weight",)


def test_apply_requires_grad(llama: nn.Module) -> None:
    part = infer_partition(llama, include_embedding=True, active_modules=["model.norm"])
    for p in llama.parameters():
        p.grad = torch.full_like(p, float("nan"))
    previous = {n for n, _ in llama.named_parameters()}  # a fresh model trains everything
    for i in range(len(part)):
        newly = apply_requires_grad(part, i)
        wanted = set(part.blocks[i].param_names) | {"model.norm.weight"}
        assert {n for n, p in llama.named_parameters() if p.requires_grad} == wanted
        assert {n for n, _ in newly} == wanted - previous
        assert all(p.grad is None for n, p in llama.named_parameters() if n not in wanted)
        previous = wanted
    keep = partition_from_blocks(llama, [["lm_head.weight"], ["model.norm.weight"]])
    llama.lm_head.weight.grad = torch.ones_like(llama.lm_head.weight)
    apply_requires_grad(keep, 1, clear_grads=False)
    assert llama.lm_head.weight.grad is not None and not llama.lm_head.weight.requires_grad
    with pytest.raises(IndexError, match="out of range"):
        apply_requires_grad(part, len(part))


def test_queries_and_describe(llama: nn.Module) -> None:
    part = infer_partition(llama, active_modules=["model.embed_tokens"])
    rows = part.describe()
    assert [r["role"] for r in rows] == ["block"] * 4 + ["active", "frozen"]
    assert sum(r["numel"] for r in rows) == sum(p.numel() for p in llama.parameters())
    assert part.numels() == [sum(p.numel() for p in llama.model.layers[i].parameters()) for i in range(4)]
    assert rows[0]["params"] == len(list(llama.model.layers[0].parameters()))
    assert part.block_of("model.layers.2.mlp.up_proj.weight") == 2 and part.block_of("lm_head.weight") is None
    assert [n for n, _ in part.trainable_params(1)][-1] == "model.embed_tokens.weight"
    with pytest.raises(KeyError, match="nope"):
        part.block_of("nope")
    with pytest.raises(TypeError):
        part.block_params("0")  # type: ignore[arg-type]


def test_fingerprint() -> None:
    a = infer_partition(tiny_model("llama", seed=0)).fingerprint()
    assert a == infer_partition(tiny_model("llama", seed=1)).fingerprint()  # weights do not matter
    assert a != infer_partition(tiny_model("llama", dtype=torch.bfloat16)).fingerprint()
    assert a != infer_partition(tiny_model("llama", num_layers=5)).fingerprint()
    assert a != infer_partition(tiny_model("llama"), include_embedding=True).fingerprint()
    assert a != infer_partition(tiny_model("llama", intermediate_size=48)).fingerprint()
    assert a != infer_partition(tiny_model("llama"), active_modules=["model.norm"]).fingerprint()
    assert len(a) == 64 and int(a, 16) >= 0


class _Moe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(4, 3)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4)) for _ in range(3))


class _ToyMoeModel(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.stack = nn.ModuleList(_Moe() for _ in range(n))
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(4, 2)) for _ in range(2))
        self.out = nn.Linear(4, 10)


def test_find_layer_container_prefers_outermost_largest() -> None:
    model = _ToyMoeModel(3)
    found = find_layer_container(model)
    assert found is not None and found.prefix == "stack" and len(found.layers) == 3
    part = infer_partition(model, stray="own_block")
    assert [b.name for b in part.blocks] == ["stack.0", "stack.1", "stack.2", "other"]
    layer_of = layer_index_map(model)
    assert lowest_trainable_layer(list(model.stack[2].parameters()) + list(model.stack[1].parameters()), layer_of) == 1
    assert lowest_trainable_layer(model.out.parameters(), layer_of) is None
    assert find_layer_container(nn.Linear(2, 2)) is None


def test_name_regex_takes_outermost_container() -> None:
    named = [(f"enc.blocks.{i}.mlp.experts.{j}.w", torch.zeros(2, requires_grad=True)) for i in range(3) for j in range(2)]
    part = infer_partition(named)
    assert [b.name for b in part.blocks] == ["enc.blocks.0", "enc.blocks.1", "enc.blocks.2"]


def test_block_is_hashable_and_frozen() -> None:
    b = Block("x", ["a", "b"])  # type: ignore[arg-type]
    assert b.param_names == ("a", "b") and hash(b) == hash(Block("x", ("a", "b")))
    with pytest.raises(Exception):
        b.name = "y"  # type: ignore[misc]
    with pytest.raises(ValueError):
        Block("", ())
    buf = io.StringIO()
    print(b, file=buf)
    assert "x" in buf.getvalue()
