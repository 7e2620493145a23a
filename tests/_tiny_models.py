"""Tiny Hugging Face models built from configs with random weights (no downloads).

``tiny_model("llama")`` returns a 4-layer causal LM with hidden size 32 in fp32, in train mode and
deterministic: every dropout probability is 0 and the weights come from a fixed seed, drawn without
touching the global RNG. ``FAMILIES`` lists the families the installed transformers provides and
``LAYER_PREFIX`` each family's layer-stack name prefix.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import transformers

# family -> (config class name, model class name)
_CLASSES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "opt": ("OPTConfig", "OPTForCausalLM"),
    "falcon": ("FalconConfig", "FalconForCausalLM"),
    "bloom": ("BloomConfig", "BloomForCausalLM"),
    "bert": ("BertConfig", "BertForMaskedLM"),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM"),
}

# The repeated-layer container of each family's model class, as a parameter-name prefix.
LAYER_PREFIX: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3": "model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
    "falcon": "transformer.h",
    "bloom": "transformer.h",
    "bert": "bert.encoder.layer",
    "roberta": "roberta.encoder.layer",
}

VOCAB = 128
HIDDEN = 32
HEADS = 4


def _llama_like(num_layers: int) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.0,
    )


def _gemma_like(num_layers: int) -> dict[str, Any]:
    return dict(_llama_like(num_layers), head_dim=HIDDEN // HEADS)


def _gpt2(num_layers: int) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=num_layers, n_head=HEADS, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )


def _gpt_neox(num_layers: int) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=HEADS, max_position_embeddings=64, attention_dropout=0.0,
        hidden_dropout=0.0,
    )


def _opt(num_layers: int) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=64, num_hidden_layers=num_layers,
        num_attention_heads=HEADS, max_position_embeddings=64, word_embed_proj_dim=HIDDEN,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
    )


def _falcon(num_layers: int) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=num_layers,
        num_attention_heads=HEADS, hidden_dropout=0.0, attention_dropout=0.0,
    )


def _bloom(num_layers: int) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=num_layers, n_head=HEADS,
        hidden_dropout=0.0, attention_dropout=0.0,
    )


def _bert_like(num_layers: int) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=num_layers,
        num_attention_heads=HEADS, intermediate_size=64, max_position_embeddings=72,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


_CONFIGS: dict[str, Callable[[int], dict[str, Any]]] = {
    "llama": _llama_like,
    "mistral": _llama_like,
    "qwen2": _llama_like,
    "qwen3": _gemma_like,
    "gemma": _gemma_like,
    "gemma2": _gemma_like,
    "gemma3": _gemma_like,
    "phi3": _llama_like,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "opt": _opt,
    "falcon": _falcon,
    "bloom": _bloom,
    "bert": _bert_like,
    "roberta": _bert_like,
}


def _available(family: str) -> bool:
    cfg_name, model_name = _CLASSES[family]
    return hasattr(transformers, cfg_name) and hasattr(transformers, model_name)


#: Families whose config and model classes exist in the installed transformers.
FAMILIES: tuple[str, ...] = tuple(f for f in _CLASSES if _available(f))


def tiny_config(family: str, num_layers: int = 4, **overrides: Any) -> transformers.PretrainedConfig:
    """The config of a tiny ``family`` model; ``overrides`` are config fields (e.g. ``tie_word_embeddings``)."""
    if family not in _CLASSES:
        raise ValueError(f"unknown family {family!r}; known: {sorted(_CLASSES)}")
    if not _available(family):
        raise ValueError(f"family {family!r} needs {_CLASSES[family]}, absent in transformers {transformers.__version__}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    # Token ids inside the tiny vocabulary: several configs default to ids (e.g. 32000) past it.
    fields: dict[str, Any] = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    fields.update(_CONFIGS[family](num_layers))
    fields.update(overrides)
    return getattr(transformers, _CLASSES[family][0])(**fields)


def tiny_model(
    family: str,
    dtype: torch.dtype = torch.float32,
    num_layers: int = 4,
    *,
    seed: int = 0,
    **overrides: Any,
) -> torch.nn.Module:
    """A tiny ``family`` LM (causal, or masked for BERT/RoBERTa) with seeded random weights, in train mode."""
    config = tiny_config(family, num_layers, **overrides)
    model_cls = getattr(transformers, _CLASSES[family][1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(dtype).train()


def tiny_batch(model: torch.nn.Module, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ``input_ids`` (avoiding the special ids 0-2) and matching ``labels`` for ``model``."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    return {"input_ids": ids, "labels": ids.clone()}


def enable_checkpointing(model: torch.nn.Module, reentrant: bool) -> None:
    """Hugging Face gradient checkpointing, as a user would turn it on (input-grad hook included)."""
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
