"""The main job: a small but real BlockAdam finetuning run.

Default (no arguments): a Llama-architecture model built from a config (random weights, byte
vocabulary) trained on the generated arithmetic dataset (``badam_ext.data``), with the VRAM/time
profiler attached. With ``model_path`` a local Hugging Face checkpoint is finetuned instead, with its
own tokenizer; with ``data`` on a JSON / JSONL file of examples (``badam_ext.finetune_data``: loss on
the responses only), and the finetuned model is saved to ``<out>/model`` (``save_pretrained``:
safetensors, plus the tokenizer).

Steps: :func:`build_model` (the one place the model is made), :func:`build_datasets`,
:func:`build_optimizer` (the one place the optimizer is made), the loop in :func:`run`, then the
profile, the summary and :func:`save_model`. Every input is checked before the output folder is
touched, and the model folder appears whole or not at all.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from .data import BYTE_VOCAB, TokenBlocks, arithmetic_text, encode_bytes
from .finetune_data import DataError, load_examples


@dataclass
class ModelPreset:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int


PRESETS = {
    # CPU default: trains in about a minute on 2 cores.
    "tiny": ModelPreset(128, 344, 6, 4, 2),
    # GPU default: ~0.2B parameters.
    "small": ModelPreset(1024, 2816, 16, 16, 4),
}


@dataclass
class TrainConfig:
    preset: Optional[str] = None  # None: "small" on CUDA, "tiny" on CPU
    model_path: Optional[str] = None
    data: Optional[str] = None  # JSON / JSONL examples (needs model_path for the tokenizer)
    eval_data: Optional[str] = None  # None: the first rows of the training data (with data)
    pack: bool = False  # pack whole examples into rows of seq_len instead of one padded example per row
    save_model: Optional[bool] = None  # None: save <out>/model when a checkpoint was finetuned (model_path)
    steps: Optional[int] = None  # None: one pass over data, else block_epochs full passes over the blocks
    block_epochs: int = 2
    switch_every: int = 5
    switch_mode: str = "ascending"
    start_block: Optional[int] = None
    lr: Optional[float] = None  # None: 1e-3 for the embedded random-init model, 1e-5 for a checkpoint
    weight_decay: float = 0.01
    include_embedding: Optional[bool] = None  # None: True for the embedded model, False for a checkpoint
    include_lm_head: Optional[bool] = None  # None: as include_embedding (never for a tied lm_head)
    batch_size: int = 8
    seq_len: int = 128
    dtype: Optional[str] = None  # None: bfloat16 on CUDA, float32 on CPU (CPU bf16 matmuls are slow)
    device: Optional[str] = None
    backend: str = "auto"
    gradient_checkpointing: bool = False
    memory_savings: bool = True  # badam_ext.apply_memory_savings: fused loss, checkpoint offload
    offload_checkpoints: str = "auto"  # "auto", "on" or "off"
    layer_kernels: str = "auto"  # "auto", "on" or "off": Liger-Kernel's RMSNorm / SwiGLU
    states: str = "fp32"  # BlockAdam's optimizer-state format: "fp32" (bit-exact) or "8bit"
    master: bool = True  # False: no fp32 master, bf16 weights updated with stochastic rounding
    budget_gib: Optional[float] = None  # None: the device's memory
    max_grad_norm: Optional[float] = 1.0
    seed: int = 0
    out: str = "runs/train"
    sample_interval_s: Optional[float] = 0.05
    progress: bool = True


class Batches(Protocol):
    """A training or evaluation set: rows addressed by index, as model keyword arguments."""

    def __len__(self) -> int: ...

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]: ...


@dataclass
class Built:
    """The model, its tokenizer (None for the embedded byte model) and text -> token ids."""

    model: Any
    tokenizer: Any
    encode: Any


def build_model(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> Built:
    """The model to finetune (a local checkpoint, or the embedded preset) on ``device`` in ``dtype``."""
    import transformers

    if cfg.model_path:
        path = Path(cfg.model_path)
        if not path.is_dir():
            raise FileNotFoundError(f"--model expects a local Hugging Face checkpoint folder; {path} is not one")
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        encode = lambda text: torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)  # noqa: E731
        return Built(model.to(device), tokenizer, encode)
    if cfg.data:
        raise DataError("--data needs --model PATH: a checkpoint folder whose tokenizer reads the text")
    preset = PRESETS[cfg.preset or ("small" if device.type == "cuda" else "tiny")]
    config = transformers.LlamaConfig(
        vocab_size=BYTE_VOCAB, max_position_embeddings=max(256, cfg.seq_len), tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, **asdict(preset),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = transformers.LlamaForCausalLM(config)
    return Built(model.to(device=device, dtype=dtype), None, encode_bytes)


def build_datasets(cfg: TrainConfig, built: Built) -> tuple[Batches, Batches]:
    """Training and evaluation rows: the examples of ``cfg.data``, or the arithmetic text."""
    if cfg.data:
        train = load_examples(cfg.data, built.tokenizer, cfg.seq_len, pack=cfg.pack)
        evaluation = load_examples(cfg.eval_data, built.tokenizer, cfg.seq_len, pack=cfg.pack) if cfg.eval_data \
            else train
        return train, evaluation
    if cfg.eval_data:
        raise DataError("--eval-data needs --data")
    train_blocks = TokenBlocks(built.encode(arithmetic_text(20_000, seed=cfg.seed)), cfg.seq_len)
    eval_blocks = TokenBlocks(built.encode(arithmetic_text(2_000, seed=cfg.seed + 1)), cfg.seq_len)
    return train_blocks, eval_blocks


def build_optimizer(cfg: TrainConfig, model: Any):
    """The BlockAdam of the run."""
    from .optimizer import BlockAdam

    embedded = not cfg.model_path
    include_embedding = embedded if cfg.include_embedding is None else cfg.include_embedding
    include_lm_head = include_embedding if cfg.include_lm_head is None else cfg.include_lm_head
    if include_lm_head and _lm_head_tied(model):
        include_lm_head = False  # the shared weight trains with the embedding block
    return BlockAdam(model, lr=_lr(cfg), weight_decay=cfg.weight_decay, switch_every=cfg.switch_every,
                     switch_mode=cfg.switch_mode, start_block=cfg.start_block, backend=cfg.backend,
                     max_grad_norm=cfg.max_grad_norm, include_embedding=include_embedding,
                     include_lm_head=include_lm_head, seed=cfg.seed, states=cfg.states, master=cfg.master)


def enable_memory_savings(cfg: TrainConfig, model: Any):
    """The run's memory savings (None when switched off)."""
    if not cfg.memory_savings:
        return None
    from .memory.savings import default_memory_savings

    offload = {"auto": "auto", "on": True, "off": False}.get(cfg.offload_checkpoints)
    if offload is None:
        raise ValueError(f"offload_checkpoints must be auto, on or off, got {cfg.offload_checkpoints!r}")
    layer_kernels = {"auto": "auto", "on": True, "off": False}.get(cfg.layer_kernels)
    if layer_kernels is None:
        raise ValueError(f"layer_kernels must be auto, on or off, got {cfg.layer_kernels!r}")
    return default_memory_savings(model, offload_checkpoints=offload, budget_gib=cfg.budget_gib,
                                  batch_size=cfg.batch_size, seq_len=cfg.seq_len, layer_kernels=layer_kernels)


