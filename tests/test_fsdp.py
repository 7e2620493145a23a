"""BlockAdam under FSDP2 (``fully_shard``) on CPU: 2 gloo ranks spawned once per module.

Every two-rank check compares a sharded run (each rank trains on its half of the batch, FSDP2 averages
the gradients) with a single-process BlockAdam on the whole batch. The spawned run executes the checks
in sequence and logs the ones that passed; each test below asserts on its own check.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
from _multiproc import spawn_and_collect
from _tiny_models import tiny_batch, tiny_model
from torch import nn

from badam_ext import BlockAdam
from badam_ext.arena import required_capacity
from badam_ext.fsdp import is_sharded, local_tensor, sharding_of

try:
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh
except ImportError:  # a torch without distributed support
    fully_shard = None

pytestmark = pytest.mark.skipif(fully_shard is None, reason="torch.distributed.fsdp.fully_shard is unavailable")

WORLD = 2
STEPS = 8  # K=2 over 2 layers, ascending: blocks 0, 0, 1, 1, 0, 0, 1, 1 (four switches)
K = 2
LR = 1e-3
EPS = 1e-4  # comparable to the tiny model's gradients, so a wrong gradient scale moves the weights
STATE_AT = 2  # the step index after which the optimizer state is compared (block 1, one step in)


# ----------------------------------------------------------------------------- models and runs
def _llama() -> nn.Module:
    return tiny_model("llama", num_layers=2)


def _shard_llama(model: nn.Module) -> nn.Module:
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _llama_loss(model: nn.Module, step: int, rows: slice) -> torch.Tensor:
    batch = tiny_batch(model, batch=4, seq=9, seed=100 + step)
    return model(**{k: v[rows] for k, v in batch.items()}).loss


class _Layer(nn.Module):
    """A linear map whose odd row counts shard unevenly, and a (1, d) gate: empty on rank 1."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)
        self.gate = nn.Parameter(torch.randn(1, d_out) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x)) * (1.0 + self.gate)


