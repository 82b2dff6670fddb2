"""Serving on every core: a supervisor and N worker processes sharing one port.

One worker runs in the calling process (:func:`service.procs.serve.serve_one`). With
several, :class:`Supervisor` starts N fresh interpreters (not forks), each in its own
process group, binding host:port with ``SO_REUSEPORT``; it restarts a dead worker (with
a growing delay), forwards SIGTERM/SIGINT as one SIGTERM each and exits 0 when all
stopped. What workers share is shared on purpose, through folders the supervisor makes
and removes: metrics snapshots and the mapped numbers lists. A worker whose supervisor
vanished stops within a second.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from service.procs.serve import SHUTDOWN_TIMEOUT_S
from service.procs.snapshots import retire, snapshot, write_json
from service.screening.shared_lists import make_folder, remove_folder

logger = logging.getLogger(__name__)

#: How long the supervisor waits for workers to stop before killing them.
STOP_GRACE_S = SHUTDOWN_TIMEOUT_S + 5.0
#: A worker that exits sooner than this after its start is restarted after a delay.
MIN_UPTIME_S = 5.0
RESTART_DELAYS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
SUPERVISOR_ID = "supervisor"


def worker_count(configured: int) -> int:
    """``server.workers`` or ``--workers`` as a number of processes (0: one per core).

    "Core" means one this process may run on (a container's cpuset), not every core of
    the host; a CPU *quota* (``docker --cpus``) is not visible here: set ``workers``.
    """
    if configured > 0:
        return configured
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) host:port with ``SO_REUSEPORT``.

    Fails fast when anything listens there already, even another service whose workers
    would otherwise share the port silently; picks the port when ``port`` is 0; and
    keeps other programs off it while workers come and go. A bound socket that does not
    listen gets no connections: the workers' listening sockets share them.
    """
    family, kind, proto, _name, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as probe:  # without SO_REUSEPORT: exclusive
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        address = (address[0], probe.getsockname()[1], *address[2:])
    sock = socket.socket(family, kind, proto)
    try:
        # SO_REUSEADDR too, like the workers' own sockets: without it the bind fails
        # while connections of an earlier run on this port linger in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class _Worker:
    slot: int
    process: subprocess.Popen[bytes] | None = None
    worker_id: str = ""
    started_at: float = 0.0
    #: When to (re)start it; ``None`` while it runs.
    start_at: float | None = 0.0
    quick_deaths: int = 0


class SupervisorMetrics:
    """The supervisor's own metrics, shared with the workers' through the folder."""

    def __init__(self, registry: CollectorRegistry, workers: int) -> None:
        self.restarts = Counter(
            "callscreen_worker_restarts_total",
            "Worker processes restarted after they exited unexpectedly.",
            registry=registry,
        )
        self.workers = Gauge(
            "callscreen_workers", "Worker processes configured.", registry=registry
        )
        self.workers.set(workers)


class Supervisor:
    """Starts, watches and stops the worker processes (see the module docstring)."""

    def __init__(
        self,
        host: str,
        port: int,
        workers: int,
        worker_argv: Sequence[str],
        *,
        operator: tuple[str, int] | None = None,
        share_parent: Path | None = None,
    ) -> None:
        """``worker_argv``: arguments for ``python -m service`` that every worker gets;
        ``operator``: the admin/metrics listener's address, shared by the workers too;
        ``share_parent``: where to make the folder the workers share numbers lists
        through (None: they do not share)."""
        self.host = host
        self.port = port
        self.operator = operator
        self.workers = [_Worker(slot) for slot in range(workers)]
        self.worker_argv = list(worker_argv)
        self.stop_signal: int | None = None
        self._serial = 0
        self._registry = CollectorRegistry()
        self._metrics = SupervisorMetrics(self._registry, workers)
        self._folder = Path()
        self.share_parent = share_parent
        #: The shared lists folder and the descriptor holding it (see make_folder).
        self._lists: tuple[Path, int] | None = None

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; 0 when every worker stopped cleanly."""
        try:
            reserved = reserve_port(self.host, self.port)
        except OSError as exc:
            logger.error("cannot listen on %s:%d: %s", self.host, self.port, exc)
            return 1
        self.port = reserved.getsockname()[1]
        reserved_operator = None
        if self.operator is not None:
            try:
                reserved_operator = reserve_port(*self.operator)
            except OSError as exc:
                logger.error("cannot listen on %s:%d: %s", *self.operator, exc)
                reserved.close()
                return 1
            self.operator = (self.operator[0], reserved_operator.getsockname()[1])
        self._folder = Path(tempfile.mkdtemp(prefix="callscreen-metrics-"))
        if self.share_parent is not None:
            try:
                self._lists = make_folder(self.share_parent)
            except OSError as exc:
                logger.error(
                    "cannot make a folder in %s to share lists through (%s): each worker "
                    "keeps its own copies", self.share_parent, exc,
                )  # fmt: skip
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        previous = self._install_signals(wake_w)
        try:
            self._write_metrics()
            logger.info(
                "serving on http://%s:%d with %d workers", self.host, self.port, len(self.workers)
            )
            while self.stop_signal is None:
                self._start_due()
                select.select([wake_r], [], [], self._sleep_s())
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 1024)
                self._reap()
            logger.info("signal %d: stopping %d workers", self.stop_signal, len(self.workers))
            return self._stop_all()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)
            reserved.close()
            if reserved_operator is not None:
                reserved_operator.close()
            shutil.rmtree(self._folder, ignore_errors=True)
            if self._lists is not None:
                remove_folder(*self._lists)

    def _install_signals(self, wake_fd: int) -> dict[int, Any]:
        def stop(signum: int, frame: FrameType | None) -> None:
            if self.stop_signal is None:
                self.stop_signal = signum

        def child(signum: int, frame: FrameType | None) -> None:
            pass  # the wake-up fd is what matters: it ends the select()

        previous: dict[int, Any] = {
            sig: signal.signal(sig, handler)
            for sig, handler in (
                (signal.SIGTERM, stop),
                (signal.SIGINT, stop),
                (signal.SIGCHLD, child),
            )
        }
        signal.set_wakeup_fd(wake_fd, warn_on_full_buffer=False)
        return previous

    def _sleep_s(self) -> float:
        now = time.monotonic()
        due = [w.start_at - now for w in self.workers if w.start_at is not None]
        return max(0.0, min(due, default=5.0))

    def _start_due(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if worker.start_at is not None and worker.start_at <= now:
                self._start(worker)

    def _start(self, worker: _Worker) -> None:
        self._serial += 1
        worker.worker_id = f"worker-{self._serial}"
        argv = [
            sys.executable, "-m", "service", *self.worker_argv,
            "--host", self.host, "--port", str(self.port),
            "--worker-id", worker.worker_id, "--metrics-dir", str(self._folder),
        ]  # fmt: skip
        if self._lists is not None:
            argv += ["--lists-dir", str(self._lists[0])]
        if self.operator is None:
            argv += ["--admin-port", "none"]
        else:
            argv += ["--admin-host", self.operator[0], "--admin-port", str(self.operator[1])]
        worker.process = subprocess.Popen(argv, process_group=0)
        worker.started_at = time.monotonic()
        worker.start_at = None
        logger.info("worker %d started (pid %d)", worker.slot, worker.process.pid)

    def _reap(self) -> None:
        for worker in self.workers:
            process = worker.process
            if process is None or process.poll() is None:
                continue
            worker.process = None
            retire(self._folder, worker.worker_id)
            if self.stop_signal is not None:
                continue
            uptime_s = time.monotonic() - worker.started_at
            worker.quick_deaths = worker.quick_deaths + 1 if uptime_s < MIN_UPTIME_S else 0
            delay_s = (
                RESTART_DELAYS_S[min(worker.quick_deaths, len(RESTART_DELAYS_S)) - 1]
                if worker.quick_deaths
                else 0.0
            )
            logger.warning(
                "worker %d (pid %d) exited with status %s after %.1fs; restarting in %.1fs",
                worker.slot, process.pid, process.returncode, uptime_s, delay_s,
            )  # fmt: skip
            worker.start_at = time.monotonic() + delay_s
            self._metrics.restarts.inc()
            self._write_metrics()

    def _write_metrics(self) -> None:
        write_json(self._folder / f"{SUPERVISOR_ID}.json", snapshot(self._registry))

    def _stop_all(self) -> int:
        running = [w.process for w in self.workers if w.process is not None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        clean = True
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("worker pid %d did not stop in %.0fs; killing it", process.pid,
                             STOP_GRACE_S)  # fmt: skip
                process.kill()
                process.wait()
            # -SIGTERM: it was still starting, with nothing in flight.
            if process.returncode not in (0, -signal.SIGTERM):
                clean = False
                logger.warning("worker pid %d exited with status %s", process.pid,
                               process.returncode)  # fmt: skip
        logger.info("all workers stopped")
        return 0 if clean else 1
