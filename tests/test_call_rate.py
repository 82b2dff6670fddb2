"""The call-rate rule end to end: counted in Redis across service instances, one round trip."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core import keys
from core.build import start_build
from core.config import Config
from core.shards import LeanRedis
from core.store import ListStore
from devtools.redis_server import RedisProcess
from tests.helpers import body_from, sends

RATE_REJECT = [{"action": "reject", "operands": ["busy-here", "too-many-calls"]}]
ON_ERROR = [{"action": "reject", "operands": ["unavailable", "redis-trouble"]}]
Client = TestClient[Any, Any]


def rate_config(limit: int = 3, window_s: int = 60, **extra: Any) -> dict[str, Any]:
    return {
        "lists": {"blocklist": {"kind": "numbers"}},
        "policies": {
            "default": {
                "rules": [
                    {"name": "blocklist", "match": "caller_in_list", "list": "blocklist"},
                    {
                        "name": "flood",
                        "match": "call_rate",
                        "limit": limit,
                        "window_s": window_s,
                        "operands": ["busy-here", "too-many-calls"],
                    },
                ]
            }
        },
        "trunk_groups": {"main": {"policy": "default"}},
        **extra,
    }


async def load_blocklist(redis: Redis, numbers: list[str]) -> None:
    builder = await start_build(redis, "blocklist", "numbers")
    await builder.add(numbers)
    await builder.finish()
    await builder.commit({"source": "test"})


async def answer(client: Client, caller: str | None, path: str = "/tg/main") -> Any:
    response = await client.post(path, json=body_from(caller))
    assert response.status == 200
    return await response.json()


async def rate_keys(redis: Redis) -> list[str]:
    return sorted(k.decode() if isinstance(k, bytes) else k for k in await redis.keys("{cs:rate:*"))


async def test_limit_is_shared_by_two_service_instances(
    redis: Redis, make_config: Callable[..., Config], make_client: Callable[..., Any]
) -> None:
    await load_blocklist(redis, [])
    config = make_config(rate_config(limit=3))
    first, second = await make_client(config), await make_client(config)
    caller = "15165550101"
    # Calls 1-3 (alternating instances) are under the limit; the 4th from either is over.
    answers = [await answer(c, caller) for c in (first, second, first, second, first)]
    assert answers == [[], [], [], RATE_REJECT, RATE_REJECT]
    # Another caller has a count of their own.
    assert await answer(second, "15165550102") == []
    assert any("15165550101" in key for key in await rate_keys(redis))


async def test_under_the_limit_never_triggers(
    redis: Redis, make_config: Callable[..., Config], make_client: Callable[..., Any]
) -> None:
    await load_blocklist(redis, [])
    config = make_config(rate_config(limit=5))
    first, second = await make_client(config), await make_client(config)
    assert [await answer(c, "15165550111") for c in (first, second) * 2 + (first,)] == [[]] * 5


async def test_anonymous_callers_are_not_counted(
    redis: Redis, make_config: Callable[..., Config], make_client: Callable[..., Any]
) -> None:
    await load_blocklist(redis, [])
    client = await make_client(make_config(rate_config(limit=1)))
    for _ in range(3):
        for user in ("anonymous", "restricted", ""):
            assert await answer(client, user) == []
    assert await rate_keys(redis) == []
    # Privacy asked for, but the number is there: that number is counted.
    private = body_from("15165550151", Privacy=["id"])
    answers = [await (await client.post("/tg/main", json=private)).json() for _ in range(2)]
    assert answers == [[], RATE_REJECT]


async def test_explain_counts_nothing_but_reports_the_rule(
    redis: Redis, make_config: Callable[..., Config], make_client: Callable[..., Any]
) -> None:
    await load_blocklist(redis, [])
    client = await make_client(make_config(rate_config(limit=2)))
    caller = "15165550121"
    for _ in range(5):
        response = await client.post("/v1/explain/tg/main", json=body_from(caller))
        assert (await response.json())["decision"] == "allow"
    assert await rate_keys(redis) == []
    assert [await answer(client, caller) for _ in range(2)] == [[], []]
    # Two calls counted: explain says the next one would be the third, over the limit.
    explained = await (await client.post("/v1/explain/tg/main", json=body_from(caller))).json()
    assert (explained["decision"], explained["rule"]) == ("reject", "flood")
    assert explained["matched"] == "3 calls in 60s"
    assert await answer(client, caller) == RATE_REJECT


async def test_listed_callers_are_decided_before_counting(
    redis: Redis, make_config: Callable[..., Config], make_client: Callable[..., Any]
) -> None:
    await load_blocklist(redis, ["15162065613"])
    client = await make_client(make_config(rate_config(limit=1)))
    blocked = [{"action": "reject", "operands": ["unavailable", "aniblock"]}]
    assert [await answer(client, "15162065613") for _ in range(3)] == [blocked] * 3
    assert await rate_keys(redis) == []


async def test_sliding_window_counts_a_burst_across_a_window_boundary(redis: Redis) -> None:
    store = ListStore(redis)
    windows = [("p:flood", 10)]
    base = 1_000_000.0  # a window boundary
    for t in (base - 0.3, base - 0.2, base - 0.1):
        await store.count_call("15165550131", windows, t)
    # Three calls just before the boundary and one just after: four in 0.4 s.
    assert await store.count_call("15165550131", windows, base + 0.1) == {"p:flood": 4}
    # Half a window later the previous window weighs half: ceil(3 * 0.5) + 1.
    assert await store.count_call("15165550131", windows, base + 5, increment=False) == {
        "p:flood": 2 + 1 + 1
    }
    # Two windows later everything has slid out.
    assert await store.count_call("15165550131", windows, base + 25) == {"p:flood": 1}


async def test_counters_named_beyond_ascii_are_counted_under_their_own_names(
    redis: Redis,
) -> None:
    """Rule names are the operator's: a name beyond ASCII (its character count is not
    its byte count) is counted exactly as an ASCII one, under the key it names."""
    store = ListStore(redis)
    now = 1_000_010.0
    for rule_key in ("p:flood", "pólitica:inundación", "策略:洪水"):
        windows = [(rule_key, 60)]
        for n in range(3):
            assert await store.count_call("15165550131", windows, now + n) == {rule_key: n + 1}
        key = keys.rate("15165550131", rule_key, int(now // 60))
        assert await redis.get(key) == b"3"
        assert 60 < await redis.ttl(key) <= 120


async def test_a_counter_sends_its_expiry_once_and_again_if_it_was_deleted(
    redis: Redis,
) -> None:
    store = ListStore(redis)
    windows = [("p:flood", 60)]
    now = 1_000_010.0
    key = keys.rate("15165550131", "p:flood", int(now // 60))
    await redis.config_resetstat()
    for n in range(3):
        assert await store.count_call("15165550131", windows, now + n) == {"p:flood": n + 1}
    stats = await redis.info("commandstats")
    assert stats["cmdstat_expire"]["calls"] == 1  # the counter's name holds its window
    await redis.delete(key)  # as a FLUSHALL, an eviction or a failover to a lagging replica
    assert await store.count_call("15165550131", windows, now + 4) == {"p:flood": 1}
    await store.drain()  # the reply showed a new counter: its expiry sent after the call
    assert 60 < await redis.ttl(key) <= 120


async def test_a_rate_checked_call_costs_one_round_trip(
    redis: Redis,
    counting_redis: LeanRedis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
) -> None:
    await load_blocklist(redis, ["15162065613"])
    data = rate_config(limit=1000)
    data["policies"]["default"]["rules"].append(
        {"name": "slow-flood", "match": "call_rate", "limit": 5000, "window_s": 3600}
    )
    # No list polls during the measurement: lists load once at start-up.
    data["cache"] = {"refresh_ms": 60_000, "max_stale_ms": 120_000}
    client = await make_client(make_config(data), redis_client=counting_redis)
    await counting_redis.ping()
    await redis.config_resetstat()
    before = sends(counting_redis)
    calls = 20
    for i in range(calls):
        assert await answer(client, f"1516555{i:04d}") == []
    assert sends(counting_redis) - before == calls
    stats = await redis.info("commandstats")
    used = {
        name.removeprefix("cmdstat_"): s["calls"]
        for name, s in stats.items()
        if not name.startswith(("cmdstat_config", "cmdstat_info"))  # this test's own
    }
    # Two rate rules: INCR(BY) + EXPIRE of this window and GET of the last, per rule.
    # List lookups cost nothing: no HMGET, SISMEMBER or the like.
    assert used == {"incrby": 2 * calls, "expire": 2 * calls, "get": 2 * calls}


async def test_redis_trouble_during_a_rate_check_answers_by_on_error_in_time(
    own_redis: RedisProcess,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
) -> None:
    client_redis = Redis.from_url(own_redis.url)
    await load_blocklist(client_redis, [])
    await client_redis.aclose()
    deadline_ms = 100
    data = rate_config(
        limit=100,
        redis={"url": own_redis.url, "socket_timeout_ms": 5000},
        handler={
            "deadline_ms": deadline_ms,
            "on_error": "reject",
            "on_error_operands": ["unavailable", "redis-trouble"],
        },
        # The lists stay trusted through the outage; only the rate check needs Redis.
        cache={"refresh_ms": 250, "max_stale_ms": 60_000},
    )
    client = await make_client(make_config(data))
    assert await answer(client, "15165550141") == []

    async def timed_answers(count: int) -> list[float]:
        took = []
        for i in range(count):
            started = time.perf_counter()
            assert await answer(client, f"151655502{i:02d}") == ON_ERROR
            took.append(time.perf_counter() - started)
        return took

    own_redis.pause()  # connections stay open, nothing answers: the deadline cuts it
    slow = await timed_answers(3)
    own_redis.resume()
    own_redis.stop()  # refused connections: the error comes at once
    down = await timed_answers(3)
    # Behaviour, not a benchmark: each answer within the deadline plus generous slack,
    # far below the 5 s socket timeout a missing deadline would wait for.
    assert max(slow + down) < deadline_ms / 1000 + 0.5
    metrics = await (await client.get("/metrics")).text()
    assert 'callscreen_on_error_total{reason="deadline"} 3.0' in metrics
    assert 'callscreen_on_error_total{reason="redis_error"} 3.0' in metrics
