"""A byte-level tokenizer built in code (no downloads), with special tokens and a chat template.

Every UTF-8 byte is one token (tokenizers' byte-level alphabet, no merges), after ``<pad>``, ``<s>``
and ``</s>``: 259 ids. ``save_tiny_checkpoint`` writes it with a tiny Llama of the same vocabulary,
loadable with ``from_pretrained``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

SPECIALS = ("<pad>", "<s>", "</s>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def byte_tokenizer(chat_template: bool = True, add_bos: bool = True) -> transformers.PreTrainedTokenizerFast:
    """Byte-level tokenizer; ``add_bos`` makes it prepend ``<s>`` like Llama's tokenizers."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *alphabet])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    if add_bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                               eos_token="</s>")
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_checkpoint(folder: Path, num_layers: int = 3, chat_template: bool = True, seed: int = 0) -> Path:
    """A tiny Llama (vocab = the byte tokenizer's) and its tokenizer saved to ``folder``."""
    tok = byte_tokenizer(chat_template=chat_template)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
