"""The aiohttp application factory: ``create_app(config)``, no I/O until it starts.

Resources are set up by ``cleanup_ctx`` generators, in order: the Redis client, then the
list cache with its refresh task (which needs the client) and the folder its numbers
bases are shared through (service/screening/shared_lists.py): the supervisor's, for a worker, or
one of its own, removed when the app stops. The service starts whether or
not Redis answers; ``/readyz`` says when it is ready, and the refresher reconnects by
itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from core.config import Config
from core.connect import connect, redact
from core.store import ListStore, RedisClient
from service.appkeys import (
    AUTH,
    CACHE,
    CONFIG,
    INTERNALS,
    METRICS,
    REDIS,
    REGISTRY,
    SCREENER,
    STORE,
    WORKERS,
)
from service.edge.aiohttp_adapter import resolve
from service.edge.auth import HandlerAuth
from service.edge.errors import json_errors, no_route
from service.edge.handlers import healthz, readyz, readyz_brief, screen
from service.metrics import Metrics
from service.operator.admin import add_admin_routes, admin_only
from service.operator.console import add_console_routes
from service.operator.explain import explain
from service.operator.lookup import add_lookup_routes
from service.operator.reload import reload_config
from service.operator.subscribers import add_subscriber_routes
from service.procs.ports import worker_count
from service.screening.cache import ListCache
from service.screening.history import CallHistory
from service.screening.lists import ListObject
from service.screening.screen import Screener
from service.screening.shared_lists import (
    SharedBases,
    UnsafeFolder,
    configure_allocator,
    make_folder,
    parent_folder,
    remove_folder,
)
from service.screening.stir import make_verifier, wanted

logger = logging.getLogger(__name__)
#: How long start-up waits for the first list load before serving anyway.
STARTUP_LOAD_WAIT_S = 5.0


#: Route handlers whose POSTs the main listener takes without the router
#: (service/edge/dispatch.py; their routes are the first ones :func:`create_app` adds).
DIRECT_HANDLERS = (screen,)


def create_app(
    config: Config,
    *,
    redis: RedisClient | None = None,
    registry: CollectorRegistry | None = None,
    operator_routes: bool = True,
    lists_dir: Path | None = None,
    workers: int | None = None,
) -> web.Application:
    """Build the service. A ``redis`` client passed in is used as is and not closed.

    ``operator_routes=False`` leaves out the admin API, explain and /metrics: they are
    then served by :func:`create_operator_app` on a listener of their own.
    ``lists_dir``: the folder numbers bases are shared through, made by the supervisor
    for all its workers (left in place); without it, the app makes its own.
    ``workers``: the processes serving this config (None: ``server.workers``), which
    ``stir.signature_helper: auto`` weighs against the cores.
    """
    # No middleware: errors are answered per route (see service/edge/errors.py).
    app = web.Application(client_max_size=config.server.max_body_bytes)
    app[CONFIG] = config
    app[REGISTRY] = registry if registry is not None else CollectorRegistry()
    app[METRICS] = Metrics(config, app[REGISTRY])
    app[AUTH] = HandlerAuth(config, app[METRICS])  # secrets from the environment
    app[INTERNALS] = resolve(config.server.aiohttp_internals)
    app[WORKERS] = worker_count(config.server.workers if workers is None else workers)
    app.cleanup_ctx.append(_redis_ctx(redis))
    app.cleanup_ctx.append(_lists_ctx(lists_dir))
    app.cleanup_ctx.append(_history_ctx)
    app.cleanup_ctx.append(_stir_ctx)

    app.router.add_post("/", screen)
    app.router.add_post("/tg/{trunk_group}", screen)
    # The same two with the shared secret as a path segment (service/edge/auth.py).
    app.router.add_post("/k/{secret}", screen)
    app.router.add_post("/k/{secret}/tg/{trunk_group}", screen)
    # Beside an operator listener, the handler port's /readyz gives no details.
    _add_probes(app, details=operator_routes)
    if operator_routes:
        _add_operator_routes(app)
    app.router.add_route("*", "/{path:.*}", no_route)  # last: 404 and 405, as JSON
    return app


def create_operator_app(main: web.Application) -> web.Application:
    """The operator listener's app: admin API, explain, /metrics and the probes.

    It shares everything with ``main`` (config, metrics, Redis, list copies), which must
    be started first: the shared resources are copied over when this one starts.
    """
    app = web.Application(client_max_size=main[CONFIG].server.max_body_bytes)
    app[CONFIG] = main[CONFIG]
    app[REGISTRY] = main[REGISTRY]
    app[METRICS] = main[METRICS]
    app[AUTH] = main[AUTH]

    async def share_started(app: web.Application) -> None:
        app[REDIS] = main[REDIS]
        app[STORE] = main[STORE]
        app[CACHE] = main[CACHE]
        app[SCREENER] = main[SCREENER]

    app.on_startup.append(share_started)
    _add_probes(app, details=True)
    _add_operator_routes(app)
    app.router.add_route("*", "/{path:.*}", no_route)
    return app


def _add_probes(app: web.Application, *, details: bool) -> None:
    app.router.add_get("/healthz", json_errors(healthz))
    app.router.add_get("/readyz", json_errors(readyz if details else readyz_brief))


def _add_operator_routes(app: web.Application) -> None:
    app.router.add_post("/v1/explain", json_errors(explain))
    app.router.add_post("/v1/explain/tg/{trunk_group}", json_errors(explain))
    app.router.add_get("/metrics", json_errors(make_aiohttp_handler(app[REGISTRY])))
    add_admin_routes(app)  # /v1/lists..., /v1/openapi.json (service/operator/admin.py)
    add_subscriber_routes(app)  # /v1/lists/{name}/subscribers/... (service/operator/subscribers.py)
    add_lookup_routes(app)  # /v1/whoami, /v1/audit, /v1/history, /v1/lookup
    add_console_routes(app)  # /console (service/operator/console.py)
    app.router.add_post("/v1/reload", admin_only(reload_config))


def _redis_ctx(given: RedisClient | None):  # type: ignore[no-untyped-def]
    async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG]
        client = given or connect(
            config.redis.url,
            socket_timeout_s=config.redis.socket_timeout_ms / 1000,
            client_name="callscreen-service",
        )
        app[REDIS] = client
        app[STORE] = ListStore(client)
        logger.info("using Redis at %s", redact(config.redis.url))
        yield
        await app[STORE].drain()
        if given is None:
            await client.aclose()

    return redis_ctx


async def _stir_ctx(app: web.Application) -> AsyncIterator[None]:
    """STIR/SHAKEN verification, when a policy uses it (service/screening/stir/)."""
    config = app[CONFIG]
    if not wanted(config):
        yield
        return
    verifier = make_verifier(config, app[REDIS], app[METRICS], app[WORKERS])
    app[SCREENER].stir = verifier
    if verifier.helper is not None:
        await verifier.helper.start()
    try:
        yield
    finally:
        if verifier.helper is not None:
            await verifier.helper.close()
        await verifier.certs.close()


def _shared_bases(
    config: Config, given: Path | None
) -> tuple[SharedBases | None, tuple[Path, int] | None]:
    """The shared numbers bases, and the folder made here with its owner lock, if any."""
    if not config.cache.share_lists:
        return None, None
    made = None
    try:
        folder = given
        if folder is None:
            made = make_folder(parent_folder(config.cache.share_dir))
            folder = made[0]
        return SharedBases(folder), made
    except (OSError, ValueError, UnsafeFolder) as exc:
        logger.error("numbers lists are not shared (%s): this process keeps its own copies", exc)
        if made is not None:
            remove_folder(*made)
        return None, None


def _lists_ctx(lists_dir: Path | None) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lists_ctx(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG]
        metrics = app[METRICS]
        kinds = {name: spec.kind for name, spec in config.lists.items()}
        configure_allocator()  # before the first list is indexed (see shared_lists)
        shared, made = _shared_bases(config, lists_dir)
        sourced = [name for name, spec in config.lists.items() if spec.source]
        cache = ListCache(app[STORE], kinds, config.cache, sourced=sourced, shared=shared)

        def loaded(name: str, copy: ListObject, synced_at: float) -> None:
            metrics.list_entries.labels(name).set(copy.size)
            metrics.list_synced.labels(name).set(synced_at)

        cache.on_load = loaded
        cache.on_private = lambda name: metrics.list_private_copies.labels(name).inc()
        cache.on_poll = metrics.redis_poll.observe
        metrics.redis_health.stale = cache.stale
        metrics.redis_health.nodes = app[STORE].dispatcher.nodes
        app[CACHE] = cache
        app[SCREENER] = Screener(config, cache, app[STORE], metrics)
        # Serve with the lists loaded when Redis is there; start anyway when it is not.
        try:
            async with asyncio.timeout(STARTUP_LOAD_WAIT_S):
                await cache.load_all()
        except Exception as exc:
            logger.warning(
                "lists not loaded at start-up (%s); serving by on_error until they are", exc
            )
        refresher = asyncio.create_task(cache.run(), name="list-refresher")
        try:
            yield
        finally:
            await cache.close(refresher)
            if shared is not None:
                shared.close()
            if made is not None:
                # Mapped files stay readable until the last list object using them goes.
                remove_folder(*made)

    return lists_ctx


async def _history_ctx(app: web.Application) -> AsyncIterator[None]:
    """Call history (service/screening/history.py): its writer runs while the app does."""
    config = app[CONFIG]
    if not config.history.enabled:
        yield
        return
    history = CallHistory(config, app[REDIS], app[METRICS])
    app[SCREENER].history = history
    writer = asyncio.create_task(history.run(), name="call-history")
    try:
        yield
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await history.flush()  # the last records, within history.write_timeout_ms
