"""Block switch order: K steps per block, orders, random reproducibility, resume, validation."""
from __future__ import annotations

import io

import pytest
import torch

from badam_ext.schedule import MODES, BlockSchedule


def run(sched: BlockSchedule, steps: int) -> tuple[list[int], list[bool]]:
    """The active block of each of ``steps`` steps, and each step's switch flag."""
    active, switched = [], []
    for _ in range(steps):
        active.append(sched.active)
        switched.append(sched.step())
    return active, switched


def test_every_block_gets_exactly_k_steps_first_included() -> None:
    k, d = 3, 4
    active, switched = run(BlockSchedule(d, "ascending", k), 2 * d * k)
    assert active == [b for _ in range(2) for b in range(d) for _ in range(k)]
    # The switch flag is set on the last step of every block, never elsewhere.
    assert [i for i, s in enumerate(switched) if s] == [k * j - 1 for j in range(1, 2 * d + 1)]


def test_counters() -> None:
    s = BlockSchedule(3, "ascending", 2)
    run(s, 7)
    assert (s.global_step, s.steps_in_block, s.epoch, s.position, s.active) == (7, 1, 1, 0, 0)
    assert s.order == (0, 1, 2)


@pytest.mark.parametrize(
    "mode, start, expected",
    [
        ("ascending", None, [0, 1, 2, 3, 0, 1]),
        ("ascending", 2, [2, 3, 0, 1, 2, 3]),
        ("descending", None, [3, 2, 1, 0, 3, 2]),
        ("descending", 1, [1, 0, 3, 2, 1, 0]),
        ("fixed", 2, [2, 2, 2, 2, 2, 2]),
    ],
)
def test_deterministic_orders(mode: str, start: int | None, expected: list[int]) -> None:
    s = BlockSchedule(4, mode, 1, start_block=start)
    active, switched = run(s, 6)
    assert active == expected and all(switched)


def test_fixed_switch_flag_every_k() -> None:
    active, switched = run(BlockSchedule(5, "fixed", 3, start_block=4), 9)
    assert active == [4] * 9 and switched == [False, False, True] * 3


def epochs_of(sched: BlockSchedule, n: int) -> list[list[int]]:
    active, _ = run(sched, n * sched.num_blocks)
    return [active[i * sched.num_blocks:(i + 1) * sched.num_blocks] for i in range(n)]


def test_random_is_a_fresh_permutation_each_epoch() -> None:
    d = 7
    epochs = epochs_of(BlockSchedule(d, "random", 1, seed=3), 6)
    assert all(sorted(e) == list(range(d)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1, "the order is reshuffled between epochs"


def test_random_reproducible_and_independent_of_global_rng() -> None:
    a = BlockSchedule(8, "random", 2, seed=11)
    torch.manual_seed(0)
    seq_a, _ = run(a, 64)
    state = torch.get_rng_state()
    b = BlockSchedule(8, "random", 2, seed=11)
    seq_b = []
    for i in range(64):
        torch.manual_seed(1000 + i)  # global RNG churn must not matter
        torch.rand(3)
        seq_b.append(b.active)
        b.step()
    assert seq_a == seq_b
    torch.set_rng_state(state)
    c = BlockSchedule(8, "random", 2, seed=12)
    run(c, 64)
    assert torch.equal(torch.get_rng_state(), state), "the schedule must not consume the global RNG"
    assert run(BlockSchedule(8, "random", 2, seed=12), 64)[0] != seq_a


def test_random_start_block_leads_first_epoch_only() -> None:
    for seed in range(5):
        epochs = epochs_of(BlockSchedule(6, "random", 1, start_block=4, seed=seed), 3)
        assert epochs[0][0] == 4 and sorted(epochs[0]) == list(range(6))
    firsts = {epochs_of(BlockSchedule(6, "random", 1, start_block=4, seed=s), 3)[1][0] for s in range(12)}
    assert len(firsts) > 1, "later epochs are unconstrained permutations"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [0, 5, 7, 12])
def test_resume_continues_identically(mode: str, n: int) -> None:
    def make() -> BlockSchedule:
        return BlockSchedule(4, mode, 3, start_block=1 if mode == "fixed" else None, seed=5)

    first = make()
    run(first, n)
    saved = first.state_dict()
    expected = run(first, 60)
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    resumed = make()
    run(resumed, 2)  # a fresh schedule that already moved on: load must overwrite everything
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert run(resumed, 60) == expected
    assert resumed.global_step == first.global_step and resumed.epoch == first.epoch


def test_state_dict_is_a_snapshot() -> None:
    s = BlockSchedule(5, "random", 1, seed=0)
    saved = s.state_dict()
    run(s, 12)
    fresh = BlockSchedule(5, "random", 1, seed=0)
    fresh.load_state_dict(saved)
    assert run(fresh, 12) == run(BlockSchedule(5, "random", 1, seed=0), 12)


def test_load_state_dict_refuses_mismatches() -> None:
    saved = BlockSchedule(4, "random", 2, seed=1).state_dict()
    for other in (BlockSchedule(5, "random", 2, seed=1), BlockSchedule(4, "ascending", 2),
                  BlockSchedule(4, "random", 3, seed=1), BlockSchedule(4, "random", 2, seed=2)):
        with pytest.raises(ValueError, match="another configuration"):
            other.load_state_dict(saved)
    target = BlockSchedule(4, "random", 2, seed=1)
    with pytest.raises(KeyError, match="generator"):
        target.load_state_dict({k: v for k, v in saved.items() if k != "generator"})
    with pytest.raises(ValueError, match="invalid order"):
        target.load_state_dict({**saved, "order": [0, 1, 2, 9]})
    with pytest.raises(ValueError, match="out of range"):
        target.load_state_dict({**saved, "steps_in_block": 2})


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((4, "shuffle", 2), {}, ValueError, "mode must be one of"),
        ((4, "ascending", 0), {}, ValueError, "switch_every"),
        ((4, "ascending", 1.5), {}, TypeError, "switch_every must be an int"),
        ((4, "ascending", True), {}, TypeError, "switch_every must be an int"),
        ((0, "ascending", 1), {}, ValueError, "num_blocks must be >= 1"),
        ((4, "ascending", 1), {"start_block": 4}, ValueError, "start_block 4 out of range"),
        ((4, "random", 1), {"start_block": -1}, ValueError, "start_block -1 out of range"),
        ((4, "fixed", 1), {}, ValueError, "needs start_block"),
        ((4, "random", 1), {"seed": "x"}, TypeError, "seed must be an int"),
    ],
)
def test_validation(args: tuple, kwargs: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        BlockSchedule(*args, **kwargs)


def test_single_block() -> None:
    for mode in MODES:
        s = BlockSchedule(1, mode, 2, start_block=0)
        assert run(s, 6) == ([0] * 6, [False, True] * 3)
