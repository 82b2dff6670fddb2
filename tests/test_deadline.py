"""``handler.deadline_ms`` bounds the whole call, from the request's arrival to its answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from core.config import Config
from devtools.redis_server import RedisProcess
from service.appkeys import SCREENER
from service.screening.screen import Screener
from tests.helpers import REJECT, body_from, load_list, wait_for
from tests.load import read_answer, request_bytes
from tests.procs import ServiceProcess, scrape

DEADLINE_MS = 50
ON_ERROR = [{"action": "reject", "operands": ["unavailable", "late"]}]
CONFIG: dict[str, Any] = {
    "handler": {
        "deadline_ms": DEADLINE_MS,
        "on_error": "reject",
        "on_error_operands": ["unavailable", "late"],
    },
    "lists": {"blocklist": {"kind": "numbers"}},
    "trunk_groups": {"main": {"policy": "default"}},
    "policies": {
        "default": {
            "rules": [
                {"name": "blocklist", "match": "caller_in_list", "list": "blocklist"},
                {"name": "flood", "match": "call_rate", "limit": 10_000, "window_s": 60},
            ]
        }
    },
}


async def samples(client: Any) -> dict[str, float]:
    text = await (await client.get("/metrics")).text()
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


async def test_time_spent_before_the_redis_read_counts_against_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
) -> None:
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    client = await make_client(make_config(CONFIG), redis_client=redis)
    screener: Screener = client.server.app[SCREENER]
    local = screener.decide_locally

    def slow_locally(*args: Any) -> Any:  # the event loop held past the whole deadline
        time.sleep(DEADLINE_MS / 1000 + 0.01)
        return local(*args)

    monkeypatch.setattr(screener, "decide_locally", slow_locally)
    body = body_from("15165550000")  # not listed: the call_rate rule needs Redis
    response = await client.post("/tg/main", json=body)
    assert await response.json() == ON_ERROR  # no Redis read started with no time left
    found = await samples(client)
    assert found['callscreen_on_error_total{reason="deadline"}'] == 1
    assert found["callscreen_late_answers_total"] == 1


async def test_answers_in_time_are_not_counted_late(
    redis: Redis, make_config: Callable[..., Config], make_client: Callable[..., Any]
) -> None:
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    client = await make_client(make_config(CONFIG), redis_client=redis)
    for _ in range(5):
        response = await client.post("/tg/main", json=body_from("15165550000"))
        assert await response.json() == []
    found = await samples(client)
    assert found["callscreen_late_answers_total"] == 0
    assert found['callscreen_on_error_total{reason="deadline"}'] == 0


#: Long enough that a busy test machine answers within it whatever it does.
QUEUED_DEADLINE_MS = 200
#: Redis held from before the first call: past the first call's deadline, within the
#: deadline a queued call would get if it were counted from its handler's entry.
PAUSE_MS = 300


def queued_service(folder: Path, redis_url: str) -> ServiceProcess:
    """One worker with aiohttp's internals on (arrival stamps need them)."""
    handler = {**CONFIG["handler"], "deadline_ms": QUEUED_DEADLINE_MS}
    return ServiceProcess(
        folder,
        redis_url,
        overrides={
            "handler": handler,
            "policies": CONFIG["policies"],
            "cache": {"refresh_ms": 100, "max_stale_ms": 5000},
        },
        env={"CALLSCREEN_AIOHTTP_INTERNALS": "on"},
    )


async def call_on(
    streams: tuple[asyncio.StreamReader, asyncio.StreamWriter], port: int, *chunks: bytes
) -> Any:
    """Send one call in ``chunks`` (a pause between them), then read its answer."""
    reader, writer = streams
    for chunk in chunks:
        writer.write(chunk)
        await writer.drain()
        if chunk is not chunks[-1]:
            await asyncio.sleep(QUEUED_DEADLINE_MS / 1000 / 4)
    status, body, _keep = await read_answer(reader)
    assert status == 200
    return orjson.loads(body)


@pytest.mark.internals  # arrival stamps need aiohttp's internals
async def test_a_keep_alive_connection_is_not_charged_for_its_idle_time(
    tmp_path: Path, redis_server: RedisProcess, redis: Redis
) -> None:
    """Only a request's own bytes start its clock: time idle between calls (a stray
    CRLF included) or between the reads of one call's body counts for no call."""
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    service = queued_service(tmp_path, redis_server.url)
    call = request_bytes(
        "127.0.0.1", service.port, "/tg/main", orjson.dumps(body_from("15165550001"))
    )
    try:
        service.start()
        await service.ready()
        streams = await asyncio.open_connection("127.0.0.1", service.port)
        assert await call_on(streams, service.port, call) == []
        streams[1].write(b"\r\n")  # some clients end a body with one
        await asyncio.sleep(QUEUED_DEADLINE_MS / 1000 * 1.5)  # idle past a deadline
        assert await call_on(streams, service.port, call) == []
        await asyncio.sleep(QUEUED_DEADLINE_MS / 1000 * 1.5)
        half = len(call) - 40
        assert await call_on(streams, service.port, call[:half], call[half:]) == []
        await asyncio.sleep(QUEUED_DEADLINE_MS / 1000 * 1.5)
        assert await call_on(streams, service.port, call) == []
        streams[1].close()
        found = await scrape(service.url)
        assert found['callscreen_on_error_total{reason="deadline"}'] == 0
        assert found["callscreen_late_answers_total"] == 0
    finally:
        service.stop()


@pytest.mark.internals  # arrival stamps need aiohttp's internals
async def test_a_call_queued_behind_a_slow_one_counts_its_wait_from_arrival(
    tmp_path: Path, own_redis: RedisProcess
) -> None:
    """Three calls pipelined on one connection arrive together; the first waits out the
    deadline on a paused Redis. The third, which also needs Redis, has used up its
    deadline waiting in the queue: it is answered by ``on_error`` at once (counted
    from its handler's entry it would have had a whole deadline, and Redis back in it).
    The second is decided from memory: its answer stands, late or not."""
    redis = Redis.from_url(own_redis.url)
    try:
        await load_list(redis, "blocklist", "numbers", ["5162065613"])
        service = queued_service(tmp_path, own_redis.url)
        try:
            service.start()
            await service.ready()
            reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
            calls = [body_from("15165550001"), body_from("15162065613"), body_from("15165550002")]
            pipelined = b"".join(
                request_bytes("127.0.0.1", service.port, "/tg/main", orjson.dumps(call))
                for call in calls
            )
            assert await redis.client_pause(PAUSE_MS, all=True)
            writer.write(pipelined)
            answers = []
            for _ in calls:
                status, body, _keep = await read_answer(reader)
                assert status == 200
                answers.append(orjson.loads(body))
            writer.close()
            assert answers == [ON_ERROR, REJECT, ON_ERROR]

            async def counted() -> bool:
                found = await scrape(service.url)
                return found.get('callscreen_on_error_total{reason="deadline"}') == 2

            await wait_for(counted, timeout_s=5.0, interval_s=0.1)
        finally:
            service.stop()
    finally:
        await redis.aclose()