class _Net(nn.Module):
    """Two layers and a (1,) output scale, its own block: that block is empty on rank 1."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            self.layers = nn.ModuleList([_Layer(6, 5), _Layer(5, 3)])
            self.scale = nn.Parameter(torch.tensor([1.3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x * self.scale


NET_BLOCKS = ["layers.0", "layers.1", "scale"]


def _net_loss(model: nn.Module, step: int, rows: slice) -> torch.Tensor:
    gen = torch.Generator().manual_seed(200 + step)
    x, y = torch.randn(4, 6, generator=gen), torch.randn(4, 3, generator=gen)
    return ((model(x[rows]) - y[rows]) ** 2).mean()


def _shard_net(model: nn.Module) -> nn.Module:
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


LossFn = Callable[[nn.Module, int, slice], torch.Tensor]


def _run(model: nn.Module, loss_fn: LossFn, rows: slice, steps: int = STEPS,
         **kwargs: Any) -> tuple[BlockAdam, list[float], dict]:
    """Train with BlockAdam; returns it, the clipping norms seen and the state after step STATE_AT."""
    opt = BlockAdam(model, lr=LR, eps=EPS, weight_decay=0.01, switch_every=K, switch_mode="ascending",
                    **kwargs)
    norms, state = [], {}
    for step in range(steps):
        loss_fn(model, step, rows).backward()
        opt.step()
        if opt.last_grad_norm is not None:
            norms.append(opt.last_grad_norm.item())
        if step == STATE_AT:
            state = opt.state_dict()
    return opt, norms, state


def _my_rows(rank: int) -> slice:
    return slice(2 * rank, 2 * rank + 2)


def _assert_same_full_weights(sharded: nn.Module, ref: nn.Module) -> None:
    ref_params = dict(ref.named_parameters())
    for name, p in sharded.named_parameters():
        assert is_sharded(p), name
        torch.testing.assert_close(p.full_tensor(), ref_params[name], rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"{name}: {m}")


def _local_chunks(tensors: list[torch.Tensor], rank: int) -> list[torch.Tensor]:
    """Rank ``rank``'s dim-0 chunks of full tensors (FSDP2's split), the empty ones left out."""
    chunks = [t.chunk(WORLD, dim=0) for t in tensors]
    return [c[rank] for c in chunks if len(c) > rank and c[rank].numel() > 0]


def _assert_state_is_local_shard(state: dict, ref_state: dict, rank: int) -> None:
    assert state["active_block"] == ref_state["active_block"] == 1
    assert any(t.abs().max() > 0 for t in state["exp_avg"])  # one step into the block: moments are live
    for key in ("master", "exp_avg", "exp_avg_sq"):
        expected = _local_chunks(ref_state[key], rank)
        assert [tuple(t.shape) for t in state[key]] == [tuple(t.shape) for t in expected], key
        for i, (mine, want) in enumerate(zip(state[key], expected)):
            torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-6 * want.abs().max().item(),
                                       msg=lambda m: f"{key}[{i}]: {m}")


# ----------------------------------------------------------------------------- two-rank checks
def _check_equivalence(rank: int, backend: str) -> None:
    """Sharded BlockAdam over 4 switches = 1-process BlockAdam on the whole batch; local-shard arena."""
    ref = _llama()
    ref_opt, _, ref_state = _run(ref, _llama_loss, slice(0, 4), backend="torch", distributed=False)

    model = _shard_llama(_llama())
    fsdp_modules = [model, *model.model.layers]
    params_before = dict(model.named_parameters())
    opt, _, state = _run(model, _llama_loss, _my_rows(rank), backend=backend)

    assert f"backend={backend!r}" in repr(opt)
    assert opt.grad_sync is None  # FSDP2 reduces the gradients; no second all-reduce
    _assert_same_full_weights(model, ref)
    _assert_state_is_local_shard(state, ref_state, rank)
    # requires_grad switched in place: same FSDP modules, same DTensor parameters, no re-wrapping
    assert [model, *model.model.layers] == fsdp_modules
    assert all(isinstance(m, FSDPModule) for m in fsdp_modules)
    after = dict(model.named_parameters())
    assert after.keys() == params_before.keys() and all(after[n] is p for n, p in params_before.items())
    assert opt.active_block == 0
    for name, p in after.items():
        assert p.requires_grad == name.startswith("model.layers.0."), name
    # the arena holds the local shard of the largest block: about half of the 1-process arena
    local_numels = [local_tensor(p).numel() for p in model.model.layers[0].parameters()]
    assert opt.arena.capacity_numel == required_capacity(local_numels)
    assert opt.arena.capacity_numel <= 0.55 * ref_opt.arena.capacity_numel
    assert opt.block_info(0)["arena_bytes"] == 12 * required_capacity(local_numels)


def _check_clipping(rank: int) -> None:
    """max_grad_norm clips by the global norm (every rank's squares), as the 1-process run does."""
    ref = _llama()
    _, ref_norms, _ = _run(ref, _llama_loss, slice(0, 4), backend="torch", distributed=False,
                           max_grad_norm=0.5)
    max_norm = 0.5 * min(ref_norms)
    ref = _llama()
    _, ref_norms, _ = _run(ref, _llama_loss, slice(0, 4), backend="torch", distributed=False,
                           max_grad_norm=max_norm)
    assert min(ref_norms) > max_norm  # every step clips
    model = _shard_llama(_llama())
    _, norms, _ = _run(model, _llama_loss, _my_rows(rank), backend="torch", max_grad_norm=max_norm)
    assert len(norms) == STEPS
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-5, atol=0)
    _assert_same_full_weights(model, ref)


