"""Data-parallel gradient sync (badam_ext.distributed) on CPU: 2 gloo ranks spawned once per module.

The spawned run executes every two-rank check in sequence and records the ones that passed; each test
below asserts on its own check, so a failure names the check (and shows the workers' error).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
import torch.distributed as dist
from _multiproc import spawn_and_collect
from _tiny_models import tiny_batch, tiny_model
from torch.utils.checkpoint import checkpoint

from badam_ext import BlockAdam
from badam_ext.distributed import GradSync, full_model_grad_bytes, reject_ddp

WORLD = 2
STEPS = 6  # K=2 over 2 layers, ascending: blocks 0, 0, 1, 1, 0, 0
K = 2
LR = 1e-3
EPS = 1e-4  # comparable to the tiny model's gradients, so a wrong gradient scale moves the weights


# ----------------------------------------------------------------------------- shared loop
def _activate(model: torch.nn.Module, block: int) -> list[tuple[str, torch.nn.Parameter]]:
    for p in model.parameters():
        p.requires_grad_(False)
    named = [(f"model.layers.{block}.{n}", p) for n, p in model.model.layers[block].named_parameters()]
    for _, p in named:
        p.requires_grad_(True)
    return named


def _combined_batch(model: torch.nn.Module, step: int) -> dict[str, torch.Tensor]:
    return tiny_batch(model, batch=4, seq=9, seed=100 + step)


def _rows(batch: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in batch.items()}


def _train(model: torch.nn.Module, micro_batches: Callable[[int], list[dict]],
           sync: Optional[GradSync] = None) -> tuple[list[int], list[list[torch.Tensor]]]:
    """K=2 block AdamW (fresh state per block, like BAdam).

    Returns the all-reduces launched during each backward, and each step's gradients as stepped.
    """
    launched_in_backward = []
    grads = []
    params: list[torch.nn.Parameter] = []
    opt = None
    for step in range(STEPS):
        if step % K == 0:
            named = _activate(model, (step // K) % 2)
            params = [p for _, p in named]
            if sync is not None:
                sync.attach(params, [n for n, _ in named])
            opt = torch.optim.AdamW(params, lr=LR, eps=EPS, weight_decay=0.01)
        batches = micro_batches(step)
        before = sync.num_reductions if sync is not None else 0
        for j, mb in enumerate(batches):
            last = j == len(batches) - 1
            with sync.no_sync() if (sync is not None and not last) else contextlib.nullcontext():
                (model(**mb).loss / len(batches)).backward()
        if sync is not None:
            launched_in_backward.append(sync.num_reductions - before)
            sync.synchronize()
            assert sync.synchronized
            sync.wait()
        grads.append([p.grad.clone() for p in params])
        opt.step()
        opt.zero_grad(set_to_none=True)
    return launched_in_backward, grads


def _assert_same_weights(model: torch.nn.Module, ref: torch.nn.Module) -> None:
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def _assert_same_grads(grads: list[list[torch.Tensor]], ref: list[list[torch.Tensor]]) -> None:
    assert len(grads) == len(ref)
    for step, (gs, rs) in enumerate(zip(grads, ref)):
        for i, (g, r) in enumerate(zip(gs, rs)):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6 * r.abs().max().item(),
                                       msg=lambda m: f"step {step} grad {i}: {m}")


# ----------------------------------------------------------------------------- two-rank checks
def _check_equivalence(rank: int, ref: torch.nn.Module, ref_grads: list[list[torch.Tensor]]) -> None:
    """Each rank trains on its half of the batch; weights equal the 1-process run on the whole batch."""
    model = tiny_model("llama", num_layers=2)
    sync = GradSync()
    assert sync.world_size == WORLD
    launched, grads = _train(model, lambda s: [_rows(_combined_batch(model, s), slice(2 * rank, 2 * rank + 2))],
                             sync)
    n = len(list(model.model.layers[0].parameters()))
    # First synced step of each parameter reduces in wait() (learning its hook count); later steps,
    # including block 0's second visit, launch every all-reduce from the hooks during backward.
    assert launched == [0, n, 0, n, n, n], launched
    assert sync.bytes_per_step() == sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    _assert_same_grads(grads, ref_grads)
    _assert_same_weights(model, ref)
    sync.check_replicas(list(model.parameters()))


def _check_accumulation(rank: int, ref: torch.nn.Module, ref_grads: list[list[torch.Tensor]]) -> None:
    """Two micro-batches per rank, the first under no_sync(): same weights as the 1-process run."""
    model = tiny_model("llama", num_layers=2)
    sync = GradSync()
    launched, grads = _train(model, lambda s: [_rows(_combined_batch(model, s), slice(2 * rank + i, 2 * rank + i + 1))
                                               for i in range(2)], sync)
    n = len(list(model.model.layers[0].parameters()))
    assert launched == [0, n, 0, n, n, n], launched
    _assert_same_grads(grads, ref_grads)
    _assert_same_weights(model, ref)
    sync.check_replicas(list(model.parameters()))


def _check_misuse_errors(rank: int) -> None:
    """Last micro-batch under no_sync, or two synced backwards in one step: clear errors, no hang."""
    model = tiny_model("llama", num_layers=2)
    sync = GradSync()
    named = _activate(model, 1)
    sync.attach([p for _, p in named], [n for n, _ in named])
    batch = tiny_batch(model, batch=1, seq=9, seed=rank)
    with sync.no_sync():
        model(**batch).loss.backward()
    with pytest.raises(RuntimeError, match=r"never all-reduced.*last backward before step\(\) ran under no_sync"):
        sync.wait()
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()  # a normal synced step: learns the hook counts
    sync.wait()
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    with pytest.raises(RuntimeError, match="received more gradient after its all-reduce was launched"):
        model(**batch).loss.backward()
    sync.attach([p for _, p in named])  # waits for the in-flight all-reduces, resets the step


def _check_shared_weight(rank: int) -> None:
    """A weight in two reentrant checkpointed segments fires its hook twice per backward: reduce once, last."""
    gen = torch.Generator().manual_seed(7)
    weight = torch.nn.Parameter(torch.randn(5, 5, generator=gen) * 0.5)
    inputs = [torch.randn(3, 5, generator=gen) for _ in range(WORLD)]

    def segment(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ weight)

    def backward(x: torch.Tensor) -> None:
        x = x.clone().requires_grad_(True)
        y = checkpoint(segment, checkpoint(segment, x, use_reentrant=True), use_reentrant=True)
        (y * torch.arange(1.0, 6.0)).sum().backward()

    expected = torch.zeros(5, 5)
    for x in inputs:
        weight.grad = None
        backward(x)
        expected += weight.grad
    weight.grad = None

    sync = GradSync()
    sync.attach([weight], ["shared"])
    seen: list[int] = []  # sync.num_reductions at each firing (this hook runs after GradSync's)
    weight.register_post_accumulate_grad_hook(lambda p: seen.append(sync.num_reductions))
    for step in range(3):
        seen.clear()
        base = sync.num_reductions
        backward(inputs[rank])
        # step 0 learns the count (reduced in wait); later steps launch at the second, final firing
        assert seen == ([base, base] if step == 0 else [base, base + 1]), (step, seen, base)
        sync.wait()
        assert sync.num_reductions == base + 1
        torch.testing.assert_close(weight.grad, expected / WORLD, rtol=1e-6, atol=1e-6)  # the mean over ranks
        weight.grad = None


def _check_replicas_detects(rank: int) -> None:
    """check_replicas passes on equal replicas and names rank 1 after a 1-ulp change or a swap."""
    sync = GradSync()
    gen = torch.Generator().manual_seed(3)
    tensors = [torch.randn(37, 5, generator=gen), torch.randn(1001, generator=gen).bfloat16(),
               torch.randn(6, generator=gen).double()]
    sync.check_replicas(tensors)
    edits: list[Callable[[list[torch.Tensor]], None]] = [
        lambda t: t[0].view(-1)[17].copy_(torch.nextafter(t[0].view(-1)[17], torch.tensor(10.0))),
        lambda t: t[1].view(torch.int16)[500].add_(1),
        lambda t: t[1].copy_(t[1].flip(0)),  # a permutation: equal sum and sum |x|
        lambda t: t[2][3].add_(1e-12),
    ]
    for edit in edits:
        mine = [t.clone() for t in tensors]
        if rank == 1:
            edit(mine)
        with pytest.raises(RuntimeError, match=r"check_replicas\(params\): ranks \[1\] differ from rank 0"):
            sync.check_replicas(mine, what="params")
    with pytest.raises(RuntimeError, match=r"ranks \[1\] passed a different number or size"):
        sync.check_replicas(tensors[: 3 - rank])


def _check_reject_ddp(rank: int) -> None:
    model = tiny_model("llama", num_layers=1)
    reject_ddp(model)
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    with pytest.raises(ValueError, match=r"DistributedDataParallel.*Pass the bare module \(model.module\)"):
        reject_ddp(wrapped)


def _check_blockadam(rank: int) -> None:
    """BlockAdam(distributed=True) on 2 ranks equals the 1-process BlockAdam on the combined batch."""
    def run(model: torch.nn.Module, rows: list[slice], distributed: bool, clip: bool = False) -> BlockAdam:
        opt = BlockAdam(model, lr=LR, eps=EPS, weight_decay=0.01, switch_every=K, switch_mode="ascending",
                        backend="torch", distributed=distributed)
        for step in range(STEPS + 2):  # blocks 0, 0, 1, 1, 0, 0, 1, 1
            full = _combined_batch(model, step)
            for j, sl in enumerate(rows):
                with opt.no_sync() if j < len(rows) - 1 else contextlib.nullcontext():
                    (model(**_rows(full, sl)).loss / len(rows)).backward()
            if clip:  # user-side clipping sees the mean over ranks once synchronised
                opt.synchronize_grads()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
        return opt

    ref = tiny_model("llama", num_layers=2)
    run(ref, [slice(0, 4)], distributed=False)
    checker = GradSync()
    for rows in ([slice(2 * rank, 2 * rank + 2)], [slice(2 * rank + i, 2 * rank + i + 1) for i in range(2)]):
        model = tiny_model("llama", num_layers=2)
        opt = run(model, rows, distributed=True)
        _assert_same_weights(model, ref)
        checker.check_replicas(list(model.parameters()))
        opt.check_replicas()  # the active block's fp32 masters

    ref = tiny_model("llama", num_layers=2)
    run(ref, [slice(0, 4)], distributed=False, clip=True)
    model = tiny_model("llama", num_layers=2)
    run(model, [slice(2 * rank, 2 * rank + 2)], distributed=True, clip=True)
    _assert_same_weights(model, ref)
    checker.check_replicas(list(model.parameters()))

    # GradScaler's found-inf check must see synchronised grads, or ranks could disagree: refused.
    opt = BlockAdam(model, lr=LR, switch_every=K, backend="torch", distributed=True)
    full = _combined_batch(model, 0)
    model(**_rows(full, slice(2 * rank, 2 * rank + 2))).loss.backward()
    opt.found_inf = torch.zeros(())
    try:
        opt.step()
        raise AssertionError("step with found_inf before synchronize_grads() was not refused")
    except RuntimeError as err:
        assert "synchronize_grads" in str(err)
    opt.synchronize_grads()
    opt.step()  # now fine


def _check_bench_smoke(rank: int) -> None:
    """bench/bench_dp.py's per-rank path (tiny model, CPU): DP run, 1-process baseline, identical ranks."""
    bench_dir = str(Path(__file__).resolve().parent.parent / "bench")
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    import bench_dp

    args = bench_dp.parse_args(["--smoke", "--world1", "--steps", "2"])
    records = bench_dp.run_rank(args, rank, WORLD, torch.device("cpu"))
    if rank != 0:
        assert records == []
        return
    by_kind = {(r["kind"], r["world_size"]): r for r in records}
    dp, alone, scaling = by_kind[("dp", 2)], by_kind[("dp", 1)], by_kind[("dp_scaling", 2)]
    assert dp["replicas_identical"] is True, dp["replicas_error"]
    layer = bench_dp.build_model("tiny", "cpu", torch.bfloat16).model.model.layers[0]
    assert dp["grad_bytes_per_step"] == sum(p.numel() * 2 for p in layer.parameters())
    assert dp["ddp_full_grad_bytes"] > dp["grad_bytes_per_step"] > 0
    assert len(dp["step_ms"]) == len(alone["step_ms"]) == 2
    assert scaling["scaling"] == pytest.approx(dp["tokens_per_s"] / alone["tokens_per_s"])


