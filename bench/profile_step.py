#!/usr/bin/env python3
"""Where one BAdam training step's GPU time goes: eager layers against regionally compiled ones.

Builds the 8B shape (``--layers`` of them, random weights), trains ``--warmup`` steps with BlockAdam
(K = 1, ascending, pruning, non-reentrant checkpointing) so the active block is a middle one, then
profiles one step with ``torch.profiler`` and prints the kernels with the most device time, for
forward and backward separately (``record_function`` ranges).

    python bench/profile_step.py --layers 8 [--compiled] [--top 15]
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from models import build_model, config_for


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the 8B shape")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5, help="steps before the profiled one (block switches)")
    p.add_argument("--compiled", action="store_true", help="badam_ext.compile_layers (inductor)")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_step.py needs a CUDA device", file=sys.stderr)
        return 2
    from badam_ext import BlockAdam, compile_layers

    config = config_for("8b")
    config.num_hidden_layers = args.layers
    model = build_model("8b", torch.device("cuda"), torch.bfloat16, config=config).model
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.compiled:
        compile_layers(model)
    opt = BlockAdam(model, lr=1e-5, switch_every=1, switch_mode="ascending")
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device="cuda", generator=gen)

    def step() -> None:
        with record_function("forward"):
            loss = model(input_ids=ids, labels=ids).loss
        with record_function("backward"):
            loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"# {'compiled' if args.compiled else 'eager'} layers, {args.layers} of the 8B shape, "
          f"{args.batch} x {args.seq}, active block {opt.active_block}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main())
