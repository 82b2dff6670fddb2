"""Rate-limited logging, so a Redis outage gives a few lines rather than one per call."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any


class RateLimitedLog:
    """Logs at most one line per message format per ``interval_s``; counts the rest."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, msg: str, *args: Any) -> bool:
        """Log ``msg % args`` unless the same ``msg`` was logged recently; True if logged."""
        now = self.clock()
        last = self._last.get(msg)
        if last is not None and now - last < self.interval_s:
            self._suppressed[msg] = self._suppressed.get(msg, 0) + 1
            return False
        self._last[msg] = now
        suppressed = self._suppressed.pop(msg, 0)
        if suppressed:
            self.logger.warning(msg + " (%d similar suppressed)", *args, suppressed)
        else:
            self.logger.warning(msg, *args)
        return True
