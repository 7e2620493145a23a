"""Data-parallel BlockAdam: all-reduce only the active block's gradients, overlapped with backward.

Every rank holds the whole model and runs the same block schedule; only the active block has
gradients, so only its gradients cross the network (one layer's worth, against the whole model for
DDP). :class:`GradSync` hooks the active parameters (``register_post_accumulate_grad_hook``) and
launches an async in-place all-reduce of ``p.grad`` as soon as that gradient is final, while
backward carries on below it. :meth:`GradSync.synchronize` completes the reductions and leaves the
mean over ranks in ``.grad`` (``AVG`` on NCCL; gloo has no AVG, so SUM and one in-place scale); the
optimizer calls it at the start of its step, and a user who inspects or clips gradients between
backward and step (``clip_grad_norm_``, ``GradScaler``) calls it first (``BlockAdam.synchronize_grads()``).

When is a gradient final? Normally a parameter's hook fires once per backward. It fires several
times when a parameter takes part in several nested backward passes (e.g. one weight used inside two
reentrantly checkpointed segments), and reducing at the first firing would race with the later
accumulations. So the number of firings per synced backward is learned per parameter: the first
synced step of a parameter reduces it in :meth:`~GradSync.wait` (not overlapped) and records the
count; later steps launch at the last expected firing. A firing after the launch (backward run twice
without :meth:`~GradSync.no_sync`, or a graph that grew) raises instead of reducing twice.

Limitations (as DDP without ``find_unused_parameters``): every active parameter must get a gradient on
every rank in every step, and all ranks must run the same graph (same model, same micro-batch count),
because the collectives are matched by launch order.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

# Elements per chunk of check_replicas' float64 / int64 temporaries (bounds their memory).
_CHECKSUM_CHUNK = 1 << 24
# Period of the position weights of the weighted checksum (a prime below 2**16, so swaps show).
_WEIGHT_PERIOD = 65521
_MODULUS = (1 << 61) - 1


class GradSync:
    """All-reduces the active block's gradients across data-parallel ranks, overlapped with backward.

    Args:
        process_group: the data-parallel group (default: the global group). Needs an initialised
            ``torch.distributed``.
    """

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "GradSync needs an initialised torch.distributed process group "
                "(call torch.distributed.init_process_group first, e.g. under torchrun)"
            )
        self.group = process_group if process_group is not None else dist.group.WORLD
        self.world_size: int = dist.get_world_size(self.group)
        self.rank: int = dist.get_rank(self.group)
        self.num_reductions = 0  # all-reduces launched since construction (for tests and benchmarks)
        self._params: list[nn.Parameter] = []
        self._names: list[str] = []
        self._hooks: list = []
        self._syncing = True
        self._fires: dict[int, int] = {}  # id(param) -> synced hook firings this step
        self._expected: dict[int, int] = {}  # id(param) -> learned firings per synced backward
        self._pending: dict[int, tuple[torch.Tensor, dist.Work]] = {}  # id(param) -> (reduced grad, work)
        self._synced = False  # this step's gradients are reduced and averaged
        self._avg = dist.get_backend(self.group) == "nccl"  # NCCL averages in the collective

    # ----------------------------------------------------------------- hooks
    def attach(self, params: Sequence[nn.Parameter], names: Optional[Sequence[str]] = None) -> None:
        """Hook the newly active ``params`` (removing the previous block's hooks).

        Call after their ``requires_grad`` is set. ``names`` only label error messages.
        """
        params = list(params)
        if names is not None and len(names) != len(params):
            raise ValueError(f"attach got {len(params)} params but {len(names)} names")
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor) or not p.is_leaf or not p.requires_grad:
                raise ValueError(
                    f"GradSync.attach: param #{i} must be a leaf tensor with requires_grad=True "
                    "(attach after the block's requires_grad is switched on)"
                )
        if len({id(p) for p in params}) != len(params):
            raise ValueError("GradSync.attach: a parameter is listed twice")
        self._drain()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._params = params
        self._names = list(names) if names is not None else [f"param #{i}" for i in range(len(params))]
        self._reset_step()
        if self.world_size > 1:
            self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in params]

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        key = id(param)
        if key in self._pending or self._synced:
            raise RuntimeError(
                f"GradSync: {self._label(param)} received more gradient after its all-reduce was launched "
                "in this step: backward ran more than once outside no_sync() (with gradient accumulation run "
                "every micro-batch but the last under no_sync()), or the parameter now takes part in more "
                "backward passes than in its first synced step."
            )
        if not self._syncing:
            return
        fires = self._fires.get(key, 0) + 1
        self._fires[key] = fires
        if fires == self._expected.get(key):
            self._launch(param)

    def _launch(self, param: torch.Tensor) -> None:
        grad = param.grad
        op = dist.ReduceOp.AVG if self._avg else dist.ReduceOp.SUM
        work = dist.all_reduce(grad, op=op, group=self.group, async_op=True)
        self._pending[id(param)] = (grad, work)
        self.num_reductions += 1

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward inside this context accumulates locally (all micro-batches but the last)."""
        previous = self._syncing
        self._syncing = False
        try:
            yield
        finally:
            self._syncing = previous

    # ------------------------------------------------------------------ step
    def synchronize(self) -> None:
        """Finish this step's all-reduces: afterwards every active ``.grad`` holds the mean over ranks.

        Parameters whose firing count is not known yet (their first synced step) are reduced here.
        Idempotent within a step. Raises if an active parameter has a gradient that was never reduced.
        """
        if self.world_size == 1 or self._synced:
            return
        for p in self._params:  # attach order: identical on every rank
            key = id(p)
            fires = self._fires.get(key, 0)
            if fires and key not in self._pending:
                self._launch(p)
                self._expected[key] = fires
        unreduced = [self._label(p) for p in self._params if p.grad is not None and id(p) not in self._pending]
        replaced = []
        try:
            for p in self._params:
                entry = self._pending.get(id(p))
                if entry is None:
                    continue
                grad, work = entry
                work.wait()
                if p.grad is not grad:
                    replaced.append(self._label(p))
                elif not self._avg:
                    grad.mul_(1.0 / self.world_size)
        except BaseException:
            self._reset_step()
            raise
        if unreduced or replaced:
            self._reset_step()
        if unreduced:
            raise RuntimeError(
                f"GradSync: the gradient of {len(unreduced)} active parameter(s) was never all-reduced in "
                f"this step ({', '.join(unreduced[:4])}{' ...' if len(unreduced) > 4 else ''}): the last "
                "backward before step() ran under no_sync(). Run only the earlier micro-batches under no_sync()."
            )
        if replaced:
            raise RuntimeError(
                f"GradSync: .grad of {', '.join(replaced[:4])} was replaced by a new tensor after its all-reduce "
                "was launched; modify gradients in place between backward() and step()"
            )
        self._synced = True

    @property
    def synchronized(self) -> bool:
        """True between :meth:`synchronize` and the end of the step (:meth:`wait`)."""
        return self._synced or self.world_size == 1

    def wait(self) -> None:
        """Called by the optimizer's step: :meth:`synchronize`, then start the next step afresh."""
        try:
            self.synchronize()
        finally:
            self._reset_step()

    def _drain(self) -> None:
        for _grad, work in self._pending.values():
            work.wait()
        self._pending = {}

    def _reset_step(self) -> None:
        self._pending = {}
        self._fires = {}
        self._synced = False

    def bytes_per_step(self) -> int:
        """Gradient bytes all-reduced per optimizer step for the attached block (0 when alone)."""
        if self.world_size == 1:
            return 0
        return sum(p.numel() * p.element_size() for p in self._params)

    def _label(self, param: torch.Tensor) -> str:
        for name, p in zip(self._names, self._params):
            if p is param:
                return f"{name} (shape {list(p.shape)})"
        return f"a parameter of shape {list(param.shape)}"

    # ----------------------------------------------------------------- debug
    def check_replicas(self, tensors: Sequence[torch.Tensor], what: str = "weights") -> None:
        """Raise ``RuntimeError`` naming the ranks whose ``tensors`` differ from rank 0's.

        A collective: every rank calls it with the same number and sizes of tensors. Each tensor is
        summarised as float64 ``[sum, sum |x|]`` (reported for scale) and two exact checksums of its bits
        (a plain and a position-weighted integer sum, independent of reduction order, so any changed
        or swapped element shows); ranks are compared on the exact checksums.
        """
        tensors = list(tensors)
        device = self._comm_device(tensors)
        header = torch.tensor([len(tensors), sum(t.numel() for t in tensors)], dtype=torch.int64, device=device)
        headers = self._gather(header)
        differ = [r for r, h in enumerate(headers) if not torch.equal(h, headers[0])]
        if differ:
            raise RuntimeError(
                f"check_replicas({what}): ranks {differ} passed a different number or size of tensors than "
                f"rank 0 (tensors, elements per rank: {[tuple(int(v) for v in h.tolist()) for h in headers]})"
            )
        if not tensors:
            return
        pairs = [_checksum(t) for t in tensors]
        floats = self._gather(torch.stack([f for f, _ in pairs]).to(device))  # per rank: [tensors, 2] float64
        exact = self._gather(torch.stack([e for _, e in pairs]).to(device))  # per rank: [tensors, 2] int64
        differ = [r for r, e in enumerate(exact) if not torch.equal(e, exact[0])]
        if differ:
            r = differ[0]
            first = int((exact[r] != exact[0]).any(dim=1).nonzero()[0])
            raise RuntimeError(
                f"check_replicas({what}): ranks {differ} differ from rank 0; first differing tensor: index "
                f"{first} of {len(tensors)}, shape {list(tensors[first].shape)} (rank 0 sum, sum|x| = "
                f"{floats[0][first, 0].item():.17g}, {floats[0][first, 1].item():.17g}; rank {r}: "
                f"{floats[r][first, 0].item():.17g}, {floats[r][first, 1].item():.17g})"
            )

    def _gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor, group=self.group)
        return out

    def _comm_device(self, tensors: Sequence[torch.Tensor]) -> torch.device:
        backend = str(dist.get_backend(self.group)).lower()
        on_cuda = any(t.is_cuda for t in tensors)
        if "nccl" in backend and (on_cuda or "gloo" not in backend):
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def _checksum(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``[sum, sum |x|]`` and int64 ``[bits sum, position-weighted bits sum]`` of ``tensor``.

    The bit checksums sum the tensor's 16-bit words (8-bit for 1-byte dtypes) as integers, plain and
    weighted by position, reduced modulo a prime chunk by chunk: exact, so equal on every rank for equal
    data whatever the reduction order, and no partial sum can overflow int64.
    """
    flat = tensor.detach().contiguous().reshape(-1)
    words = flat.view(torch.uint8) if flat.element_size() == 1 else flat.view(torch.int16)
    device = flat.device
    floats = torch.zeros(2, dtype=torch.float64, device=device)
    for start in range(0, flat.numel(), _CHECKSUM_CHUNK):
        chunk = flat[start:start + _CHECKSUM_CHUNK].to(torch.float64)
        floats += torch.stack([chunk.sum(), chunk.abs().sum()])
    exact = torch.zeros(2, dtype=torch.int64, device=device)
    for start in range(0, words.numel(), _CHECKSUM_CHUNK):
        chunk = words[start:start + _CHECKSUM_CHUNK].to(torch.int64)
        pos = torch.arange(start, start + chunk.numel(), device=device, dtype=torch.int64)
        weights = pos % _WEIGHT_PERIOD + 1
        # |word| < 2**16 and weight < 2**16: a chunk's sum stays below 2**56.
        exact = (exact + torch.stack([chunk.sum(), (chunk * weights).sum()])) % _MODULUS
    return floats, exact


def full_model_grad_bytes(model: nn.Module) -> int:
    """Gradient bytes DDP would all-reduce per step when finetuning every parameter of ``model``."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def reject_ddp(model: nn.Module) -> None:
    """Refuse a DDP-wrapped model: BlockAdam reduces the active block itself."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "BlockAdam got a DistributedDataParallel model: BlockAdam all-reduces only the active block's "
            "gradients itself, and DDP would all-reduce every gradient again. Pass the bare module "
            "(model.module) and do not wrap the model in DDP."
        )
