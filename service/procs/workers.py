"""Serving on every core: a supervisor and N worker processes sharing one port.

One worker runs in the calling process (:func:`service.procs.serve.serve_one`). With
several, :class:`Supervisor` starts N fresh interpreters (not forks), each in its own
process group, binding host:port with ``SO_REUSEPORT``; it restarts a dead worker (with
a growing delay), forwards SIGTERM/SIGINT as one SIGTERM each and exits 0 when all
stopped. What workers share is shared on purpose, through folders the supervisor makes
and removes: metrics snapshots and the mapped numbers lists. A worker whose supervisor
vanished stops within a second. SIGHUP re-reads the config: the workers swap policies
in place, or are replaced one at a time (:mod:`service.procs.reload`,
:mod:`service.procs.rollout`); SIGUSR2 hands over to a new supervisor running the code
installed now (:mod:`service.procs.upgrade`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from core.config import Config
from service.operator.reload import check_config
from service.procs.ports import reserve_port
from service.procs.reload import (
    ReloadMetrics,
    in_place,
    log_refused,
    log_restart_keys,
    ready_path,
    restart_only_changes,
)
from service.procs.rollout import POLL_S, Rollout, Worker
from service.procs.serve import SHUTDOWN_TIMEOUT_S
from service.procs.snapshots import retire, snapshot, write_json
from service.procs.upgrade import start_successor, watch_successor
from service.screening.shared_lists import make_folder, remove_folder

logger = logging.getLogger(__name__)

#: How long the supervisor waits for workers to stop before killing them.
STOP_GRACE_S = SHUTDOWN_TIMEOUT_S + 5.0
#: A worker that exits sooner than this after its start is restarted after a delay.
MIN_UPTIME_S = 5.0
RESTART_DELAYS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
SUPERVISOR_ID = "supervisor"


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
        config: tuple[Path, Config] | None = None,
        own_argv: Sequence[str] = (),
        upgrade_from: int | None = None,
    ) -> None:
        """``worker_argv``: arguments for ``python -m service`` that every worker gets;
        ``operator``: the admin/metrics listener's address, shared by the workers too;
        ``share_parent``: where to make the folder the workers share numbers lists
        through (None: they do not share); ``config``: the file SIGHUP re-reads and
        the config read from it at start; ``own_argv``: this supervisor's arguments,
        for the successor SIGUSR2 starts; ``upgrade_from``: the pid of the supervisor
        this one takes over from (see :mod:`service.procs.upgrade`)."""
        self.host = host
        self.port = port
        self.operator = operator
        self.workers = [Worker(slot) for slot in range(workers)]
        self.worker_argv = list(worker_argv)
        self.stop_signal: int | None = None
        self._serial = 0
        self._registry = CollectorRegistry()
        self._metrics = SupervisorMetrics(self._registry, workers)
        self._folder = Path()
        self.share_parent = share_parent
        #: The shared lists folder and the descriptor holding it (see make_folder).
        self._lists: tuple[Path, int] | None = None
        self.config = config
        self.own_argv = list(own_argv)
        self.upgrade_from = upgrade_from
        self._reload_metrics = ReloadMetrics(self._registry)
        #: The config the workers serve (the last one applied).
        self._serving = config[1] if config is not None else None
        self._rollout: Rollout | None = None
        self._hup = False
        self._usr2 = False
        self._successor: subprocess.Popen[bytes] | None = None

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; 0 when every worker stopped cleanly."""
        try:
            shared = self.upgrade_from is None
            reserved = reserve_port(self.host, self.port, exclusive=shared)
        except OSError as exc:
            logger.error("cannot listen on %s:%d: %s", self.host, self.port, exc)
            return 1
        self.port = reserved.getsockname()[1]
        reserved_operator = None
        if self.operator is not None:
            try:
                reserved_operator = reserve_port(*self.operator, exclusive=shared)
            except OSError as exc:
                logger.error("cannot listen on %s:%d: %s", *self.operator, exc)
                reserved.close()
                return 1
            self.operator = (self.operator[0], reserved_operator.getsockname()[1])
        self._folder = Path(tempfile.mkdtemp(prefix="callscreen-metrics-"))
        self._rollout = Rollout(
            self.workers, self._folder, self._reload_metrics, self._start, self._write_metrics
        )
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
                self._on_signals()
                self._start_due()
                self._rollout.step()
                self._take_over()
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

        def hup(signum: int, frame: FrameType | None) -> None:
            self._hup = True

        def usr2(signum: int, frame: FrameType | None) -> None:
            self._usr2 = True

        previous: dict[int, Any] = {
            sig: signal.signal(sig, handler)
            for sig, handler in (
                (signal.SIGTERM, stop),
                (signal.SIGINT, stop),
                (signal.SIGCHLD, child),
                (signal.SIGHUP, hup),
                (signal.SIGUSR2, usr2),
            )
        }
        signal.set_wakeup_fd(wake_fd, warn_on_full_buffer=False)
        return previous

    def _on_signals(self) -> None:
        self._successor = watch_successor(self._successor)
        if self._hup:
            self._hup = False
            self.reload()
        if self._usr2:
            self._usr2 = False
            self._successor = start_successor(self._successor, self.own_argv, self.host,
                                              self.port, self.operator)  # fmt: skip

    def reload(self) -> None:
        """Re-read the config file; roll a good one out to the workers (module reload)."""
        if self.config is None or self._rollout is None:
            logger.warning("SIGHUP: no config file to re-read")
            return
        path, first = self.config
        logger.info("SIGHUP: re-reading %s", path)
        config, problems = check_config(path)
        if config is None:
            log_refused(path, problems)
            self._reload_metrics.record("invalid")
            self._write_metrics()
            return
        log_restart_keys(restart_only_changes(first, config))
        serving, self._serving = self._serving or first, config
        if in_place(serving, config) and not self._rollout.active:
            # Each worker re-reads the file and swaps between two requests.
            logger.info("config reload: policies/auth only; the workers swap in place")
            for worker in self.workers:
                if worker.process is not None:
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.send_signal(signal.SIGHUP)
            self._reload_metrics.record("applied")
            self._write_metrics()
            return
        self._rollout.begin()

    def _take_over(self) -> None:
        """After an upgrade: once every worker listens, stop the supervisor replaced."""
        if self.upgrade_from is None:
            return
        if all(
            w.process is not None and ready_path(self._folder, w.worker_id).exists()
            for w in self.workers
        ):
            logger.info("upgrade: every new worker listens; stopping the old supervisor %d",
                        self.upgrade_from)  # fmt: skip
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.upgrade_from, signal.SIGTERM)
            self.upgrade_from = None

    def _sleep_s(self) -> float:
        if self.upgrade_from is not None or (self._rollout and self._rollout.active):
            return POLL_S
        now = time.monotonic()
        due = [w.start_at - now for w in self.workers if w.start_at is not None]
        return max(0.0, min(due, default=5.0))

    def _start_due(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if worker.start_at is not None and worker.start_at <= now:
                self._start(worker)

    def _start(self, worker: Worker) -> None:
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
            ready_path(self._folder, worker.worker_id).unlink(missing_ok=True)
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
        if self._rollout is not None:
            running += self._rollout.processes()
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
