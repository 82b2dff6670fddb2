"""A lean pipelined Redis connection for the calls' batches (auto-pipelining on the wire).

One :class:`Link` per Redis node holds one connection. A caller's commands are encoded
to RESP at once and queued; the queue is written in one ``write`` at the end of the
event-loop turn, so every call of a turn shares one round trip; replies are parsed by
hiredis and handed back in order (Redis answers a connection's commands in the order
sent). redis-py does the same work through a pipeline object, a connection checkout and
a parser per batch, which costs several times more per call (docs/design.md,
"Auto-pipelining, on the call path's own connection").

Invariants:

- each caller gets exactly its own replies, in its order, error replies included as
  exception objects (as redis-py's ``raise_on_error=False``); replies are as Redis
  sends them, without redis-py's response callbacks (``b"OK"``, not ``True``; EXPIRE's
  ``1``, not ``True``), so callers read integers, bulk strings and arrays only;
- a caller that stopped waiting before the turn's write is left out of it (its commands
  are never sent); one that stops later still has its replies read and dropped;
- a lost connection fails every caller waiting on it with :class:`LinkError`, and the
  next caller connects again; a connection whose oldest command has waited
  ``stall_s`` is closed (a node that stopped answering), failing its callers;
- a caller's ``timeout_s`` fails it alone with ``TimeoutError`` when it passes, as
  ``asyncio.timeout`` would, but from one timer per link armed for the earliest
  deadline, not one per call. The link keeps its event loop rather than asking for it
  per call: CPython's ``asyncio.get_running_loop()`` makes a ``getpid`` system call.

Only plain TCP connections are served this way, with or without a password or an ACL
user (:func:`settings_of`); TLS, Unix sockets, credential providers and Sentinel keep
redis-py's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import hiredis
from redis import exceptions as errors
from redis.asyncio import ConnectionPool
from redis.asyncio.connection import Connection, SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError, ResponseError

#: How long a connection may leave its oldest command unanswered when the client sets no
#: ``socket_timeout``.
DEFAULT_STALL_S = 2.0
#: A deadline this close is taken as passed (the loop's timers fire to the millisecond).
DEADLINE_SLACK_S = 0.001


class LinkError(RedisConnectionError):
    """The connection failed before a caller's replies came."""


