"""Graceful shutdown on SIGTERM, on a real process: stop accepting, finish what is in flight."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from redis.asyncio import Redis

from devtools.redis_server import RedisProcess
from tests.helpers import REJECT, body_from, load_list, wait_for
from tests.procs import ServiceProcess


@pytest.fixture(params=[1, 2], ids=["one-process", "two-workers"])
def service(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisProcess
) -> Iterator[ServiceProcess]:
    process = ServiceProcess(tmp_path, redis_server.url, workers=request.param)
    yield process
    process.stop()


async def refused(port: int) -> bool:
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def test_sigterm_answers_the_call_in_flight_then_exits_0(
    service: ServiceProcess, redis: Redis
) -> None:
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    service.start()
    await service.ready()

    body = orjson.dumps(body_from("15162065613"))
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    writer.write(
        b"POST /tg/main HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    # "100 Continue" comes from inside the app: the request is being handled from here on.
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    half = len(body) // 2
    writer.write(body[:half])
    await writer.drain()

    service.signal(signal.SIGTERM)
    await wait_for(lambda: refused(service.port), timeout_s=10.0)  # no new connections

    writer.write(body[half:])
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if line)
    length = int(fields[b"Content-Length"])
    assert orjson.loads(await reader.readexactly(length)) == REJECT
    writer.close()

    assert await service.exited() == 0
    records = service.log_records()
    assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL")]
    assert not [r for r in records if "exception" in r]