CHECKS = ["equivalence", "accumulation", "misuse_errors", "shared_weight", "check_replicas", "reject_ddp",
          "blockadam", "bench_smoke"]


def _checks(rank: int) -> list[tuple[str, Callable[[], None]]]:
    ref = tiny_model("llama", num_layers=2)
    _, ref_grads = _train(ref, lambda s: [_combined_batch(ref, s)])  # 1 process, the combined batch
    return [
        ("equivalence", lambda: _check_equivalence(rank, ref, ref_grads)),
        ("accumulation", lambda: _check_accumulation(rank, ref, ref_grads)),
        ("misuse_errors", lambda: _check_misuse_errors(rank)),
        ("shared_weight", lambda: _check_shared_weight(rank)),
        ("check_replicas", lambda: _check_replicas_detects(rank)),
        ("reject_ddp", lambda: _check_reject_ddp(rank)),
        ("blockadam", lambda: _check_blockadam(rank)),
        ("bench_smoke", lambda: _check_bench_smoke(rank)),
    ]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[int, str], str]:
    """Run every two-rank check once; per rank the log of passed checks, and the spawn error if any."""
    return spawn_and_collect(_checks, tmp_path_factory.mktemp("dist"), WORLD)


@pytest.mark.parametrize("check", CHECKS)
def test_two_ranks(two_rank_results: tuple[dict[int, str], str], check: str) -> None:
    logs, error = two_rank_results
    for rank, log in logs.items():
        assert f"ok {check} " in log, f"rank {rank}: check {check!r} did not pass.\n{log}\n{error}"


