"""A lean paced load of screening calls over keep-alive connections (raw asyncio streams).

Each connection sends prebuilt HTTP/1.1 POSTs at a steady pace and reads each answer
itself (status line, headers, a ``Content-Length`` body), so one test process can hold
2,000 calls a second and more beside the service it loads. It records, per call, when it
was sent, how long the answer took, its status and body, and every connection error; a
connection the server closed (``Connection: close``, or an end of stream seen between
calls) is replaced before the next call, as an HTTP client's pool would, without an error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

from tests.helpers import wait_for

#: What one call may take before it counts as an error (a hung connection, not a slow one).
CALL_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Answered:
    """One call: when it was sent (``time.monotonic()``), what it took, what came back."""

    sent_s: float
    took_s: float
    status: int
    body: bytes
    #: Which of the load's bodies was sent.
    index: int

    def json(self) -> Any:
        return orjson.loads(self.body)


def request_bytes(host: str, port: int, path: str, body: bytes) -> bytes:
    """One whole keep-alive POST of a JSON ``body``."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """One HTTP/1.1 answer: its status, its body and whether the server keeps the
    connection open. Raises ``asyncio.IncompleteReadError`` if the stream ends first."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, status = lines[0].split(" ", 2)[:2]
    length = 0
    keep = version == "HTTP/1.1"
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection":
            keep = value.strip().lower() != "close"
    body = await reader.readexactly(length) if length else b""
    return int(status), body, keep


@dataclass
class Load:
    """Calls to ``url`` + ``path`` at ``rate_per_s`` in all, over ``connections``
    keep-alive connections, cycling through ``bodies`` (JSON, encoded), until stopped.

    A connection that falls behind (a slow answer, a reconnect) sends its missed calls
    back to back until it is on schedule again, so the offered rate stays the one asked.
    """

    url: str
    bodies: Sequence[bytes]
    rate_per_s: float = 2000.0
    connections: int = 16
    path: str = "/tg/main"
    answers: list[Answered] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    started_s: float = 0.0
    stopping_s: float = 0.0
    stopped_s: float = 0.0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _running: asyncio.Future[list[None]] | None = None

    def start(self) -> None:
        parts = urlsplit(self.url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        requests = [request_bytes(host, port, self.path, body) for body in self.bodies]
        self.started_s = time.monotonic()
        self._running = asyncio.gather(
            *(self._connection(host, port, requests, n) for n in range(self.connections))
        )

    async def stop(self) -> None:
        """Stop sending; wait for the calls in flight to be answered."""
        self.stopping_s = time.monotonic()
        self._stop.set()
        assert self._running is not None, "start() first"
        await self._running
        self.stopped_s = time.monotonic()

    async def _connection(self, host: str, port: int, requests: list[bytes], n: int) -> None:
        interval_s = self.connections / self.rate_per_s
        # Connections start spread over one interval, so the calls come evenly.
        next_s = self.started_s + interval_s * n / self.connections
        streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        i = n
        try:
            while not self._stop.is_set():
                delay_s = next_s - time.monotonic()
                if delay_s > 0:
                    await asyncio.sleep(delay_s)
                next_s += interval_s
                index = i % len(requests)
                i += self.connections
                sent_s = time.monotonic()
                try:
                    async with asyncio.timeout(CALL_TIMEOUT_S):
                        if streams is not None and streams[0].at_eof():
                            streams[1].close()  # closed by the server while idle
                            streams = None
                        if streams is None:
                            streams = await asyncio.open_connection(host, port)
                        reader, writer = streams
                        writer.write(requests[index])
                        status, body, keep = await read_answer(reader)
                except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                    self.errors.append(f"{time.monotonic() - self.started_s:.3f}s: {exc!r}")
                    if streams is not None:
                        streams[1].close()
                        streams = None
                    continue
                took_s = time.monotonic() - sent_s
                self.answers.append(Answered(sent_s, took_s, status, body, index))
                if not keep:
                    writer.close()
                    streams = None
        finally:
            if streams is not None:
                streams[1].close()

    def rate(self) -> float:
        """Calls answered a second over the run, from its start to the call to
        :meth:`stop` (the achieved load level)."""
        end_s = self.stopping_s or time.monotonic()
        sent = sum(1 for answer in self.answers if answer.sent_s < end_s)
        return sent / max(1e-9, end_s - self.started_s)

    def per_second(self) -> list[int]:
        """Calls answered, by the second of the run they were sent in."""
        counts: list[int] = []
        for answer in self.answers:
            second = int(answer.sent_s - self.started_s)
            counts.extend([0] * (second + 1 - len(counts)))
            counts[second] += 1
        return counts

    def statuses(self) -> set[int]:
        return {answer.status for answer in self.answers}

    async def answered(self, count: int, since_s: float = 0.0, timeout_s: float = 60.0) -> None:
        """Wait until ``count`` calls sent at ``since_s`` (monotonic) or later were
        answered: the load has run about ``count / rate_per_s`` seconds past that moment."""

        async def enough() -> bool:
            return sum(1 for a in self.answers if a.sent_s >= since_s) >= count

        await wait_for(enough, timeout_s=timeout_s, interval_s=0.05)

    def after(self, since_s: float) -> list[Any]:
        """The JSON answers to the calls sent at ``since_s`` (monotonic) or later."""
        return [answer.json() for answer in self.answers if answer.sent_s >= since_s]

    def report(self) -> str:
        slowest = max((answer.took_s for answer in self.answers), default=0.0)
        return (
            f"{len(self.answers)} calls, {self.rate():.0f}/s over {self.connections} "
            f"connections (by second: {self.per_second()}), slowest {slowest * 1000:.0f} ms, "
            f"{len(self.errors)} errors"
        )
