"""Redis Sentinel on real servers: the primary dies under load, the service carries on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from core.build import start_build
from core.config import Config
from core.connect import SentinelRedis, connect
from core.store import ListStore
from devtools.redis_server import LocalSentinel
from tests.helpers import REJECT, body_from, wait_for

BLOCKED = "15162065613"
UNLISTED = "15165550160"
ON_ERROR = [{"action": "reject", "operands": ["unavailable", "redis-trouble"]}]
DEADLINE_MS = 100
#: Generous: a loaded CI core may stall the loop a little; a missing deadline would
#: wait for the 2 s socket timeout or for the failover itself.
SLACK_S = 0.5


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[LocalSentinel]:
    running = LocalSentinel(tmp_path / "sentinel").start()
    yield running
    running.stop()


@pytest.fixture
async def sentinel_redis(sentinel: LocalSentinel) -> AsyncIterator[SentinelRedis]:
    client = connect(sentinel.url)
    assert isinstance(client, SentinelRedis)
    yield client
    await client.aclose()


def sentinel_config(url: str) -> dict[str, Any]:
    return {
        "redis": {"url": url},
        "handler": {
            "deadline_ms": DEADLINE_MS,
            "on_error": "reject",
            "on_error_operands": ["unavailable", "redis-trouble"],
        },
        "cache": {"refresh_ms": 100, "max_stale_ms": 1000},
        "lists": {"blocklist": {"kind": "numbers"}},
        "policies": {
            "default": {
                "rules": [
                    {"name": "blocklist", "match": "caller_in_list", "list": "blocklist"},
                    # Every unlisted call makes the one Redis round trip a request may make.
                    {"name": "flood", "match": "call_rate", "limit": 1_000_000, "window_s": 60},
                ]
            }
        },
        "trunk_groups": {"main": {"policy": "default"}},
    }


@dataclass(frozen=True, slots=True)
class Answer:
    caller: str
    status: int
    body: Any
    took_s: float


class Load:
    """A few clients posting continuously until stopped; every answer is kept."""

    def __init__(self, client: TestClient[Any, Any], concurrency: int = 4) -> None:
        self.client = client
        self.answers: list[Answer] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._run(i)) for i in range(concurrency)]

    async def _run(self, worker: int) -> None:
        callers = (BLOCKED, UNLISTED) if worker % 2 else (UNLISTED, BLOCKED)
        i = 0
        while not self._stop.is_set():
            caller = callers[i % 2]
            i += 1
            started = time.perf_counter()
            response = await self.client.post("/tg/main", json=body_from(caller))
            body = await response.json()
            self.answers.append(
                Answer(caller, response.status, body, time.perf_counter() - started)
            )

    async def stop(self) -> list[Answer]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.answers


async def test_primary_killed_under_load_fails_over_without_restart(
    sentinel: LocalSentinel,
    sentinel_redis: SentinelRedis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
) -> None:
    builder = await start_build(sentinel_redis, "blocklist", "numbers")
    await builder.add([BLOCKED])
    await builder.finish()
    await builder.commit({"source": "test"})
    assert await sentinel_redis.wait(1, 2000) == 1  # the replica has the list too

    client: TestClient[Any, Any] = await make_client(make_config(sentinel_config(sentinel.url)))
    load = Load(client)
    await wait_for(lambda: _seen(load, UNLISTED, []))

    sentinel.primary.kill()
    await wait_for(lambda: _seen(load, UNLISTED, ON_ERROR))  # the outage is noticed
    await asyncio.to_thread(sentinel.wait_failover)
    mark = len(load.answers)
    # Recovered on the promoted replica, in the same process: list answers again.
    await wait_for(lambda: _seen(load, UNLISTED, [], after=mark), timeout_s=10)
    await wait_for(lambda: _seen(load, BLOCKED, REJECT, after=mark), timeout_s=10)

    # Writes go to the new primary, and the service sees them.
    changed_at = len(load.answers)
    await ListStore(sentinel_redis).change("blocklist", "numbers", add=[UNLISTED])
    await wait_for(lambda: _seen(load, UNLISTED, REJECT, after=changed_at), timeout_s=2)
    answers = await load.stop()

    assert {a.status for a in answers} == {200}
    slowest = max(a.took_s for a in answers)
    assert slowest < DEADLINE_MS / 1000 + SLACK_S, f"slowest answer took {slowest:.3f}s"
    # Every answer is the list's, or on_error's while Redis could not be trusted.
    for a in answers[:changed_at]:
        assert a.body in (REJECT if a.caller == BLOCKED else [], ON_ERROR), a
    assert (await client.get("/readyz")).status == 200


async def _seen(load: Load, caller: str, body: Any, after: int = 0) -> bool:
    return any(a.caller == caller and a.body == body for a in load.answers[after:])
