"""A one-line progress bar for terminals; silent everywhere else."""

from __future__ import annotations

import time
from typing import TextIO

from sovbackupd.store import human_size

WIDTH = 30
REFRESH_SECONDS = 0.2


class ProgressBar:
    """Draw bytes done against an estimated total on one terminal line."""

    def __init__(self, stream: TextIO) -> None:
        """Draw on *stream*, only if it is a terminal."""
        self._stream = stream
        self.enabled = stream.isatty()
        self._total = 0
        self._drawn_at = 0.0

    def set_total(self, total: int) -> None:
        """Set the estimated number of bytes."""
        self._total = total

    def __call__(self, done: int) -> None:
        """Redraw for *done* bytes: at most every REFRESH_SECONDS, always at the total.

        The caller ends with *done* equal to the total (correcting the estimate), so the
        last state drawn is the finished one.
        """
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._drawn_at < REFRESH_SECONDS and done != self._total:
            return
        self._drawn_at = now
        fraction = min(done / self._total, 1.0) if self._total else 0.0
        filled = int(fraction * WIDTH)
        self._stream.write(
            f"\r[{'#' * filled}{'.' * (WIDTH - filled)}] {fraction:4.0%} {human_size(done)}"
        )
        self._stream.flush()

    def finish(self) -> None:
        """Clear the line."""
        if self.enabled and self._drawn_at:
            self._stream.write("\r" + " " * (WIDTH + 24) + "\r")
            self._stream.flush()
