"""``handler.deadline_ms`` bounds the whole call, from the handler taking it to its answer."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from core.config import Config
from service.appkeys import SCREENER
from service.screening.screen import Screener
from tests.helpers import body_from, load_list

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
