"""A daemon thread that calls a sampling function at a fixed interval."""

from __future__ import annotations

import threading
from typing import Callable

from .nvml import logger


class Sampler:
    """Calls ``sample()`` once at start and then every ``interval_s`` seconds until ``stop()``.

    An exception from ``sample()`` is logged once and sampling goes on, so a flaky reading never
    kills a training run.
    """

    def __init__(self, sample: Callable[[], None], interval_s: float) -> None:
        if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)):
            raise TypeError(f"sample_interval_s must be a number, got {type(interval_s).__name__}")
        if not interval_s > 0:
            raise ValueError(f"sample_interval_s must be > 0, got {interval_s}")
        self._sample = sample
        self.interval_s = float(interval_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed = False

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the thread (no-op when it is already running)."""
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="vram-profiler-sampler", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the thread to finish and join it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        while True:
            try:
                self._sample()
            except Exception as exc:  # noqa: BLE001 - keep the training run alive
                if not self._failed:
                    self._failed = True
                    logger.warning("VRAM profiler: a sample failed (%s: %s); sampling goes on",
                                   type(exc).__name__, exc)
            if self._stop.wait(self.interval_s):
                return
