"""Running named checks in spawned ranks and collecting, per rank, which of them passed."""
from __future__ import annotations

import datetime
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Checks = Sequence[tuple[str, Callable[[], None]]]


def run_logged(log: Path, checks: Iterable[tuple[str, Callable[[], None]]]) -> None:
    """Run ``checks`` in order, appending ``ok NAME SECONDS`` or ``FAILED NAME`` + traceback to ``log``."""
    for name, check in checks:
        t0 = time.perf_counter()
        try:
            check()
        except BaseException:
            with log.open("a") as f:
                f.write(f"FAILED {name}\n{traceback.format_exc()}\n")
            raise
        with log.open("a") as f:
            f.write(f"ok {name} {time.perf_counter() - t0:.2f}\n")


def _gloo_worker(rank: int, init_file: str, out_dir: str, world: int, make_checks: Callable[[int], Checks]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        run_logged(Path(out_dir) / f"rank{rank}.txt", make_checks(rank))
    finally:
        dist.destroy_process_group()


def spawn_and_collect(make_checks: Callable[[int], Checks], out: Path, world: int) -> tuple[dict[int, str], str]:
    """Run ``make_checks(rank)`` in ``world`` gloo ranks; each rank's log of checks, and the spawn error.

    ``make_checks`` must be a module-level function (it is pickled into the spawned processes).
    """
    error = ""
    try:
        mp.spawn(_gloo_worker, args=(str(out / "init"), str(out), world, make_checks), nprocs=world, join=True)
    except Exception as exc:  # the failing check is in the logs; keep the message for the report
        error = str(exc)
    logs = {r: (out / f"rank{r}.txt").read_text() if (out / f"rank{r}.txt").exists() else "" for r in range(world)}
    return logs, error