# ----------------------------------------------------------------------------- single process
def test_grad_sync_needs_process_group() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        GradSync()


def test_full_model_grad_bytes_counts_every_parameter_once() -> None:
    model = tiny_model("llama", dtype=torch.bfloat16, num_layers=2, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    unique = {id(p): p.numel() for _, p in model.named_parameters(remove_duplicate=False)}
    assert full_model_grad_bytes(model) == 2 * sum(unique.values())  # bf16 grads, the tied weight once


@pytest.fixture
def world_of_one(tmp_path: Path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_world_of_one_is_a_no_op(world_of_one: None) -> None:
    model = tiny_model("llama", num_layers=1)
    sync = GradSync()
    named = _activate(model, 0)
    sync.attach([p for _, p in named])
    batch = tiny_batch(model, batch=1, seq=5)
    with sync.no_sync():
        model(**batch).loss.backward()
    sync.wait()  # nothing to reduce alone, so no error for a last backward under no_sync
    assert sync.num_reductions == 0 and sync.synchronized and sync.bytes_per_step() == 0
    sync.check_replicas([p.detach() for p in model.parameters()])


def test_attach_rejects_bad_params(world_of_one: None) -> None:
    sync = GradSync()
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    with pytest.raises(ValueError, match=r"param #0 must be a leaf tensor with requires_grad=True"):
        sync.attach([frozen])
    leaf = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="listed twice"):
        sync.attach([leaf, leaf])
    with pytest.raises(ValueError, match="2 params but 1 names"):
        sync.attach([leaf, torch.nn.Parameter(torch.ones(2))], names=["a"])
