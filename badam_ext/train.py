"""The main job: a small but real BlockAdam finetuning run on an embedded default.

Default: a Llama-architecture model built from a config (random weights, byte vocabulary) trained on
the generated arithmetic dataset (``badam_ext.data``), with the VRAM/time profiler attached. With
``model_path`` a local Hugging Face checkpoint folder is finetuned instead (its own tokenizer).
Writes the profile (JSON, CSV, PNG) and a summary to the output folder.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from .data import BYTE_VOCAB, TokenBlocks, arithmetic_text, encode_bytes


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
    steps: Optional[int] = None  # None: block_epochs full passes over the blocks
    block_epochs: int = 2
    switch_every: int = 5
    switch_mode: str = "ascending"
    start_block: Optional[int] = None
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 8
    seq_len: int = 128
    dtype: Optional[str] = None  # None: bfloat16 on CUDA, float32 on CPU (CPU bf16 matmuls are slow)
    device: Optional[str] = None
    backend: str = "auto"
    gradient_checkpointing: bool = False
    max_grad_norm: Optional[float] = 1.0
    seed: int = 0
    out: str = "runs/train"
    sample_interval_s: Optional[float] = 0.05
    progress: bool = True


def build_model(cfg: TrainConfig, device: torch.device, dtype: torch.dtype):
    """The model to finetune and a function turning text into token ids."""
    import transformers

    if cfg.model_path:
        path = Path(cfg.model_path)
        if not path.is_dir():
            raise FileNotFoundError(f"--model expects a local Hugging Face checkpoint folder; {path} is not one")
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        encode = lambda text: torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)  # noqa: E731
        return model.to(device), encode
    preset = PRESETS[cfg.preset or ("small" if device.type == "cuda" else "tiny")]
    config = transformers.LlamaConfig(
        vocab_size=BYTE_VOCAB, max_position_embeddings=max(256, cfg.seq_len), tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, **asdict(preset),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = transformers.LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype), encode_bytes


@torch.no_grad()
def evaluate(model, data: TokenBlocks, batch_size: int, device: torch.device, max_batches: int = 8) -> float:
    """Mean loss over the first ``max_batches`` batches of ``data``."""
    was_training = model.training
    model.eval()
    losses = []
    for start in range(0, min(len(data), batch_size * max_batches), batch_size):
        ids = data.windows[start:start + batch_size].to(device)
        losses.append(model(input_ids=ids, labels=ids).loss.float().item())
    model.train(was_training)
    return sum(losses) / len(losses)


def run(cfg: TrainConfig) -> dict:
    """Train, profile, write the report; returns the summary dict."""
    from .optimizer import BlockAdam
    from .profiling import VramProfiler

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model, encode = build_model(cfg, device, dtype)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    train_data = TokenBlocks(encode(arithmetic_text(20_000, seed=cfg.seed)), cfg.seq_len)
    eval_data = TokenBlocks(encode(arithmetic_text(2_000, seed=cfg.seed + 1)), cfg.seq_len)

    opt = BlockAdam(model, lr=cfg.lr, weight_decay=cfg.weight_decay, switch_every=cfg.switch_every,
                    switch_mode=cfg.switch_mode, start_block=cfg.start_block, backend=cfg.backend,
                    max_grad_norm=cfg.max_grad_norm,
                    include_embedding=True, include_lm_head=True, seed=cfg.seed)
    steps = cfg.steps or cfg.block_epochs * len(opt.partition) * cfg.switch_every
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    loader_gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(train_data), generator=loader_gen)

    eval_before = evaluate(model, eval_data, cfg.batch_size, device)
    prof = VramProfiler(device=device, sample_interval_s=cfg.sample_interval_s)
    prof.attach(opt)
    losses = []
    started = time.perf_counter()
    with prof, _progress(cfg.progress, steps) as advance:
        for step in range(steps):
            idx = order[(step * cfg.batch_size + torch.arange(cfg.batch_size)) % len(train_data)]
            ids = train_data.windows[idx].to(device)
            with prof.phase("forward"):
                loss = model(input_ids=ids, labels=ids).loss
            with prof.phase("backward"):
                loss.backward()
            with prof.phase("step"):
                opt.step()
                sched.step()
            losses.append(loss.detach())
            advance(step, opt.active_block)
    wall = time.perf_counter() - started
    eval_after = evaluate(model, eval_data, cfg.batch_size, device)
    report = prof.report()
    report.print()
    report.save(out)
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
        "arena_bytes": opt.arena.capacity_bytes,
        "wall_s": wall,
        "config": asdict(cfg),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


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
