"""The live progress line on stderr: one line rewritten with a carriage return."""

from __future__ import annotations

import time
from typing import TextIO

UPDATE_INTERVAL_S = 0.5


class ProgressLine:
    """Rewrites one status line about twice a second; silent when disabled (``--quiet``)."""

    def __init__(self, stream: TextIO, enabled: bool, interval: float = UPDATE_INTERVAL_S) -> None:
        self.stream = stream
        self.enabled = enabled
        self.interval = interval
        self._last_update = -float("inf")
        self._width = 0

    def due(self, now: float | None = None) -> bool:
        """Whether the next ``show`` would be drawn now."""
        now = time.perf_counter() if now is None else now
        return self.enabled and now - self._last_update >= self.interval

    def show(self, text: str, now: float | None = None) -> None:
        """Draw ``text`` over the previous line."""
        if not self.enabled:
            return
        self._last_update = time.perf_counter() if now is None else now
        padding = " " * max(0, self._width - len(text))
        self._width = len(text)
        self.stream.write(f"\r{text}{padding}")
        self.stream.flush()

    def finish(self) -> None:
        """End the line, leaving the last state visible."""
        if self.enabled and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
