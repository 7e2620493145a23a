"""Running named checks in spawned ranks and collecting, per rank, which of them passed."""
from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Callable, Iterable

import torch.multiprocessing as mp


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


def spawn_and_collect(worker: Callable, out: Path, world: int) -> tuple[dict[int, str], str]:
    """``mp.spawn(worker, (init_file, out_dir))`` on ``world`` ranks; each rank's log and the spawn error."""
    error = ""
    try:
        mp.spawn(worker, args=(str(out / "init"), str(out)), nprocs=world, join=True)
    except Exception as exc:  # the failing check is in the logs; keep the message for the report
        error = str(exc)
    logs = {r: (out / f"rank{r}.txt").read_text() if (out / f"rank{r}.txt").exists() else "" for r in range(world)}
    return logs, error