def _lr(cfg: TrainConfig) -> float:
    if cfg.lr is not None:
        return cfg.lr
    return 1e-3 if not cfg.model_path else 1e-5


def _lm_head_tied(model: Any) -> bool:
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    return out is not None and getattr(inp, "weight", None) is getattr(out, "weight", None)


@torch.no_grad()
def evaluate(model, data: Batches, batch_size: int, device: torch.device, max_batches: int = 8) -> float:
    """Mean loss over the first ``max_batches`` batches of ``data``."""
    was_training = model.training
    model.eval()
    losses = []
    for start in range(0, min(len(data), batch_size * max_batches), batch_size):
        indices = torch.arange(start, min(start + batch_size, len(data)))
        batch = {k: v.to(device) for k, v in data.batch(indices).items()}
        losses.append(model(**batch).loss.float().item())
    model.train(was_training)
    return sum(losses) / len(losses)


def run(cfg: TrainConfig) -> dict:
    """Train, profile, write the report (and the model); returns the summary dict."""
    from .profiling import VramProfiler

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if cfg.data and not Path(cfg.data).is_file():
        raise DataError(f"{cfg.data}: no such file")
    built = build_model(cfg, device, dtype)
    model = built.model
    train_data, eval_data = build_datasets(cfg, built)  # every record checked before anything is written
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    opt = build_optimizer(cfg, model)
    savings = enable_memory_savings(cfg, model)
    steps = cfg.steps or (math.ceil(len(train_data) / cfg.batch_size) if cfg.data
                          else cfg.block_epochs * len(opt.partition) * cfg.switch_every)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(cfg.seed))

    eval_before = evaluate(model, eval_data, cfg.batch_size, device)
    prof = VramProfiler(device=device, sample_interval_s=cfg.sample_interval_s)
    prof.attach(opt)
    if savings is not None:
        prof.attach_memory_savings(savings)
    losses = []
    started = time.perf_counter()
    with prof, _progress(cfg.progress, steps) as advance:
        for step in range(steps):
            idx = order[(step * cfg.batch_size + torch.arange(cfg.batch_size)) % len(train_data)]
            batch = {k: v.to(device) for k, v in train_data.batch(idx).items()}
            with prof.phase("forward"):
                loss = model(**batch).loss
            with prof.phase("backward"):
                loss.backward()
            with prof.phase("step"):
                opt.step()
                sched.step()
            losses.append(loss.detach())
            advance(step, opt.active_block)
    wall = time.perf_counter() - started
    eval_after = evaluate(model, eval_data, cfg.batch_size, device)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    report = prof.report()
    report.print()
    report.save(out)
    save = cfg.save_model if cfg.save_model is not None else bool(cfg.model_path)
    model_dir = save_model(model, built.tokenizer, out / "model") if save else None
    summary = {
        "device": str(device),
        "model_params": sum(p.numel() for p in model.parameters()),
        "blocks": len(opt.partition),
        "steps": steps,
        "tokens_per_s": steps * cfg.batch_size * cfg.seq_len / wall,
        "train_loss_first": losses[0].item(),
        "train_loss_last": torch.stack(losses[-5:]).float().mean().item(),
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "eval_data": cfg.eval_data or cfg.data or "arithmetic (held out)",
        "train_rows": len(train_data),
        "arena_bytes": opt.arena.capacity_bytes,
        "wall_s": wall,
        "model_dir": None if model_dir is None else str(model_dir),
        "memory_savings": None if savings is None else savings.stats(),
        "config": asdict(cfg),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def save_model(model: Any, tokenizer: Any, target: Path) -> Path:
    """``save_pretrained`` of the model (safetensors) and the tokenizer into ``target``, atomically:
    written to a sibling folder first, which then replaces ``target``."""
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    if target.exists():
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old)
    else:
        staging.rename(target)
    return target


class _progress:
    """A rich progress bar showing the active block (or nothing when disabled)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda step, block: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("block {task.fields[block]}"), TimeElapsedColumn())
        self._bar.__enter__()
        task = self._bar.add_task("train", total=self.total, block="-")
        return lambda step, block: self._bar.update(task, advance=1, block=block)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._bar.__exit__(*exc)
