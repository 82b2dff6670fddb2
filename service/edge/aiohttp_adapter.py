"""The one door to aiohttp's internals: every private name the service uses is here.

Three speed-ups and the connection guard reach past aiohttp's public API: the screening
answer written whole (:class:`WholeAnswer`), screening calls matched without the router
(:class:`RawDispatch`, :class:`InternalRunner`) and the guard's per-connection
bookkeeping (:class:`GuardedHandler`, :class:`GuardedServer`), which also stamps each
request with when its first bytes were read from the socket, so that
``handler.deadline_ms`` runs from the request's arrival (``GuardedHandler.arrived``,
read by the screening handler). In public
mode there is no such stamp and the deadline runs from the handler's entry: time a
request spent queued behind another one on its connection (pipelining) or parsed while
the loop was busy is not counted. :func:`resolve` decides at
start-up whether they may be used: the aiohttp version must be in the range whose
internals this module knows and every attribute it touches must exist. Otherwise the
service runs on the public API (``web.Response``, the router, a public-mode guard);
what that mode lacks is in docs/operations.md, "aiohttp internals".
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any, Literal, Protocol

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server
from aiohttp.web_urldispatcher import UrlMappingMatchInfo
from multidict import CIMultiDictProxy

if TYPE_CHECKING:
    from asyncio import BaseTransport

logger = logging.getLogger(__name__)

Mode = Literal["auto", "on", "off"]
#: Overrides ``server.aiohttp_internals`` (for test runs and emergencies).
ENV = "CALLSCREEN_AIOHTTP_INTERNALS"
#: The aiohttp releases whose internals this module was written against: from
#: KNOWN_FROM up to, not including, KNOWN_BEFORE. Outside it the attributes may exist
#: and mean something else, so ``auto`` does not use them.
KNOWN_FROM = (3, 14, 5)
KNOWN_BEFORE = (3, 15)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Known = tuple[UrlMappingMatchInfo, Handler] | Literal[False]

#: (where, attribute) pairs this module reads or writes.
_RESPONSE_ATTRS = (
    "_state", "_headers", "_status", "_reason", "_keep_alive",
    "_payload_writer", "_eof_sent", "_req", "_body_length",
)  # fmt: skip
_REQUEST_ATTRS = ("_match_info", "_payload_writer")
_HANDLER_ATTRS = (
    "_messages", "_request_count", "_next_keepalive_close_time", "_keepalive_timeout",
    "_current_request", "_request_in_progress",
)  # fmt: skip
_SERVER_ATTRS = ("_loop", "_kwargs", "_connections", "request_handler", "request_factory",
                 "handler_cancellation")  # fmt: skip


class InternalsUnavailable(RuntimeError):
    """``server.aiohttp_internals: on`` but this aiohttp's internals are not the known ones."""


@dataclass(frozen=True)
class Internals:
    """Whether this process uses aiohttp's internals, and why not when it does not."""

    enabled: bool
    reason: str = ""


def version_tuple(version: str) -> tuple[int, ...]:
    """``"3.14.5"`` -> ``(3, 14, 5)``; a pre-release suffix is ignored (``3.15.0a1``)."""
    numbers = []
    for part in version.split(".")[:3]:
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        numbers.append(int(digits.group()))
    return tuple(numbers)


def missing_internals(version: str | None = None) -> str | None:
    """Why aiohttp's internals cannot be used here, or None when they can."""
    found = version_tuple(version or aiohttp.__version__)
    if not KNOWN_FROM <= found < KNOWN_BEFORE:
        low = ".".join(map(str, KNOWN_FROM))
        high = ".".join(map(str, KNOWN_BEFORE))
        shown = version or aiohttp.__version__
        return f"aiohttp {shown} is outside the range whose internals are known ({low} to <{high})"
    gaps = [f"StreamResponse.{n}" for n in _RESPONSE_ATTRS if not _has(web.StreamResponse, n)]
    gaps += [f"Request.{n}" for n in _REQUEST_ATTRS if not _has(web.Request, n)]
    gaps += [f"RequestHandler.{n}" for n in _HANDLER_ATTRS if not _has(RequestHandler, n)]
    gaps += [f"Server.{n}" for n in _SERVER_ATTRS if not _has(Server, n)]
    if not callable(getattr(web.AppRunner, "_make_server", None)):
        gaps.append("AppRunner._make_server")
    if gaps:
        return "aiohttp lacks " + ", ".join(gaps)
    return None


def _has(cls: type, name: str) -> bool:
    """Whether instances of ``cls`` get attribute ``name``: a slot, a class attribute or
    an assignment ``self.<name> = ...`` in the source of one of its classes."""
    assigned = re.compile(rf"self\.{re.escape(name)}\s*(:[^=\n]+)?=(?!=)")
    for klass in cls.__mro__:
        if name in getattr(klass, "__slots__", ()) or name in vars(klass):
            return True
        if klass.__module__.startswith("aiohttp"):
            try:
                if assigned.search(inspect.getsource(klass)):
                    return True
            except (OSError, TypeError):
                continue
    return False


