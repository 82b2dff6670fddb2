"""Rate-limited logging, so a Redis outage gives a few lines rather than one per call."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any


class RateLimitedLog:
    """Logs at most one line per cause per ``interval_s``; counts the rest.

    The cause is what went wrong (an ``on_error`` reason, say), not the wording: lines
    for one cause whose details differ still share one limit, and each cause has its
    own, so a frequent cause cannot hide a rarer one. Without a cause, the message
    format is the cause.

    With ``recovered`` (a format taking the cause and a count), a cause not seen for
    ``quiet_s`` gets one INFO line saying how many times it happened in all; the owner
    calls :meth:`settle` now and then (cheap when nothing is going on).
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        recovered: str | None = None,
        quiet_s: float = 1.0,
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self.recovered = recovered
        self.quiet_s = quiet_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        #: Cause -> [times seen since it started, last seen]; only with ``recovered``.
        self.active: dict[str, list[float]] = {}

    def warning(self, msg: str, *args: Any, cause: str | None = None) -> bool:
        """Log ``msg % args`` unless ``cause`` was logged recently; True if logged."""
        key = msg if cause is None else cause
        now = self.clock()
        if self.recovered is not None:
            seen = self.active.setdefault(key, [0, now])
            seen[0] += 1
            seen[1] = now
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            self.logger.warning(msg + " (%d similar suppressed)", *args, suppressed)
        else:
            self.logger.warning(msg, *args)
        return True

    def settle(self) -> None:
        """Log the end of each cause not seen for ``quiet_s`` (with ``recovered`` only)."""
        if not self.active:
            return
        now = self.clock()
        for cause, (count, last) in list(self.active.items()):
            if now - last >= self.quiet_s:
                del self.active[cause]
                assert self.recovered is not None
                self.logger.info(self.recovered, cause, int(count))
