"""The names ``bench_memory.py``, ``bench_loss.py`` and ``bench_offload.py`` use as ``T.<name>``.

New code imports from the module with the job: ``_harness`` (processes, devices, errors),
``_measure`` (clocks and memory), ``_report`` (records and tables). This module goes once those
scripts import from there.
"""
from __future__ import annotations

from _harness import device_for
from _measure import GIB
from _report import append_jsonl, env_info, first_line, log, print_table

__all__ = ["GIB", "append_jsonl", "device_for", "env_info", "first_line", "log", "print_table"]
