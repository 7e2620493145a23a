"""Llama model shapes for the benchmarks, built from configs with random weights (no downloads).

* :func:`llama3_8b_config` — Llama-3-8B: 8.03B parameters, untied lm_head.
* :func:`llama32_1b_config` — Llama-3.2-1B: 1.24B parameters with ``tie_word_embeddings=True`` like
  the released model (lm_head shares the embedding; counted once). Counting an untied lm_head gives
  1.50B, the figure some earlier measurements quote.
* :func:`tiny_llama_config` — 2 layers, hidden 64: CPU smoke runs.

RoPE scaling of the released 3.x checkpoints is left out: it only changes the rotary frequencies,
not the cost, and the benchmarks stay within 8192 positions.

:func:`build_model` creates the weights directly in the target dtype on the target device, skips
Hugging Face's initialisation, then fills every parameter with one cheap seeded ``normal_`` (norm
weights with ones), so an 8B model appears in seconds.
"""
from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.utils.checkpoint
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

MODEL_NAMES = ("8b", "1b", "tiny")
_INIT_STD = 0.02


def _llama_config(rope_theta: float, **fields: Any) -> LlamaConfig:
    """A LlamaConfig with ``rope_theta`` spelled the way the installed transformers expects."""
    params = inspect.signature(LlamaConfig.__init__).parameters
    if "rope_parameters" in params:
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": float(rope_theta)}
    else:
        fields["rope_theta"] = float(rope_theta)
    fields.setdefault("attn_implementation", "sdpa")
    fields.setdefault("use_cache", False)
    config = LlamaConfig(**fields)
    got = rope_theta_of(config)
    if got != float(rope_theta):
        raise RuntimeError(f"LlamaConfig kept rope_theta={got}, asked for {rope_theta} "
                           f"(transformers {transformers.__version__})")
    return config


def rope_theta_of(config: LlamaConfig) -> float | None:
    """The RoPE base of ``config`` (transformers 5.x ``rope_parameters`` or the older attribute)."""
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    theta = getattr(config, "rope_theta", None)
    return None if theta is None else float(theta)


def llama3_8b_config() -> LlamaConfig:
    """Llama-3-8B shape: hidden 4096, 14336 MLP, 32 layers, 32/8 heads, vocab 128256, untied head."""
    return _llama_config(
        500000.0,
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    )


def llama32_1b_config() -> LlamaConfig:
    """Llama-3.2-1B shape: hidden 2048, 8192 MLP, 16 layers, 32/8 heads, vocab 128256, tied head."""
    return _llama_config(
        500000.0,
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
    )


