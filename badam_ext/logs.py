"""Making the ``badam_ext`` logger's INFO records visible when a user asks for them (``verbose``).

Python drops INFO records of a logger nobody configured (only WARNING and above reach the fallback
handler), so ``BlockAdam(..., verbose=1)`` would print nothing. :func:`show_info` sets the logger
to INFO when its level is unset and gives it a stderr handler when no handler would receive its
records; a logging set-up of the application's own (a root handler, say) is used as it is.
"""
from __future__ import annotations

import logging
import sys


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (as logging's own last resort)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    @property
    def stream(self):  # noqa: D102 - the StreamHandler attribute, resolved late
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the late lookup wins
        pass


def show_info(logger: logging.Logger) -> None:
    """Let ``logger``'s INFO records through to a handler (idempotent)."""
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    if not logger.hasHandlers():
        logger.addHandler(_StderrHandler())
