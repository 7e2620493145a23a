"""A float64 re-implementation of block AdamW (BAdam) used as the optimizer tests' oracle.

Written from the algorithm, independent of badam_ext: per block, fp64 master = weight, m = v = 0;
per step, decoupled decay (flagged tensors), Adam moments, bias correction; weight = master rounded
to the model dtype; after K steps the next block in the given order becomes active.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


class Float64BlockAdamW:
    def __init__(
        self,
        params_by_block: Sequence[Sequence[tuple[str, torch.nn.Parameter]]],
        order: Sequence[int],
        switch_every: int,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        decays: dict[str, bool],
    ) -> None:
        self.blocks = params_by_block
        self.order = list(order)
        self.k = switch_every
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.decays = decays
        self.calls = 0
        self._load(self.order[0])

    def _load(self, block: int) -> None:
        self.active = block
        self.t = 0
        self.master = {n: p.detach().double().clone() for n, p in self.blocks[block]}
        self.m = {n: torch.zeros_like(v) for n, v in self.master.items()}
        self.v = {n: torch.zeros_like(v) for n, v in self.master.items()}

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor], lr: float | None = None, grad_scale: float = 1.0) -> None:
        lr = self.lr if lr is None else lr
        self.t += 1
        bc1 = 1 - self.b1**self.t
        bc2 = 1 - self.b2**self.t
        for name, param in self.blocks[self.active]:
            g = grads[name].double() * grad_scale
            master, m, v = self.master[name], self.m[name], self.v[name]
            if self.decays[name]:
                master.mul_(1 - lr * self.wd)
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            denom = v.sqrt() / math.sqrt(bc2) + self.eps
            master.addcdiv_(m, denom, value=-lr / bc1)
            param.copy_(master.to(param.dtype))
        self.calls += 1
        if self.calls % self.k == 0:
            nxt = self.order[(self.calls // self.k) % len(self.order)]
            self._load(nxt)