def _check_empty_shards(rank: int) -> None:
    """(1, d) tensors (empty on rank 1) and a block empty on rank 1 as a whole, uneven rows, clipping."""
    steps = 3 * K * 2  # two passes over the 3 blocks
    ref = _Net()
    _, ref_norms, ref_state = _run(ref, _net_loss, slice(0, 4), steps, blocks=NET_BLOCKS,
                                   backend="torch", distributed=False, max_grad_norm=0.05)
    model = _shard_net(_Net())
    empty = sorted(n for n, p in model.named_parameters() if local_tensor(p).numel() == 0)
    assert empty == ([] if rank == 0 else ["layers.0.gate", "layers.1.gate", "scale"]), empty
    seen_blocks = []
    opt = BlockAdam(model, lr=LR, eps=EPS, weight_decay=0.01, switch_every=K, switch_mode="ascending",
                    blocks=NET_BLOCKS, backend="torch", max_grad_norm=0.05)
    opt.add_switch_hook(lambda old, new, info: seen_blocks.append(new))
    norms = []
    for step in range(steps):
        _net_loss(model, step, _my_rows(rank)).backward()
        if opt.active_block == 2:  # the (1,) scale: rank 1 holds nothing, still joins the norm's all-reduce
            assert len(opt.state_dict()["master"]) == (1 if rank == 0 else 0)
        opt.step()
        norms.append(opt.last_grad_norm.item())
        kept = [n for n, p in model.named_parameters() if p.grad is not None]
        assert not kept, f"step {step}: {kept} kept a gradient after step()"
        if step == STATE_AT:
            _assert_state_is_local_shard(opt.state_dict(), ref_state, rank)
    assert seen_blocks == [0, 1, 2, 0, 1, 2, 0]
    assert max(ref_norms) > 0.05  # clipping was active
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-5, atol=0)
    _assert_same_full_weights(model, ref)


def _check_rejections(rank: int) -> None:
    """Data-parallel sync on FSDP2 params, a half-sharded model and non-Shard(0) layouts: clear errors."""
    model = _shard_llama(_llama())
    with pytest.raises(ValueError, match="FSDP2 reduce-scatters their gradients itself"):
        BlockAdam(model, backend="torch", distributed=True)
    with pytest.raises(ValueError, match="FSDP2 reduce-scatters their gradients itself"):
        BlockAdam(model, backend="torch", process_group=dist.group.WORLD)

    half = _llama()
    fully_shard(half.model.layers[0])
    with pytest.raises(ValueError, match=r"some block parameters are FSDP2-sharded DTensors .* and some are plain"):
        BlockAdam(half, backend="torch")

    mesh = init_device_mesh("cpu", (WORLD,))
    full = torch.randn(4, 6)
    for placements, match in (([Replicate()], r"placements \(Replicate\(\),\)"),
                              ([Shard(1)], r"default Shard\(0\) layout only")):
        param = nn.Parameter(distribute_tensor(full, mesh, placements))
        with pytest.raises(ValueError, match=match):
            sharding_of([("w", param)])
    mesh2d = init_device_mesh("cpu", (WORLD, 1))
    param = nn.Parameter(distribute_tensor(full, mesh2d, [Shard(0), Replicate()]))
    with pytest.raises(ValueError, match="2-D device mesh"):
        sharding_of([("w", param)])
    sharded = nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
    sharding = sharding_of([("w", sharded)])
    assert sharding is not None and sharding.world_size == WORLD
    assert local_tensor(sharded).data_ptr() == sharded.to_local().data_ptr()
    assert torch.equal(local_tensor(sharded), full.chunk(WORLD)[rank])


CHECKS: dict[str, Callable[[int], None]] = {
    "equivalence_torch": lambda rank: _check_equivalence(rank, "torch"),
    "equivalence_triton": lambda rank: _check_equivalence(rank, "triton"),
    "clipping": _check_clipping,
    "empty_shards": _check_empty_shards,
    "rejections": _check_rejections,
}


def _checks(rank: int) -> list[tuple[str, Callable[[], None]]]:
    return [(name, functools.partial(check, rank)) for name, check in CHECKS.items()]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[int, str], str]:
    """Run every two-rank check once; per rank the log of passed checks, and the spawn error if any."""
    return spawn_and_collect(_checks, tmp_path_factory.mktemp("fsdp"), WORLD)


@pytest.mark.parametrize("check", list(CHECKS))
def test_two_ranks(two_rank_results: tuple[dict[int, str], str], check: str) -> None:
    logs, error = two_rank_results
    for rank, log in logs.items():
        assert f"ok {check} " in log, f"rank {rank}: check {check!r} did not pass.\n{log}\n{error}"


# ----------------------------------------------------------------------------- single process
def test_plain_parameters_are_not_sharded() -> None:
    model = tiny_model("llama", num_layers=1)
    named = list(model.named_parameters())
    assert sharding_of(named) is None
    weight = named[0][1]
    assert not is_sharded(weight) and local_tensor(weight) is weight
