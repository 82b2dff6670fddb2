"""Connection hygiene for one server process: read timeouts, a cap, recycling, the drain.

:class:`ConnectionGuard` puts four rules around aiohttp's connections, checked by a
sweep every :data:`SWEEP_S` so the request path pays nothing: a request must arrive
whole within ``server.request_timeout_ms``; at most ``server.max_connections``
connections (a newcomer evicts the longest-waiting non-busy ones, never a busy one);
``Connection: close`` after ``server.max_requests_per_connection`` requests; and on
SIGTERM the drain (:meth:`ConnectionGuard.drain`), which closes idle connections and
answers the rest with ``Connection: close``. Without aiohttp's internals
(:func:`guarded_runner`) only recycling and the drain remain. Why: docs/operations.md,
"Connections: timeouts, cap, recycling" and "Stopping".
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import heapq
import logging
import resource
import termios
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from core.config import ServerSettings
from service.edge.aiohttp_adapter import GuardedHandler, GuardedServer, Handler, Internals
from service.edge.dispatch import direct_runner
from service.metrics import Metrics
from service.ratelimit import RateLimitedLog

logger = logging.getLogger(__name__)

#: How often the guard looks for requests that overran the read timeout.
SWEEP_S = 0.25
#: During a drain, connections idle for this long are closed at once (see the module doc).
DRAIN_IDLE_S = 0.5
#: Between closing the listening socket and sending the first ``Connection: close``.
LISTEN_SETTLE_S = 0.25
_DRAIN_POLL_S = 0.01
#: File descriptors kept free for Redis, log files and metrics snapshots.
RESERVED_FDS = 64


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one; return the soft limit now in force.

    Servers commonly run with a soft limit of 1,024 under a much higher hard limit; the
    connection cap is derived from what is in force after this.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return hard if soft == resource.RLIM_INFINITY else soft
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def connection_cap(configured: int, fd_limit: int) -> int:
    """The connections one process may hold: the configured cap, below the fd limit."""
    return max(1, min(configured, fd_limit - RESERVED_FDS))


def _pending_bytes(transport: Any) -> int:
    """Bytes the kernel has received on a connection that nobody has read yet."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return 0
    buffer = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buffer)
    except (OSError, ValueError):
        return 0
    return buffer[0]


