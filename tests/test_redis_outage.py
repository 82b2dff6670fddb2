"""Redis stopped, restarted or absent at start (docs/failure.md): answers follow on_error within
the deadline, and go back to normal by themselves once Redis is back."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from core.config import Config
from devtools.redis_server import RedisProcess
from tests.helpers import REJECT, body_from, load_list, wait_for

DEADLINE_MS = 100
BLOCKED = body_from("15162065613")
UNLISTED = body_from("15162065600")


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A Redis this test may stop and restart; AOF on, so the lists survive a restart."""
    server = RedisProcess(tmp_path, None, "--appendonly", "yes", "--appendfsync", "always")
    yield server
    server.stop()


def outage_config(make_config: Callable[..., Config], url: str, on_error: str) -> Config:
    return make_config(
        {
            "redis": {"url": url, "socket_timeout_ms": 200},
            "handler": {"deadline_ms": DEADLINE_MS, "on_error": on_error},
            "cache": {"refresh_ms": 50, "max_stale_ms": 300},
            "lists": {"blocklist": {"kind": "numbers"}},
            "policies": {
                "default": {
                    "rules": [{"name": "block", "match": "caller_in_list", "list": "blocklist"}]
                }
            },
        }
    )


async def timed_answer(client: Any, body: dict[str, Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    response = await client.post("/", json=body)
    assert response.status == 200
    answer = await response.json()
    return answer, time.perf_counter() - started


@pytest.mark.parametrize(
    ("on_error", "probe", "fallback_answer"),
    [("allow", BLOCKED, []), ("reject", UNLISTED, REJECT)],
)
async def test_redis_stopped_then_back(
    own_redis: RedisProcess,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    on_error: str,
    probe: dict[str, Any],
    fallback_answer: Any,
) -> None:
    own_redis.start()
    redis = Redis.from_url(own_redis.url)
    await load_list(redis, "blocklist", "numbers", ["15162065613"])
    await redis.aclose()
    client = await make_client(outage_config(make_config, own_redis.url, on_error))
    normal_answer = (await timed_answer(client, probe))[0]
    assert normal_answer != fallback_answer

    own_redis.stop()
    slowest = 0.0

    async def answers_by_on_error() -> bool:
        nonlocal slowest
        answer, took = await timed_answer(client, probe)
        slowest = max(slowest, took)
        return bool(answer == fallback_answer)

    await wait_for(answers_by_on_error, timeout_s=5)
    for _ in range(20):  # it stays so while Redis is down
        assert await answers_by_on_error()
    assert slowest < DEADLINE_MS / 1000, f"an answer took {slowest * 1000:.0f} ms"
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert "Redis not reachable" in (await ready.json())["reasons"][0]
    metrics = await (await client.get("/metrics")).text()
    fallbacks = [
        line for line in metrics.splitlines()
        if line.startswith('callscreen_on_error_total{reason="stale_lists"}')
    ]  # fmt: skip
    assert fallbacks and float(fallbacks[0].split()[-1]) >= 21

    own_redis.start()  # same port, same AOF: the lists come back

    async def back_to_normal() -> bool:
        return bool((await timed_answer(client, probe))[0] == normal_answer)

    await wait_for(back_to_normal, timeout_s=10)
    assert (await client.get("/readyz")).status == 200


async def test_starts_without_redis_and_recovers(
    own_redis: RedisProcess, make_config: Callable[..., Config], make_client: Callable[..., Any]
) -> None:
    client = await make_client(outage_config(make_config, own_redis.url, "allow"))
    assert (await client.get("/healthz")).status == 200
    not_ready = await client.get("/readyz")
    assert not_ready.status == 503
    assert (await timed_answer(client, BLOCKED))[0] == []

    own_redis.start()
    redis = Redis.from_url(own_redis.url)
    await load_list(redis, "blocklist", "numbers", ["15162065613"])
    await redis.aclose()

    async def blocks() -> bool:
        return bool((await timed_answer(client, BLOCKED))[0] == REJECT)

    await wait_for(blocks, timeout_s=10)
    assert (await client.get("/readyz")).status == 200
