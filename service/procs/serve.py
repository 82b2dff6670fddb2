"""Running one server process: listen, serve, and stop gracefully on SIGTERM/SIGINT.

The stop: stop listening; drain (:meth:`service.edge.connections.ConnectionGuard.drain`:
answers carry ``Connection: close``, idle connections are closed, for up to
:data:`SHUTDOWN_TIMEOUT_S`); then aiohttp's cleanup (refresher, Redis, last metrics).
The drain is ours because aiohttp's shutdown leaves idle keep-alive connections open
and unread, so a request sent on one would go unanswered (docs/operations.md,
"Stopping").
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry

from core.config import Config
from core.logs import batch_logs, flush_logs
from service.appkeys import CONFIG as CONFIG_KEY
from service.appkeys import INTERNALS, METRICS
from service.edge.connections import ConnectionGuard, guarded_runner, raise_fd_limit
from service.operator.admin import ADMIN_TOKENS
from service.operator.offload import OFFLOAD
from service.operator.reload import RELOAD_TARGET, ReloadTarget
from service.procs.reload import Reloader, ReloadMetrics, ready_path
from service.procs.snapshots import FLUSH_S, SharedRegistry

logger = logging.getLogger(__name__)

#: How long a stopping process waits for requests in flight (answers take milliseconds).
SHUTDOWN_TIMEOUT_S = 10.0
#: What aiohttp's cleanup may still wait after the drain (only stuck handlers are left).
_CLEANUP_TIMEOUT_S = 1.0
#: While serving, log lines below WARNING (one per rejected call) are written together
#: this often instead of one write each (core/logs.py, LineHandler).
LOG_FLUSH_S = 0.1
#: Middle-generation passes of the cyclic collector per full pass while serving
#: (CPython's default is 10): see where ``gc.set_threshold`` is called.
FULL_GC_EVERY = 100


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # optional (not on Windows)
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def serve_one(
    config: Config,
    host: str,
    port: int,
    *,
    metrics_dir: Path | None = None,
    worker_id: str | None = None,
    operator: tuple[str, int] | None = None,
    lists_dir: Path | None = None,
    config_path: Path | None = None,
    workers: int | None = None,
) -> int:
    """Run the service in this process until SIGTERM/SIGINT; returns the exit status.

    With ``metrics_dir`` and ``worker_id`` this process is one worker of a
    :class:`service.procs.workers.Supervisor`: it binds with ``SO_REUSEPORT``, shares its
    metrics through the folder (and its numbers lists through ``lists_dir``), and stops
    if the supervisor goes away. SIGHUP re-reads ``config_path`` and applies what can
    change in place (:mod:`service.procs.reload`). ``workers``: how many processes serve
    the config, this one included (None: ``server.workers``).
    """
    from service.app import create_app, create_operator_app

    registry: CollectorRegistry
    if metrics_dir is not None and worker_id is not None:
        registry = SharedRegistry(metrics_dir, worker_id)
    else:
        registry = CollectorRegistry()
    app = create_app(
        config,
        registry=registry,
        operator_routes=operator is None,
        lists_dir=lists_dir,
        workers=workers,
    )
    operator_app = create_operator_app(app) if operator is not None else None
    admin_app = operator_app if operator_app is not None else app
    if OFFLOAD in admin_app:
        admin_app[OFFLOAD].start_early = True
    worker = isinstance(registry, SharedRegistry)
    # POST /v1/reload asks whoever reloads: the supervisor, or this process.
    hup = None
    if config_path is not None:
        # Not resolved: the path may be a symlink a kubelet swaps (service/__main__.py).
        target = ReloadTarget(os.getppid() if worker else os.getpid(), config_path.absolute())
        for served in (app, operator_app):
            if served is not None:
                served[RELOAD_TARGET] = target
        # A worker's reloads are counted by its supervisor.
        hup = Reloader(
            app,
            config_path,
            None if worker else ReloadMetrics(registry),
            admin_app.get(ADMIN_TOKENS),
        )
    if isinstance(registry, SharedRegistry):
        # Cleaned up in reverse: the last snapshot is written before an orphan's clean-up.
        app.cleanup_ctx.append(_orphan_ctx(os.getppid(), registry.folder, lists_dir))
        app.cleanup_ctx.append(_flush_ctx(registry))
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(
            _serve(
                app,
                host,
                port,
                reuse_port=metrics_dir is not None,
                who=worker_id or "service",
                hup=hup,
                operator=(operator_app, *operator) if operator_app and operator else None,
                ready_file=(
                    ready_path(registry.folder, worker_id)
                    if isinstance(registry, SharedRegistry) and worker_id is not None
                    else None
                ),
            )
        )
    return 0


async def _serve(
    app: web.Application,
    host: str,
    port: int,
    *,
    reuse_port: bool,
    who: str,
    hup: Reloader | None = None,
    operator: tuple[web.Application, str, int] | None = None,
    ready_file: Path | None = None,
) -> None:
    """Serve ``app`` until SIGTERM/SIGINT; ``ready_file`` is made once it listens."""
    from service.app import DIRECT_HANDLERS

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before start-up, so a signal while the lists load still ends in a clean stop.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # SIGHUP's default action would end the process.
    loop.add_signal_handler(signal.SIGHUP, hup.start if hup else _hup_ignored, who)
    settings = app[CONFIG_KEY].server
    guard = ConnectionGuard(settings, app[METRICS], raise_fd_limit())
    runner = guarded_runner(
        app,
        guard,
        app[INTERNALS],
        direct=DIRECT_HANDLERS,
        access_log=None,
        shutdown_timeout=_CLEANUP_TIMEOUT_S,
        keepalive_timeout=settings.keepalive_timeout_s,
    )
    await runner.setup()
    # The operator listener shares the main app's resources: set up after it, cleaned
    # up before it (service/app.py).
    operator_runner = None
    if operator is not None:
        operator_runner = web.AppRunner(
            operator[0], access_log=None, shutdown_timeout=_CLEANUP_TIMEOUT_S,
            keepalive_timeout=settings.keepalive_timeout_s,
        )  # fmt: skip
        await operator_runner.setup()
    sweeper = asyncio.create_task(guard.run(), name="connection-guard")
    flusher = asyncio.create_task(_flush_logs(), name="log-flusher")
    try:
        if not stop.is_set():
            # What start-up made (config, libraries, list indexes) lives as long as the
            # process: kept out of the cyclic collector's scans, which then look at the
            # requests' objects only (gc.freeze; about 0.5 % of the CPU per call).
            gc.collect()
            gc.freeze()
            # Full passes a tenth as often: each scans every object that outlived two
            # young passes (the subscriber entries cache, a connection's state) and
            # holds the loop for milliseconds, which the calls queued meanwhile wait.
            young, middle, _ = gc.get_threshold()
            gc.set_threshold(young, middle, FULL_GC_EVERY)
            site = web.TCPSite(runner, host, port, reuse_port=reuse_port)
            await site.start()
            if operator_runner is not None and operator is not None:
                _app, operator_host, operator_port = operator
                operator_site = web.TCPSite(
                    operator_runner, operator_host, operator_port, reuse_port=reuse_port
                )
                await operator_site.start()
                logger.info(
                    "%s serves the admin API, explain and /metrics on http://%s:%d",
                    who, operator_host, operator_port,
                )  # fmt: skip
            if guard.public:
                logger.info(
                    "%s listening on http://%s:%d (aiohttp public API: no connection cap,"
                    " no read timeout)", who, host, port,
                )  # fmt: skip
            else:
                logger.info(
                    "%s listening on http://%s:%d (at most %d connections)",
                    who, host, port, guard.max_connections,
                )  # fmt: skip
            if ready_file is not None:
                ready_file.touch()  # noqa: ASYNC240 (once, before any call is taken)
            await stop.wait()
            logger.info("%s stopping: no new connections; finishing requests in flight", who)
            await site.stop()
            await guard.drain(SHUTDOWN_TIMEOUT_S)
    finally:
        for task in (sweeper, flusher):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        batch_logs(False)
        if operator_runner is not None:
            await operator_runner.cleanup()
        await runner.cleanup()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    logger.info("%s stopped", who)


def _hup_ignored(who: str) -> None:
    logger.warning("%s: SIGHUP ignored: no config file to re-read", who)


async def _flush_logs() -> None:
    """Batch the log lines below WARNING while serving; write them every LOG_FLUSH_S."""
    batch_logs(True)
    while True:
        await asyncio.sleep(LOG_FLUSH_S)
        flush_logs()


def _flush_ctx(registry: SharedRegistry) -> Callable[[web.Application], AsyncIterator[None]]:
    async def flush_ctx(app: web.Application) -> AsyncIterator[None]:
        async def flush_forever() -> None:
            while True:
                await asyncio.sleep(FLUSH_S)
                try:
                    registry.flush()
                except OSError as exc:
                    logger.warning("cannot write metrics snapshot: %s", exc)

        registry.flush()
        task = asyncio.create_task(flush_forever(), name="metrics-flush")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        try:
            registry.flush()  # runs after in-flight requests finished: the final counts
        except OSError as exc:  # the folder is gone with the supervisor
            logger.warning("cannot write the last metrics snapshot: %s", exc)

    return flush_ctx


def _orphan_ctx(
    parent_pid: int, metrics_dir: Path, lists_dir: Path | None = None
) -> Callable[[web.Application], AsyncIterator[None]]:
    """Stop when the supervisor is gone; then remove the folders it cannot (metrics, lists)."""
    orphaned = False

    async def orphan_ctx(app: web.Application) -> AsyncIterator[None]:
        async def watch() -> None:
            nonlocal orphaned
            # Nothing signals a parent's death to a process in its own group: poll.
            while True:
                await asyncio.sleep(1.0)
                if os.getppid() != parent_pid:
                    break
            orphaned = True
            logger.warning("supervisor %d is gone; stopping", parent_pid)
            os.kill(os.getpid(), signal.SIGTERM)

        task = asyncio.create_task(watch(), name="orphan-watch")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if orphaned:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            if lists_dir is not None:
                shutil.rmtree(lists_dir, ignore_errors=True)

    return orphan_ctx
