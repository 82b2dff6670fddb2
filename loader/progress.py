"""Sync progress: a tqdm bar on a terminal, periodic log lines anywhere else.

Progress is measured in bytes of the source file (compressed bytes for gzip), so the
bar knows its end; the row count rides along. Updates come every few tens of thousands
of rows, never per row.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Protocol

from tqdm import tqdm

logger = logging.getLogger(__name__)
#: How often the non-interactive reporter writes a line.
LOG_EVERY_S = 5.0


class Progress(Protocol):
    def update(self, position: int, rows: int) -> None:
        """Reading has got to byte ``position`` of the source, ``rows`` rows read."""

    def close(self) -> None: ...


class NoProgress:
    def update(self, position: int, rows: int) -> None:
        pass

    def close(self) -> None:
        pass


class BarProgress:
    """A tqdm bar on stderr."""

    def __init__(self, name: str, total_bytes: int) -> None:
        self._bar = tqdm(
            total=total_bytes or None,
            desc=name,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
        )

    def update(self, position: int, rows: int) -> None:
        self._bar.update(max(position - self._bar.n, 0))
        self._bar.set_postfix_str(f"{rows:,} rows", refresh=False)

    def close(self) -> None:
        self._bar.refresh()  # the final count, even when the sync beat the redraw interval
        self._bar.close()


class LogProgress:
    """A log line every ``every_s`` seconds: share done, rows and rate."""

    def __init__(self, name: str, total_bytes: int, every_s: float | None = None) -> None:
        self.name = name
        self.total_bytes = total_bytes
        self.every_s = LOG_EVERY_S if every_s is None else every_s
        self._started = self._logged = time.monotonic()

    def update(self, position: int, rows: int) -> None:
        now = time.monotonic()
        if now - self._logged < self.every_s:
            return
        self._logged = now
        rate = rows / max(now - self._started, 1e-9)
        share = ""
        if self.total_bytes:
            share = f"{100 * position / self.total_bytes:.0f}% of the source, "
        logger.info("%s: %s%d rows read (%.0f rows/s)", self.name, share, rows, rate)

    def close(self) -> None:
        pass


def make_progress(name: str, total_bytes: int, mode: str = "auto") -> Progress:
    """``auto``: a bar when stderr is a terminal, log lines otherwise; ``log``; ``off``."""
    if mode == "off":
        return NoProgress()
    if mode == "auto" and sys.stderr.isatty():
        return BarProgress(name, total_bytes)
    return LogProgress(name, total_bytes)