@dataclass(frozen=True, slots=True)
class Settings:
    """What a :class:`Link` needs to connect, taken from a redis-py pool's settings."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    db: int = 0
    client_name: str | None = None
    connect_timeout_s: float = DEFAULT_STALL_S
    stall_s: float = DEFAULT_STALL_S

    def at(self, host: str, port: int) -> Settings:
        """The same settings for another node (a Cluster's)."""
        return Settings(
            host, port, self.username, self.password, self.db, self.client_name,
            self.connect_timeout_s, self.stall_s,
        )  # fmt: skip


def settings_of(pool: ConnectionPool) -> Settings | None:
    """Settings for a :class:`Link` to the pool's server, or None where the pool needs
    what a Link does not do (TLS, a Unix socket, a credential provider, a
    Sentinel-managed pool)."""
    kind = pool.connection_class
    if type(pool) is not ConnectionPool or not issubclass(kind, Connection):
        return None
    if issubclass(kind, SSLConnection):
        return None
    kwargs = pool.connection_kwargs
    if kwargs.get("credential_provider") is not None or "path" in kwargs:
        return None
    stall = kwargs.get("socket_timeout") or DEFAULT_STALL_S
    return Settings(
        host=str(kwargs.get("host", "localhost")),
        port=int(kwargs.get("port", 6379)),
        username=kwargs.get("username"),
        password=kwargs.get("password"),
        db=int(kwargs.get("db", 0) or 0),
        client_name=kwargs.get("client_name"),
        connect_timeout_s=float(kwargs.get("socket_connect_timeout") or stall),
        stall_s=float(stall),
    )


def encode(commands: Sequence[Sequence[Any]]) -> bytes:
    """The RESP encoding of ``commands`` (each a command name and its arguments: str,
    bytes, int or float), by hiredis's packer: the bytes redis-py sends for them."""
    return b"".join([hiredis.pack_command(tuple(command)) for command in commands])


# The RESP text of the commands every Redis-backed call sends, composed in one f-string
# each: packing them one argument at a time (hiredis formats each length with sprintf)
# took more than twice as long for a call-rate rule's commands. The lengths are
# characters, right only for ASCII text, which :func:`ascii_bytes` checks once for the
# whole call before it is sent.
def incrby_one(key: str) -> str:
    """``INCRBY key 1``."""
    return f"*3\r\n$6\r\nINCRBY\r\n${len(key)}\r\n{key}\r\n$1\r\n1\r\n"


def get(key: str) -> str:
    """``GET key``."""
    return f"*2\r\n$3\r\nGET\r\n${len(key)}\r\n{key}\r\n"


def expire(key: str, seconds: int) -> str:
    """``EXPIRE key seconds``."""
    text = str(seconds)
    return f"*3\r\n$6\r\nEXPIRE\r\n${len(key)}\r\n{key}\r\n${len(text)}\r\n{text}\r\n"


def zadd_one(key: str, score: str, member: str) -> str:
    """``ZADD key score member`` (``score`` as text: core.fraud writes it to the millisecond)."""
    return (
        f"*4\r\n$4\r\nZADD\r\n${len(key)}\r\n{key}\r\n${len(score)}\r\n{score}\r\n"
        f"${len(member)}\r\n{member}\r\n"
    )


def zrangebyscore_after(key: str, low: str) -> str:
    """``ZRANGEBYSCORE key low +inf`` (``low`` as sent, e.g. ``(`` and a score)."""
    return (
        f"*4\r\n$13\r\nZRANGEBYSCORE\r\n${len(key)}\r\n{key}\r\n${len(low)}\r\n{low}\r\n"
        "$4\r\n+inf\r\n"
    )


def zremrangebyrank_to(key: str, stop: int) -> str:
    """``ZREMRANGEBYRANK key 0 stop``."""
    text = str(stop)
    return (
        f"*4\r\n$15\r\nZREMRANGEBYRANK\r\n${len(key)}\r\n{key}\r\n$1\r\n0\r\n"
        f"${len(text)}\r\n{text}\r\n"
    )


def hmget_two(key: str, first: str, second: str) -> str:
    """``HMGET key first second``."""
    return (
        f"*4\r\n$5\r\nHMGET\r\n${len(key)}\r\n{key}\r\n${len(first)}\r\n{first}\r\n"
        f"${len(second)}\r\n{second}\r\n"
    )


def ascii_bytes(text: str) -> bytes | None:
    """``text`` (composed by the functions above) as bytes, or None when it is not all
    ASCII: then a character count is not a byte count, and :func:`encode` must pack."""
    return text.encode("ascii") if text.isascii() else None


#: Error replies by their code, as the exceptions redis-py raises for them.
_ERRORS: dict[str, type[Exception]] = {
    "MOVED": MovedError,
    "ASK": errors.AskError,
    "NOPERM": errors.NoPermissionError,
    "NOSCRIPT": errors.NoScriptError,
    "READONLY": errors.ReadOnlyError,
    "LOADING": errors.BusyLoadingError,
    "NOAUTH": errors.AuthenticationError,
    "WRONGPASS": errors.AuthenticationError,
    "OOM": errors.OutOfMemoryError,
    "EXECABORT": errors.ExecAbortError,
    "CLUSTERDOWN": errors.ClusterDownError,
    "TRYAGAIN": errors.TryAgainError,
}


def _error(reply: ResponseError) -> Exception:
    """The redis-py exception for an error reply: its class by the reply's code, with
    the code taken off the message as redis-py does (a MOVED reply's is "slot host:port")."""
    text = str(reply)
    code, _, rest = text.partition(" ")
    found = _ERRORS.get(code)
    return found(rest) if found is not None else reply


class _Waiter:
    __slots__ = ("count", "data", "future", "replies", "sent_at")

    def __init__(self, future: asyncio.Future[list[Any]], data: bytes, count: int) -> None:
        self.future = future
        self.data = data
        self.count = count
        self.replies: list[Any] = []
        self.sent_at = 0.0


class _Protocol(asyncio.Protocol):
    """One connection: what it was sent and the reader of its replies, which go to the
    oldest waiter still owed some. A connection lost or stalled fails its own waiters
    only (the link's next connection has its own)."""

    def __init__(self, name: str, stall_s: float, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.stall_s = stall_s
        self.loop = loop
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.transport: asyncio.Transport | None = None
        self.sent: deque[_Waiter] = deque()
        self.watch: asyncio.TimerHandle | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, waiters: list[_Waiter], data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
        loop = self.loop
        now = loop.time()
        for waiter in waiters:
            waiter.sent_at = now
        self.sent.extend(waiters)
        if self.watch is None:
            self.watch = loop.call_later(self.stall_s, self.check)

    def check(self) -> None:
        """Close the connection when its oldest command waited past ``stall_s``."""
        self.watch = None
        if not self.sent or self.lost:
            return
        loop = self.loop
        waited = loop.time() - self.sent[0].sent_at
        if waited >= self.stall_s:
            self.close(LinkError(f"Redis node {self.name}: no reply in {waited:.1f} s"))
        else:
            self.watch = loop.call_later(self.stall_s - waited, self.check)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        sent = self.sent
        while True:
            reply = reader.gets()
            if reply is False:
                return
            if not sent:  # a reply nobody asked for: the stream is out of step
                self.close(LinkError(f"Redis node {self.name}: a reply no command asked for"))
                return
            waiter = sent[0]
            waiter.replies.append(_error(reply) if isinstance(reply, ResponseError) else reply)
            if len(waiter.replies) == waiter.count:
                sent.popleft()
                if not waiter.future.done():
                    waiter.future.set_result(waiter.replies)

    def close(self, exc: LinkError) -> None:
        """Abort the connection now and fail everything it owes."""
        if self.transport is not None:
            self.transport.abort()
        self.fail(exc)

    def fail(self, exc: LinkError) -> None:
        self.lost = True
        if self.watch is not None:
            self.watch.cancel()
            self.watch = None
        sent, self.sent = self.sent, deque()
        for waiter in sent:
            if not waiter.future.done():
                waiter.future.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        why = f": {exc}" if exc is not None else ""
        self.fail(LinkError(f"Redis node {self.name}: connection lost{why}"))


class Link:
    """One Redis node's connection for the calls (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None
        #: Encoded, not yet written (the turn's callers).
        self._queued: list[_Waiter] = []
        self._flush_scheduled = False
        self._closed = False
        #: (deadline, order, waiter) of the callers that gave one; a heap.
        self._deadlines: list[tuple[float, int, _Waiter]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        #: Writes made and the callers they carried (for tests and benchmarks).
        self.writes = 0
        self.callers = 0

    @property
    def name(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    @property
    def deadlines_held(self) -> int:
        """Callers whose deadline the link still keeps: none answered a while ago."""
        return len(self._deadlines)

    async def run(
        self,
        commands: Sequence[Sequence[Any]],
        timeout_s: float | None = None,
        data: bytes | None = None,
    ) -> list[Any]:
        """``commands``' replies in order, written with the turn's other callers'.

        ``data``: exactly ``commands``, already encoded (:func:`incrby_one` and the
        others; the replies are counted by ``commands``); without it they are packed
        here. Raises :class:`LinkError` when the connection
        cannot be made or is lost before the replies come, and ``TimeoutError`` when
        ``timeout_s`` passes first, connecting included.
        """
        if not commands:
            return []
        deadline = None
        protocol = self._protocol
        if protocol is None or protocol.lost:
            if timeout_s is None:
                await self._connect()
            else:
                deadline = asyncio.get_running_loop().time() + timeout_s
                async with asyncio.timeout_at(deadline):
                    await self._connect()
            protocol = self._protocol
            assert protocol is not None
        loop = protocol.loop
        if data is None:
            data = encode(commands)
        waiter = _Waiter(loop.create_future(), data, len(commands))
        self._queued.append(waiter)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if timeout_s is not None:
            if deadline is None:
                deadline = loop.time() + timeout_s
            heap = self._deadlines
            heapq.heappush(heap, (deadline, next(self._order), waiter))
            if self._timer is None or deadline < self._timer_at:
                self._arm(loop, deadline)
            try:
                return await waiter.future
            finally:
                # Answered callers leave the heap now, not when the timer next fires: it
                # would otherwise hold a deadline's worth of them (a thousand at 10,000
                # calls a second), which the cyclic collector scans again and again.
                # Deadlines are given in about the order calls arrive, so the earliest
                # is usually an answered one.
                while heap and heap[0][2].future.done():
                    heapq.heappop(heap)
        return await waiter.future

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = loop.call_at(at, self._expire)

    def _expire(self) -> None:
        """Fail the callers whose deadline passed; arm for the next one."""
        self._timer = None
        protocol = self._protocol
        loop = protocol.loop if protocol is not None else asyncio.get_running_loop()
        passed = loop.time() + DEADLINE_SLACK_S
        heap = self._deadlines
        while heap and (heap[0][0] <= passed or heap[0][2].future.done()):
            future = heapq.heappop(heap)[2].future
            if not future.done():
                future.set_exception(TimeoutError())
        if heap:
            self._arm(loop, heap[0][0])

    def _flush(self) -> None:
        self._flush_scheduled = False
        queued, self._queued = self._queued, []
        live = [waiter for waiter in queued if not waiter.future.done()]
        if not live:
            return
        protocol = self._protocol
        if protocol is None or protocol.lost:
            failed = LinkError(f"Redis node {self.name}: connection lost")
            for waiter in live:
                waiter.future.set_exception(failed)
            return
        protocol.send(live, b"".join([waiter.data for waiter in live]))
        self.writes += 1
        self.callers += len(live)

    async def _connect(self) -> None:
        if self._closed:
            raise LinkError(f"Redis node {self.name}: link closed")
        if self._connecting is None or self._connecting.done():
            # A task of its own: a caller whose deadline passes must not cancel the
            # connection the others wait for.
            self._connecting = asyncio.create_task(self._open(), name=f"redis-link {self.name}")
        try:
            self._protocol = await asyncio.shield(self._connecting)
        except LinkError:
            raise
        except Exception as exc:
            raise LinkError(f"Redis node {self.name}: {type(exc).__name__}: {exc}") from None

    async def _open(self) -> _Protocol:
        settings = self.settings
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(settings.connect_timeout_s):
            _, protocol = await loop.create_connection(
                lambda: _Protocol(self.name, settings.stall_s, loop), settings.host, settings.port
            )
            hello: list[tuple[Any, ...]] = []
            if settings.password is not None:
                user = (settings.username,) if settings.username else ()
                hello.append(("AUTH", *user, settings.password))
            if settings.db:
                hello.append(("SELECT", settings.db))
            if settings.client_name:
                hello.append(("CLIENT", "SETNAME", settings.client_name))
            if hello:
                waiter = _Waiter(loop.create_future(), encode(hello), len(hello))
                protocol.send([waiter], waiter.data)
                try:
                    replies = await waiter.future
                except BaseException:
                    protocol.close(LinkError(f"Redis node {self.name}: no answer to AUTH"))
                    raise
                failed = next((r for r in replies if isinstance(r, Exception)), None)
                if failed is not None:
                    protocol.close(LinkError(f"Redis node {self.name}: refused"))
                    raise LinkError(f"Redis node {self.name} refused the connection: {failed}")
        return protocol

    async def aclose(self) -> None:
        """Close the connection; callers still waiting get :class:`LinkError`."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines.clear()
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
        protocol, self._protocol = self._protocol, None
        if protocol is not None and not protocol.lost:
            protocol.close(LinkError(f"Redis node {self.name}: link closed"))
