"""Which block is active at each optimizer step.

Every block gets exactly ``switch_every`` (K) steps, the first one included. A *block epoch* visits
each block once, in ``order``:

- ``"ascending"``: ``s, s+1, ..., D-1, 0, ..., s-1`` with ``s = start_block`` (default 0), i.e. the
  cyclic order continued from the start block;
- ``"descending"``: ``s, s-1, ..., 0, D-1, ..., s+1`` (default ``s = D-1``);
- ``"random"``: a fresh permutation each epoch from the schedule's own seeded ``torch.Generator``
  (reproducible, independent of the global RNG). With ``start_block``, the first epoch's
  permutation is moved to begin with it; later epochs are unconstrained (a block may then run twice
  in a row across an epoch boundary);
- ``"fixed"``: always ``start_block`` (required); each epoch is that one block.

``step()`` returns True every K steps: the caller switches (in ``"fixed"`` mode, to the same block,
which restarts its optimizer state) before the next step. ``state_dict()`` holds everything,
the generator state included, so a resumed schedule continues identically.
"""
from __future__ import annotations

from typing import Any

import torch

MODES: tuple[str, ...] = ("ascending", "descending", "random", "fixed")


def _check_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    return value


class BlockSchedule:
    """The active block index of each optimizer step.

    Args:
        num_blocks: D, the number of blocks (>= 1).
        mode: ``"ascending"``, ``"descending"``, ``"random"`` or ``"fixed"``.
        switch_every: K, optimizer steps per block (>= 1).
        start_block: the first block (required for ``"fixed"``).
        seed: seed of the ``"random"`` order.
    """

    def __init__(self, num_blocks: int, mode: str, switch_every: int, start_block: int | None = None,
                 seed: int = 0) -> None:
        self.num_blocks = _check_int(num_blocks, "num_blocks")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.switch_every = _check_int(switch_every, "switch_every")
        if switch_every < 1:
            raise ValueError(f"switch_every (K) must be >= 1, got {switch_every}")
        if start_block is not None:
            _check_int(start_block, "start_block")
            if not 0 <= start_block < num_blocks:
                raise ValueError(f"start_block {start_block} out of range for {num_blocks} blocks")
        elif mode == "fixed":
            raise ValueError("mode='fixed' needs start_block (the block that stays active)")
        self.start_block = start_block
        self.seed = _check_int(seed, "seed")
        self._gen = torch.Generator(device="cpu")
        self._gen.manual_seed(seed)
        self.global_step = 0
        self.steps_in_block = 0
        self.epoch = 0
        self.position = 0
        self.order: tuple[int, ...] = self._make_order(first=True)

    def _make_order(self, first: bool) -> tuple[int, ...]:
        d, s = self.num_blocks, self.start_block
        if self.mode == "fixed":
            return (s,)
        if self.mode == "ascending":
            s = 0 if s is None else s
            return tuple((s + i) % d for i in range(d))
        if self.mode == "descending":
            s = d - 1 if s is None else s
            return tuple((s - i) % d for i in range(d))
        perm = torch.randperm(d, generator=self._gen).tolist()
        if first and s is not None:
            perm.remove(s)
            perm.insert(0, s)
        return tuple(perm)

    @property
    def active(self) -> int:
        """The block index for the next optimizer step."""
        return self.order[self.position]

    def step(self) -> bool:
        """Count one optimizer step; True when the active block changes before the next step."""
        self.global_step += 1
        self.steps_in_block += 1
        if self.steps_in_block < self.switch_every:
            return False
        self.steps_in_block = 0
        self.position += 1
        if self.position == len(self.order):
            self.position = 0
            self.epoch += 1
            self.order = self._make_order(first=False)
        return True

    def __repr__(self) -> str:
        return (f"BlockSchedule(num_blocks={self.num_blocks}, mode={self.mode!r}, switch_every={self.switch_every}, "
                f"active={self.active}, global_step={self.global_step})")

    # --- checkpointing --------------------------------------------------------------------------
    _CONFIG = ("num_blocks", "mode", "switch_every", "start_block", "seed")

    def state_dict(self) -> dict[str, Any]:
        """Configuration, counters, the current epoch's order and the generator state."""
        state: dict[str, Any] = {k: getattr(self, k) for k in self._CONFIG}
        state.update(
            global_step=self.global_step,
            steps_in_block=self.steps_in_block,
            epoch=self.epoch,
            position=self.position,
            order=list(self.order),
            generator=self._gen.get_state().clone(),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; the configuration must equal this schedule's."""
        missing = [k for k in (*self._CONFIG, "global_step", "steps_in_block", "epoch", "position", "order",
                               "generator") if k not in state]
        if missing:
            raise KeyError(f"schedule state_dict lacks {missing}")
        diff = {k: (state[k], getattr(self, k)) for k in self._CONFIG if state[k] != getattr(self, k)}
        if diff:
            raise ValueError("schedule state_dict was saved with another configuration "
                             + ", ".join(f"{k}: saved {a!r}, here {b!r}" for k, (a, b) in diff.items()))
        order = tuple(int(i) for i in state["order"])
        expected = 1 if self.mode == "fixed" else self.num_blocks
        if len(order) != expected or not all(0 <= i < self.num_blocks for i in order):
            raise ValueError(f"schedule state_dict has an invalid order {order}")
        position, in_block = int(state["position"]), int(state["steps_in_block"])
        if not 0 <= position < len(order) or not 0 <= in_block < self.switch_every:
            raise ValueError(f"schedule state_dict has position {position} / steps_in_block {in_block} out of range")
        self._gen.set_state(state["generator"].to("cpu"))  # accelerate moves state_dicts to the GPU
        self.order = order
        self.position = position
        self.steps_in_block = in_block
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