def tiny_llama_config(num_layers: int = 2) -> LlamaConfig:
    """A 2-layer Llama with hidden 64 and vocab 256 for CPU smoke runs."""
    return _llama_config(
        10000.0,
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


CONFIGS: dict[str, Callable[[], LlamaConfig]] = {
    "8b": llama3_8b_config,
    "1b": llama32_1b_config,
    "tiny": tiny_llama_config,
}


def config_for(name: str) -> LlamaConfig:
    """The config of model ``name`` (one of :data:`MODEL_NAMES`)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
    return CONFIGS[name]()


@contextlib.contextmanager
def _skip_hf_init() -> Iterator[None]:
    """Hugging Face's no-init context (``transformers.initialization`` in 5.x, ``modeling_utils`` before)."""
    ctx = None
    for module_name in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            module = __import__(module_name, fromlist=["no_init_weights"])
        except ImportError:
            continue
        ctx = getattr(module, "no_init_weights", None)
        if ctx is not None:
            break
    if ctx is None:
        raise RuntimeError(f"transformers {transformers.__version__} has no no_init_weights context")
    with ctx():
        yield


@dataclass
class BuiltModel:
    """A model and how it was built."""

    model: LlamaForCausalLM
    name: str
    num_params: int
    build_s: float
    device: torch.device
    dtype: torch.dtype

    def describe(self) -> dict[str, Any]:
        cfg = self.model.config
        return {
            "model": self.name,
            "params": self.num_params,
            "params_b": round(self.num_params / 1e9, 4),
            "tie_word_embeddings": bool(cfg.tie_word_embeddings),
            "layers": int(cfg.num_hidden_layers),
            "hidden": int(cfg.hidden_size),
            "vocab": int(cfg.vocab_size),
            "dtype": str(self.dtype).replace("torch.", ""),
            "attn_implementation": getattr(cfg, "_attn_implementation", None),
            "build_s": round(self.build_s, 3),
        }


def num_params(model: torch.nn.Module) -> int:
    """Parameter count with tied tensors counted once."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def init_weights_fast(model: torch.nn.Module, seed: int = 0, std: float = _INIT_STD) -> None:
    """Seeded ``normal_(0, std)`` for every matrix, ones for 1-D (norm) weights; one kernel per tensor."""
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        raise ValueError(f"model parameters span several devices: {sorted(map(str, devices))}")
    gen = torch.Generator(device=devices.pop()).manual_seed(seed)
    for p in model.parameters():  # tied tensors appear once
        if p.dim() <= 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=gen)


def build_model(name: str, device: str | torch.device, dtype: torch.dtype = torch.bfloat16,
                seed: int = 0, config: LlamaConfig | None = None) -> BuiltModel:
    """Build model ``name`` on ``device`` in ``dtype`` with seeded random weights, in train mode.

    Parameters are created directly in ``dtype`` on ``device`` (no fp32 copy, no host round trip),
    Hugging Face's initialisation is skipped and :func:`init_weights_fast` fills them.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    device = torch.device(device)
    config = config if config is not None else config_for(name)
    start = time.perf_counter()
    with torch.device(device), _skip_hf_init():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    if config.tie_word_embeddings:
        model.tie_weights()  # no_init_weights also skips the tying done in init_weights
    init_weights_fast(model, seed)
    model.train()
    model.config.use_cache = False
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    build_s = time.perf_counter() - start
    _check_built(model, device, dtype)
    return BuiltModel(model, name, num_params(model), build_s, device, dtype)


def _check_built(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    for n, p in model.named_parameters():
        if p.dtype != dtype or p.device.type != device.type:
            raise RuntimeError(f"parameter {n} is {p.dtype} on {p.device}, expected {dtype} on {device}")
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    if bool(model.config.tie_word_embeddings) != (emb is head):
        raise RuntimeError(f"tie_word_embeddings={model.config.tie_word_embeddings} but the embedding and "
                           f"lm_head are {'the same' if emb is head else 'different'} tensors")


def random_batch(vocab_size: int, batch: int, seq: int, device: str | torch.device,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (fixed seed, drawn on the host so every device sees the same tokens)."""
    if batch < 1 or seq < 2:
        raise ValueError(f"need batch >= 1 and seq >= 2, got batch={batch}, seq={seq}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=gen).to(device)
    return {"input_ids": ids, "labels": ids}


# ------------------------------------------------------------------------------------------- loss
LOSS_MODES = ("hf", "chunked")


def _chunk_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight).float()
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def chunked_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           chunk_tokens: int = 512) -> torch.Tensor:
    """Next-token cross-entropy over ``hidden @ weight.T`` without materialising all fp32 logits.

    Same value as Hugging Face's causal-LM loss (mean over the labels that are not -100, fp32 logits),
    computed ``chunk_tokens`` positions at a time; each chunk is checkpointed, so backward recomputes
    its logits instead of keeping them: at most one chunk of logits is alive.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"expected hidden [B, S, H] and labels [B, S]; got {tuple(hidden.shape)} and "
                         f"{tuple(labels.shape)}")
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    count = (y != -100).sum().clamp(min=1)
    total = None
    for start in range(0, y.numel(), chunk_tokens):
        part = torch.utils.checkpoint.checkpoint(
            _chunk_ce_sum, h[start:start + chunk_tokens], weight, y[start:start + chunk_tokens], use_reentrant=False)
        total = part if total is None else total + part
    return total / count


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], mode: str = "hf",
                   chunk_tokens: int = 512) -> torch.Tensor:
    """The training loss: Hugging Face's own (``"hf"``, full fp32 logits) or :func:`chunked_causal_lm_loss`."""
    if mode == "hf":
        return model(**batch).loss
    if mode == "chunked":
        hidden = model.get_decoder()(input_ids=batch["input_ids"]).last_hidden_state
        return chunked_causal_lm_loss(hidden, model.get_output_embeddings().weight, batch["labels"], chunk_tokens)
    raise ValueError(f"unknown loss mode {mode!r}; choose one of {LOSS_MODES}")
