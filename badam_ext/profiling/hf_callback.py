"""A transformers ``TrainerCallback`` that drives a VramProfiler.

Each optimizer step (``on_step_begin`` to ``on_step_end``: forward and backward of every
micro-batch, then the optimizer step) is one phase named ``"train_step"``. Callbacks cannot see
where forward ends and backward begins, so ``forward``/``backward``/``step`` phases are only
available through the manual API. Block switches are marked through the optimizer's
``add_switch_hook`` when it has one (see ``badam_ext.profiling.recorder``). The report is written
at ``on_train_end``.

    trainer = Trainer(..., callbacks=[VramProfilerCallback(VramProfiler(sample_interval_s=0.05))])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .recorder import VramProfiler
from .report import ProfileReport

PHASE = "train_step"


class VramProfilerCallback(TrainerCallback):
    """Profile a ``Trainer`` run; the report goes to ``output_dir``.

    Args:
        profiler: the profiler to drive (a new ``VramProfiler()`` when None).
        output_dir: where the report is saved; default ``<args.output_dir>/vram_profile``, with a
            ``rank<N>`` subfolder per process when training runs on several processes.
        print_report: print the tables at the end of training (main process only).
    """

    def __init__(self, profiler: VramProfiler | None = None, output_dir: str | os.PathLike[str] | None = None,
                 print_report: bool = True) -> None:
        if profiler is not None and not isinstance(profiler, VramProfiler):
            raise TypeError(f"profiler must be a VramProfiler, got {type(profiler).__name__}")
        self.profiler = profiler if profiler is not None else VramProfiler()
        self.output_dir = output_dir
        self.print_report = print_report
        self.report: ProfileReport | None = None
        self.saved: dict[str, Path] = {}
        self._in_step = False

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if optimizer is not None:
            self.profiler.attach(optimizer)
        self.profiler.start()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._in_step:  # a step that never reached on_step_end (e.g. skipped): close it first
            self.profiler.end(PHASE)
        self.profiler.begin(PHASE)
        self._in_step = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._in_step:
            self.profiler.end(PHASE)
            self._in_step = False

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._in_step:
            self.profiler.end(PHASE)
            self._in_step = False
        self.profiler.stop()
        self.report = self.profiler.report()
        folder = Path(self.output_dir) if self.output_dir is not None else Path(args.output_dir) / "vram_profile"
        if getattr(args, "world_size", 1) > 1:
            folder = folder / f"rank{args.process_index}"
        self.saved = self.report.save(folder)
        if self.print_report and state.is_world_process_zero:
            self.report.print()