def guarded_runner(
    app: web.Application,
    guard: ConnectionGuard,
    internals: Internals,
    *,
    direct: tuple[Handler, ...] = (),
    **kwargs: Any,
) -> web.AppRunner:
    """The runner for the main listener, its connections watched by ``guard``.

    With aiohttp's internals the guard sees every connection (:class:`GuardedServer`);
    without, it watches through a middleware (:meth:`ConnectionGuard.middleware`), which
    must be added before the app starts, and keeps only the rules that allows.
    ``direct``: route handlers whose POSTs skip the router (service/edge/dispatch.py).
    """
    if internals.enabled:
        return direct_runner(
            app, internals, direct=direct, guard=guard, on_server=guard.attach, **kwargs
        )
    guard.public = True

    @web.middleware
    async def watch(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        return await guard.middleware(request, handler)

    app.middlewares.append(watch)
    return web.AppRunner(app, **kwargs)


class _Seen:
    """Public mode: what the guard knows of one connection that sent a request."""

    __slots__ = ("answered_at", "in_flight", "requests")

    def __init__(self, now: float) -> None:
        self.requests = 0
        self.in_flight = 0
        self.answered_at = now


class ConnectionGuard:
    """The rules of the module docstring, for the connections of one server process."""

    def __init__(self, settings: ServerSettings, metrics: Metrics, fd_limit: int) -> None:
        self.max_connections = connection_cap(settings.max_connections, fd_limit)
        self.max_requests = settings.max_requests_per_connection
        self.timeout_sweeps = max(1, round(settings.request_timeout_ms / 1000 / SWEEP_S))
        self.metrics = metrics
        self.server: GuardedServer | None = None
        self.draining = False
        #: Sweeps so far: the clock of the read timeouts (one tick every SWEEP_S).
        self.sweeps = 0
        #: Public mode (no aiohttp internals): only recycling and the drain, through
        #: :meth:`middleware`, for the connections that sent a request.
        self.public = False
        self._seen: weakref.WeakKeyDictionary[Any, _Seen] = weakref.WeakKeyDictionary()
        self._warn = RateLimitedLog(logger, interval_s=10.0)

    def attach(self, server: GuardedServer) -> None:
        """Watch ``server``'s connections (aiohttp's internals in use)."""
        server.guard = self
        self.server = server

    # --- public mode -------------------------------------------------------------------------
    async def middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Recycling and ``Connection: close`` while draining, by aiohttp's public API."""
        transport = request.transport
        loop = asyncio.get_running_loop()
        seen = self._seen.get(transport) if transport is not None else None
        if seen is None:
            seen = _Seen(loop.time())
            if transport is not None:
                self._seen[transport] = seen
        seen.in_flight += 1
        seen.requests += 1
        try:
            response = await handler(request)
        finally:
            seen.in_flight -= 1
            seen.answered_at = loop.time()
        if self.draining or seen.requests >= self.max_requests:
            response.force_close()
        return response

    async def _drain_public(self, deadline: float) -> None:
        """The drain for the connections the middleware saw; aiohttp's cleanup does the rest."""
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            open_now = [(t, s) for t, s in list(self._seen.items()) if not t.is_closing()]
            if not open_now:
                return
            now = loop.time()
            for transport, seen in open_now:
                if (
                    not seen.in_flight
                    and now - seen.answered_at >= DRAIN_IDLE_S
                    and not _pending_bytes(transport)
                ):
                    transport.close()
            await asyncio.sleep(_DRAIN_POLL_S)

    # --- the cap ---------------------------------------------------------------------------
    def admit(self, newcomer: GuardedHandler) -> None:
        """Called for each new connection: make room when over the cap."""
        server = self.server
        if server is None or server.connection_count() <= self.max_connections:
            return
        # Connections closed a moment ago stay listed until their task ends: count the
        # open ones only, or a flood would evict far more than it needs to.
        open_now = [c for c in server.guarded_connections() if c.transport is not None]
        over = len(open_now) - self.max_connections
        if over <= 0:
            return
        # Evicting a few at a time spares a scan per connection during a flood.
        count = max(over, self.max_connections // 64)
        candidates = [c for c in open_now if c is not newcomer and not c.busy]
        # Slow senders (a head begun long ago) before plain idle keep-alive connections.
        victims = heapq.nsmallest(
            count,
            candidates,
            key=lambda c: (
                c.head_since is None,
                c.head_since or 0,
                c.idle_since(),
            ),
        )
        if not victims:
            victims = [newcomer]
        for victim in victims:
            victim.force_close()
            self.metrics.error("overloaded")
        self._warn.warning(
            "over %d connections: closed %d waiting the longest for a request",
            self.max_connections,
            len(victims),
            cause="overloaded",
        )

    # --- read timeouts ---------------------------------------------------------------------
    def sweep(self) -> None:
        """Close connections whose request overran the read timeout."""
        self.sweeps += 1
        server = self.server
        if server is None:
            return
        now = self.sweeps
        limit = self.timeout_sweeps
        late = 0
        for connection in server.guarded_connections():
            request = connection.current_request()
            if request is not None and not request.content.is_eof():
                if connection.body_request is not request:
                    connection.body_request, connection.body_since = request, now
                    continue
                overdue = now - connection.body_since > limit
            else:
                connection.body_request = None
                head = connection.head_since
                overdue = head is not None and now - head > limit
            if overdue and connection.transport is not None:
                connection.timed_out = True
                connection.force_close()
                late += 1
        if late:
            for _ in range(late):
                self.metrics.error("read_timeout")
            self._warn.warning(
                "closed %d connections whose request did not arrive within %.1fs",
                late,
                limit * SWEEP_S,
                cause="read_timeout",
            )

    async def run(self) -> None:
        """Sweep every :data:`SWEEP_S` until cancelled."""
        while True:
            await asyncio.sleep(SWEEP_S)
            self.sweep()

    # --- the drain ---------------------------------------------------------------------------
    async def drain(self, timeout_s: float) -> None:
        """Close every connection as soon as that loses no request (see the module doc).

        Call it once listening has stopped; returns when no connection is left or at
        the timeout.

        It first serves on as usual for :data:`LISTEN_SETTLE_S`. Workers sharing a port
        get SIGTERM together but close their listening sockets a moment apart; a client
        told to reconnect meanwhile could land in the queue of a socket about to close,
        and a queued connection is reset when its socket closes. After the pause every
        socket of the port is closed, so a reconnecting client is refused at once, before
        it sends anything, or, when only this worker stops, reaches the others.
        """
        server = self.server
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if server is None:
            if self.public:
                await asyncio.sleep(LISTEN_SETTLE_S)
                self.draining = True
                await self._drain_public(deadline)
            self.draining = True
            return
        await asyncio.sleep(LISTEN_SETTLE_S)
        self.draining = True
        while server.guarded_connections() and loop.time() < deadline:
            now = loop.time()
            for connection in server.guarded_connections():
                if (
                    connection.transport is not None
                    and not connection.busy
                    and connection.head_since is None
                    and now - connection.idle_since() >= DRAIN_IDLE_S
                    and not _pending_bytes(connection.transport)
                ):
                    connection.force_close()
            await asyncio.sleep(_DRAIN_POLL_S)
        left = len(server.guarded_connections())
        if left:
            logger.warning("%d connections still open after %.0fs; closing them", left, timeout_s)