_logged: set[str] = set()


def resolve(setting: Mode, environ: dict[str, str] | None = None) -> Internals:
    """The mode for this process: ``setting``, or the :data:`ENV` variable when set.

    ``off``: public API only. ``on``: internals, or :class:`InternalsUnavailable`.
    ``auto``: internals when :func:`missing_internals` finds nothing, else the public
    API, with the reason logged once at INFO.
    """
    env = (os.environ if environ is None else environ).get(ENV, "").strip().lower()
    if env:
        if env not in ("auto", "on", "off"):
            raise ValueError(f"{ENV} must be auto, on or off, not {env!r}")
        setting = env  # type: ignore[assignment]
    if setting == "off":
        return Internals(False, "aiohttp internals switched off")
    reason = missing_internals()
    if reason is None:
        return Internals(True)
    if setting == "on":
        raise InternalsUnavailable(f"server.aiohttp_internals is on, but {reason}")
    if reason not in _logged:
        _logged.add(reason)
        logger.info("serving through aiohttp's public API: %s", reason)
    return Internals(False, reason)


# --- the answer written whole ---------------------------------------------------------------
class _Heads(Protocol):
    def __call__(self, minor: int, keep_alive: bool, length: int) -> bytes: ...


class WholeAnswer(web.StreamResponse):
    """``200`` with a pre-encoded ``body``, written in one piece by :meth:`write_eof`.

    Subclasses set :attr:`heads` (the bytes before the body) and :attr:`fixed_headers`
    (what ``headers`` shows, read-only).
    """

    heads: _Heads
    fixed_headers: CIMultiDictProxy[str]

    def __init__(self, body: bytes) -> None:
        # What StreamResponse.__init__ sets (the rest are class defaults), without a
        # header multidict of its own: the headers come from ``heads``.
        self._state = {}
        self._headers = self.fixed_headers  # type: ignore[assignment]
        self._status = 200
        self._reason = "OK"
        self._answer = body

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        if self._eof_sent:
            return None
        if self._payload_writer is None:
            if self._keep_alive is None:
                self._keep_alive = request.keep_alive
            self._req = request
            self._payload_writer = request._payload_writer
        return self._payload_writer

    async def write_eof(self, data: bytes = b"") -> None:
        assert not data, "the body is given to the constructor"
        if self._eof_sent:
            return
        request, writer = self._req, self._payload_writer
        assert request is not None and writer is not None, "prepare() first"
        body = self._answer
        head = self.heads(request.version.minor, bool(self._keep_alive), len(body))
        # No headers were given to the writer: it sends these bytes as they are, with its
        # own checks for a closed connection and its back-pressure wait.
        await writer.write_eof(head + body)
        self._eof_sent = True
        self._body_length = len(body)
        self._req = None
        self._payload_writer = None


# --- screening calls without the router -----------------------------------------------------
class RawDispatch:
    """``handler(request)`` for aiohttp's server: known POST paths direct, the rest routed.

    Subclasses provide :meth:`look_up` (the match for a raw path, False for the router's
    way) and fill :attr:`known`; ``fallback`` is ``Application._handle``.
    """

    def __init__(self, fallback: Callable[[BaseRequest], Awaitable[web.StreamResponse]]) -> None:
        self.fallback = fallback
        self.known: dict[str, Known] = {}

    def look_up(self, path: str) -> Known:
        raise NotImplementedError

    def __call__(self, request: BaseRequest) -> Awaitable[web.StreamResponse]:
        # A plain method handing back the handler's coroutine: no frame of its own.
        if request.method == "POST" and "Expect" not in request.headers:
            path = request.raw_path.partition("?")[0]
            known = self.known.get(path)
            if known is None:
                known = self.look_up(path)
            if known is not False:
                info, handler = known
                request._match_info = info  # type: ignore[attr-defined]
                return handler(request)  # type: ignore[arg-type]
        return self.fallback(request)


# --- the connection guard's bookkeeping ------------------------------------------------------
class Guard(Protocol):
    """What :class:`GuardedHandler` tells the guard and asks of it."""

    sweeps: int
    draining: bool
    max_requests: int

    def admit(self, newcomer: GuardedHandler) -> None: ...


