"""One list Redis cannot answer for while another it can: staleness is per list (issue 22).

Redis itself refuses the reads of one list here (an ACL that drops its keys from the
service's user), the way a Cluster master holding only that list's ``meta`` would be
down: calls that need the other list keep being answered from memory, those that need
the refused one answer ``stale_lists`` after ``cache.max_stale_ms``; ``/readyz``, the
``callscreen_list_stale`` metric and the log say which list, and when it is over.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from core.config import Config
from devtools.redis_server import RedisProcess
from tests.helpers import REJECT, body_from, load_list, wait_for

USER, PASSWORD = "partial-reader", "partial-reader-secret-0123"
ON_ERROR = [{"action": "reject", "operands": ["unavailable", "redis-trouble"]}]
BLOCKED = "15162065613"
BOTH_KEYS = ["{cs:good}*", "{cs:bad}*"]


@pytest.fixture
async def reader(redis: Redis) -> AsyncIterator[Redis]:
    """An ACL user that may read both lists' keys (tests narrow it); removed afterwards."""
    await redis.acl_setuser(
        USER, enabled=True, passwords=[f"+{PASSWORD}"], keys=BOTH_KEYS, commands=["+@all"]
    )
    yield redis
    await redis.acl_deluser(USER)


def partial_config(make_config: Callable[..., Config], redis_server: RedisProcess) -> Config:
    block = {"match": "caller_in_list", "operands": ["unavailable", "aniblock"]}
    return make_config(
        {
            "redis": {"url": f"redis://{USER}:{PASSWORD}@127.0.0.1:{redis_server.port}/0"},
            "handler": {
                "on_error": "reject",
                "on_error_operands": ["unavailable", "redis-trouble"],
            },
            "cache": {"refresh_ms": 50, "max_stale_ms": 300},
            "lists": {"good": {"kind": "numbers"}, "bad": {"kind": "numbers"}},
            "policies": {
                "good": {"rules": [{"name": "good", **block, "list": "good"}]},
                "bad": {"rules": [{"name": "bad", **block, "list": "bad"}]},
            },
            "default_policy": "good",
            "trunk_groups": {"good": {"policy": "good"}, "bad": {"policy": "bad"}},
        }
    )


async def test_one_list_unreadable_makes_only_its_calls_stale(
    reader: Redis,
    redis_server: RedisProcess,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    await load_list(reader, "good", "numbers", [BLOCKED])
    await load_list(reader, "bad", "numbers", [BLOCKED])
    client = await make_client(partial_config(make_config, redis_server))

    async def answer(group: str) -> Any:
        response = await client.post(f"/tg/{group}", json=body_from(BLOCKED))
        assert response.status == 200
        return await response.json()

    async def stale_metric() -> float:
        text = await (await client.get("/metrics")).text()
        line = next(
            r for r in text.splitlines() if r.startswith('callscreen_list_stale{list="bad"}')
        )
        return float(line.split()[-1])

    async def ready() -> bool:
        return bool((await client.get("/readyz")).status == 200)

    await wait_for(ready)
    assert await answer("good") == REJECT and await answer("bad") == REJECT

    # The service's user loses the bad list's keys: its polls of that list fail.
    await reader.acl_setuser(USER, reset_keys=True, keys=["{cs:good}*"])

    async def bad_is_stale() -> bool:
        return bool(await answer("bad") == ON_ERROR)

    with caplog.at_level(logging.INFO):
        await wait_for(bad_is_stale, timeout_s=3.0)
        for _ in range(5):
            assert await answer("good") == REJECT  # still answered from memory
            assert await answer("bad") == ON_ERROR
        response = await client.get("/readyz")
        assert response.status == 503
        reasons = (await response.json())["reasons"]
        assert (
            len(reasons) == 1 and "lists bad:" in reasons[0] and "NoPermissionError" in reasons[0]
        )
        assert await stale_metric() == 1.0
        text = await (await client.get("/metrics")).text()
        assert 'callscreen_list_stale{list="good"} 0.0' in text
        assert 'callscreen_on_error_total{reason="stale_lists"} 6.0' in text

        await reader.acl_setuser(USER, keys=BOTH_KEYS)
        await wait_for(ready, timeout_s=3.0)
        assert await answer("bad") == REJECT
        assert await stale_metric() == 0.0

        async def over() -> bool:
            # The "stopped" line comes with the first answer 1 s after the last on_error.
            await answer("good")
            return any("answers normal again" in r.getMessage() for r in caplog.records)

        await wait_for(over, timeout_s=3.0, interval_s=0.1)
    lines = [r.getMessage() for r in caplog.records if r.name == "service.screening.screen"]
    assert [m for m in lines if m.startswith("answering by on_error")] == [
        next(m for m in lines if m.startswith("answering by on_error (stale_lists): list 'bad'"))
    ]
    assert "answers normal again: on_error (stale_lists) stopped after 6 on_error answers" in lines
