#!/usr/bin/env python3
"""The causal-LM loss alone: Hugging Face's (full logits) against the fused ones, frozen head.

Forward + backward of the loss from the final hidden states (``requires_grad``) and the Llama-3-8B
head (128256 x 4096, bf16, frozen as in every BAdam block but the head's), at several token counts:
Hugging Face's loss (logits, fp32 upcast, cross-entropy), Liger-Kernel's fused linear cross-entropy
with its default chunking (``chunk_mem_const=1``), and with the chunking ``badam_ext`` picks
(:func:`badam_ext.memory.loss.liger_chunk_mem_const`); torch's ``F.linear_cross_entropy`` where the
installed torch has it. ``triton.testing.do_bench`` medians; peak allocated above the inputs.

    python bench/bench_loss.py --tokens 2048,8192,16384 --out results.jsonl
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _report as R  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="2048,8192,16384")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def hf_loss(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, target, ignore_index=-100)


def candidates() -> dict[str, Callable[..., torch.Tensor]]:
    from badam_ext.memory import loss as L

    out: dict[str, Callable[..., torch.Tensor]] = {"hf": hf_loss}
    if L.liger_available():
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        out["liger_default"] = lambda h, w, t: liger_fused_linear_cross_entropy(h, w, t, chunk_mem_const=1)
        out["liger_badam_ext"] = lambda h, w, t: L.fused_linear_cross_entropy(h, w, t, backend="liger")
    if L.torch_has_fused_loss():
        out["torch_badam_ext"] = lambda h, w, t: L.fused_linear_cross_entropy(h, w, t, backend="torch")
    return out


def measure(fn: Callable[..., torch.Tensor], hidden: torch.Tensor, weight: torch.Tensor,
            target: torch.Tensor) -> dict[str, Any]:
    import triton.testing

    def step() -> None:
        hidden.grad = None
        fn(hidden, weight, target).backward()

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = triton.testing.do_bench(step, warmup=5, rep=100, return_mode="median")
    return {"ms": ms, "peak_mib": peak / 2 ** 20}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = torch.device("cuda")
    env = R.env_info(device)
    gen = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden, device=device, generator=gen) * 0.02).to(torch.bfloat16)
    records = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        hidden = torch.randn(tokens, args.hidden, device=device, generator=gen).to(torch.bfloat16).requires_grad_()
        target = torch.randint(0, args.vocab, (tokens,), device=device, generator=gen)
        target[: tokens // 8] = -100
        ref = None
        for name, fn in candidates().items():
            try:
                row = measure(fn, hidden, weight, target)
                loss = float(fn(hidden, weight, target).detach().float())
                ref = loss if name == "hf" else ref
                row.update(loss=loss, loss_rel_err=None if ref is None else abs(loss - ref) / abs(ref))
            except torch.OutOfMemoryError as exc:
                row = {"error": R.first_line(str(exc))}
            row.update(kind="loss", name=name, tokens=tokens, hidden=args.hidden, vocab=args.vocab, env=env)
            R.log(f"   {row}")
            records.append(row)
        del hidden
    R.append_jsonl(args.out, records)
    return records


if __name__ == "__main__":
    main()