class GuardedHandler(RequestHandler):
    """aiohttp's connection protocol, with the bookkeeping the guard needs and the
    arrival time of each request.

    Arrival: when a read starts a new request (no head incomplete, no body still
    expected, not only whitespace), its time is noted; each message aiohttp's parser
    completes gets the time its head's first bytes came (later messages completed by the
    same read: that read's time), queued in :attr:`arrivals` beside aiohttp's own queue
    of messages, and :class:`GuardedServer` hands it to the request made from that
    message as :attr:`arrived`. Invariant: a stamp is never earlier than the first byte
    of its request (when unsure, a later one is taken): the bytes of a request
    pipelined behind another one's body in the same read count from the read that
    completes its head, and requests aiohttp held back while its queue was full count
    from when they are parsed.

    The extra work on the request path is a clock reading per read and an attribute or
    two per read and per answer.
    """

    __slots__ = (
        "arrivals", "arrived", "body", "body_request", "body_since", "guard", "head_at",
        "head_since", "timed_out",
    )  # fmt: skip

    guard: Guard
    #: Sweep count when the first byte of a request head still incomplete arrived.
    head_since: int | None
    #: The request whose body is being read, and the sweep count when that was noticed.
    body_request: BaseRequest | None
    body_since: int
    #: Closed by the guard for overrunning the read timeout.
    timed_out: bool
    #: ``perf_counter()`` when the first byte of the head being parsed arrived, if any.
    head_at: float | None
    #: The body of the last message parsed, while more of it is expected (a read before
    #: its end is more of it, not a new request).
    body: StreamReader | None
    #: The arrival of each parsed message not yet made a request, oldest first.
    arrivals: deque[float]
    #: The arrival of the request being handled (``perf_counter()``).
    arrived: float

    def connection_made(self, transport: BaseTransport) -> None:
        self.head_since = None
        self.body_request = None
        self.body_since = 0
        self.timed_out = False
        self.head_at = None
        self.body = None
        self.arrivals = deque()
        self.arrived = 0.0
        super().connection_made(transport)
        self.guard.admit(self)

    def data_received(self, data: bytes) -> None:
        if self.head_since is None and not self._request_in_progress:
            self.head_since = self.guard.sweeps
        head_at = self.head_at
        if head_at is None and data and not data.isspace():
            # A new request starts unless a body is still expected; a lone CRLF between
            # requests (some clients send one) and aiohttp's re-parse of what it held
            # back (no data) start nothing.
            body = self.body
            if body is None or body.is_eof():
                head_at = self.head_at = perf_counter()
        count = self._request_count
        super().data_received(data)
        if self._messages:
            self.head_since = None
        parsed = self._request_count - count
        if parsed:
            self.arrivals.append(perf_counter() if head_at is None else head_at)
            if parsed > 1:
                self._also_arrived(parsed - 1)
            self.head_at = None
            last = self._messages[-1][1]
            self.body = None if last.is_eof() else last

    def _also_arrived(self, count: int) -> None:
        """Stamp ``count`` more messages completed by this read with its time."""
        now = perf_counter()
        self.arrivals.extend([now] * count)

    def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> Coroutine[Any, Any, tuple[web.StreamResponse, bool]]:
        # A plain method handing back aiohttp's coroutine: no extra frame per request.
        self.head_since = None  # bytes that came in while the request was handled were body
        if self.guard.draining or self._request_count >= self.guard.max_requests:
            resp.force_close()
        return super().finish_response(request, resp, start_time)

    @property
    def busy(self) -> bool:
        """A request is being handled, or one is parsed and waiting for its turn."""
        return self._request_in_progress or bool(self._messages)

    def idle_since(self) -> float:
        """Loop time of the last answer (or of the connection's start)."""
        return self._next_keepalive_close_time - self._keepalive_timeout

    def current_request(self) -> BaseRequest | None:
        return self._current_request


class GuardedServer(Server):
    """aiohttp's protocol factory, making :class:`GuardedHandler` connections, whose
    requests it hands their arrival (:attr:`GuardedHandler.arrived`)."""

    guard: Guard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        make = self.request_factory

        def stamped(
            message: Any, payload: Any, protocol: Any, writer: Any, task: Any
        ) -> BaseRequest:
            # aiohttp makes each request right after taking its message off the queue,
            # one at a time per connection: the oldest stamp is this message's.
            arrivals = protocol.arrivals
            protocol.arrived = arrivals.popleft() if arrivals else perf_counter()
            return make(message, payload, protocol, writer, task)

        self.request_factory = stamped

    def __call__(self) -> RequestHandler:
        handler = GuardedHandler(self, loop=self._loop, **self._kwargs)
        handler.guard = self.guard
        return handler

    def connection_count(self) -> int:
        """Connections aiohttp lists (closed ones stay listed until their task ends)."""
        return len(self._connections)

    def guarded_connections(self) -> list[GuardedHandler]:
        return [c for c in self._connections if isinstance(c, GuardedHandler)]


class InternalRunner(web.AppRunner):
    """An ``AppRunner`` whose server takes ``direct`` POSTs through ``dispatch`` and,
    with a ``guard``, makes :class:`GuardedHandler` connections."""

    def __init__(
        self,
        app: web.Application,
        *,
        dispatch: Callable[[Callable[[BaseRequest], Awaitable[web.StreamResponse]]], RawDispatch]
        | None = None,
        guard: Guard | None = None,
        on_server: Callable[[GuardedServer], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self.dispatch = dispatch
        self.guard = guard
        self.on_server = on_server

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        if self.dispatch is not None:
            server.request_handler = self.dispatch(server.request_handler)
        if self.guard is None:
            return server
        guarded = GuardedServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )
        guarded.guard = self.guard
        if self.on_server is not None:
            self.on_server(guarded)
        return guarded


def request_handler(runner: web.BaseRunner) -> object:
    """The callable the runner's server hands requests to (tests look at it)."""
    server = runner.server
    return None if server is None else server.request_handler
