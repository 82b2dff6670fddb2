"""A Redis that stops answering (SIGSTOP): every answer still comes within the deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core.build import start_build
from core.config import Config
from devtools.redis_server import RedisProcess
from tests.helpers import REJECT, body_from, wait_for

BLOCKED = "15162065613"
ON_ERROR = [{"action": "reject", "operands": ["unavailable", "redis-trouble"]}]
DEADLINE_MS = 100
SLACK_S = 0.5  # behaviour, not a benchmark: far below the 2 s socket timeout


async def test_paused_redis_answers_follow_on_error_within_the_deadline(
    own_redis: RedisProcess,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
) -> None:
    loader = Redis.from_url(own_redis.url)
    builder = await start_build(loader, "blocklist", "numbers")
    await builder.add([BLOCKED])
    await builder.finish()
    await builder.commit({"source": "test"})
    await loader.aclose()
    config = make_config(
        {
            "redis": {"url": own_redis.url},
            "handler": {
                "deadline_ms": DEADLINE_MS,
                "on_error": "reject",
                "on_error_operands": ["unavailable", "redis-trouble"],
            },
            "cache": {"refresh_ms": 100, "max_stale_ms": 500},
            "lists": {"blocklist": {"kind": "numbers"}},
            "policies": {
                "default": {
                    "rules": [
                        {"name": "blocklist", "match": "caller_in_list", "list": "blocklist"},
                        {"name": "flood", "match": "call_rate", "limit": 10_000, "window_s": 60},
                    ]
                }
            },
        }
    )
    client: TestClient[Any, Any] = await make_client(config)
    answers: list[tuple[str, Any, float]] = []

    async def call(caller: str) -> None:
        started = time.perf_counter()
        response = await client.post("/", json=body_from(caller))
        assert response.status == 200
        answers.append((caller, await response.json(), time.perf_counter() - started))

    async def burst() -> None:
        await asyncio.gather(*(call(c) for c in (BLOCKED, "15165550170", "15165550171")))

    await burst()
    assert [a[1] for a in answers] == [REJECT, [], []]

    own_redis.pause()
    paused_at = time.monotonic()
    try:
        # Rate checks hit the deadline at once; after max_stale_ms every answer does.
        while time.monotonic() - paused_at < 1.2:
            await burst()
    finally:
        own_redis.resume()
    during = answers[3:]
    assert all(body == ON_ERROR for caller, body, _ in during if caller != BLOCKED)
    assert any(body == ON_ERROR for caller, body, _ in during if caller == BLOCKED)
    slowest = max(took for _, _, took in answers)
    assert slowest < DEADLINE_MS / 1000 + SLACK_S, f"slowest answer took {slowest:.3f}s"

    async def recovered() -> bool:
        mark = len(answers)
        await burst()
        return [a[1] for a in answers[mark:]] == [REJECT, [], []]

    await wait_for(recovered, timeout_s=10)
    metrics = await (await client.get("/metrics")).text()
    fallbacks = {
        line.split('"')[1]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("callscreen_on_error_total{")
    }
    # Both ways a slow Redis shows: a rate check cut by the deadline, then stale lists.
    assert fallbacks["deadline"] > 0
    assert fallbacks["stale_lists"] > 0
