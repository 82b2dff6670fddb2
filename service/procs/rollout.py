"""Replacing a supervisor's workers one at a time, without a moment with fewer listeners.

For each slot in turn: start a new worker beside the old one (both listen on the port
through ``SO_REUSEPORT``), wait until the new one says it listens (a file in the metrics
folder, :func:`service.procs.reload.ready_path`), then send the old one SIGTERM: it
stops listening and drains its connections (:meth:`ConnectionGuard.drain`), so every
call it took is answered and its keep-alive clients move over. Only then does the next
slot start. A new worker that exits, or is not ready within :data:`READY_TIMEOUT_S`,
ends the rollout: the old workers that remain keep serving.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.procs.reload import ReloadMetrics, ready_path
from service.procs.snapshots import retire

logger = logging.getLogger(__name__)

#: How long a new worker may take to listen (imports and the first list load).
READY_TIMEOUT_S = 60.0
#: How often the supervisor looks at a rollout in progress.
POLL_S = 0.05


@dataclass
class Worker:
    slot: int
    process: subprocess.Popen[bytes] | None = None
    worker_id: str = ""
    started_at: float = 0.0
    #: When to (re)start it; ``None`` while it runs.
    start_at: float | None = 0.0
    quick_deaths: int = 0


class Rollout:
    """The state of one rolling replacement of ``workers`` (see the module docstring)."""

    def __init__(
        self,
        workers: list[Worker],
        folder: Path,
        metrics: ReloadMetrics,
        start: Callable[[Worker], None],
        publish: Callable[[], None],
    ) -> None:
        """``start`` starts a worker's process (the supervisor's own start); ``publish``
        writes the supervisor's metrics after an outcome is counted."""
        self.workers = workers
        self.folder = folder
        self.metrics = metrics
        self.start = start
        self.publish = publish
        self.pending: list[int] = []
        self.incoming: tuple[Worker, float] | None = None
        #: Old workers told to stop, with their ids, until they exited.
        self.retiring: list[tuple[subprocess.Popen[bytes], str]] = []

    @property
    def active(self) -> bool:
        return bool(self.pending) or self.incoming is not None or bool(self.retiring)

    def begin(self) -> None:
        """Replace every slot (again, if a rollout is under way: the file changed since)."""
        self.pending = [w.slot for w in self.workers]
        logger.info("replacing %d workers one at a time", len(self.pending))

    def step(self) -> None:
        """Advance: reap retired workers, promote a ready one, or start the next."""
        self._reap_retiring()
        if self.incoming is not None:
            self._watch_incoming()
        elif self.pending:
            new = Worker(self.pending.pop(0))
            self.start(new)
            self.incoming = (new, time.monotonic() + READY_TIMEOUT_S)

    def _watch_incoming(self) -> None:
        assert self.incoming is not None
        new, deadline = self.incoming
        assert new.process is not None
        if ready_path(self.folder, new.worker_id).exists():
            old = self.workers[new.slot]
            if old.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    old.process.send_signal(signal.SIGTERM)
                self.retiring.append((old.process, old.worker_id))
            self.workers[new.slot] = new
            self.incoming = None
            logger.info("worker %d replaced (pid %d)", new.slot, new.process.pid)
            if not self.pending:
                self.metrics.record("applied")
                self.publish()
                logger.info("config reload applied: every worker replaced")
            return
        if new.process.poll() is None and time.monotonic() < deadline:
            return
        if new.process.poll() is None:
            logger.error("new worker pid %d not ready in %.0fs; stopping it",
                         new.process.pid, READY_TIMEOUT_S)  # fmt: skip
            new.process.kill()
            new.process.wait()
        else:
            logger.error("new worker pid %d exited with status %s before it was ready",
                         new.process.pid, new.process.returncode)  # fmt: skip
        self._forget(new.worker_id)
        self.incoming = None
        self.pending = []
        self.metrics.record("failed")
        self.publish()
        logger.error("config reload failed: the workers not yet replaced keep serving")

    def _reap_retiring(self) -> None:
        for process, worker_id in list(self.retiring):
            if process.poll() is not None:
                self.retiring.remove((process, worker_id))
                self._forget(worker_id)

    def _forget(self, worker_id: str) -> None:
        retire(self.folder, worker_id)
        ready_path(self.folder, worker_id).unlink(missing_ok=True)

    def processes(self) -> list[subprocess.Popen[bytes]]:
        """Every process the rollout owns (to stop them with the supervisor)."""
        found = [process for process, _ in self.retiring]
        if self.incoming is not None and self.incoming[0].process is not None:
            found.append(self.incoming[0].process)
        return found
