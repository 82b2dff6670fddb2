"""The per-worker cache of subscribers' entries, on a real Redis.

A subscriber called again is answered without any Redis command; an admin change, a
full sync and a lost bucket are still seen, within the times docs/subscribers.md gives
("The entries cache and freshness").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from core import keys
from core.config import Config
from core.shards import LeanRedis
from loader.sync import sync_list
from tests.helpers import metric, sends, wait_for
from tests.test_call_rate import load_blocklist
from tests.test_subscribers import (
    ADMIN_TOKEN,
    CSV,
    ON_ERROR,
    PERSONAL,
    SUB_A,
    SUB_B,
    answer,
    subscribers_config,
)

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    (tmp_path / "personal.csv").write_text(CSV)
    return tmp_path


HITS = 'callscreen_subscriber_cache_lookups_total{result="hit"}'
Serve = Callable[..., Awaitable[tuple[Any, Config]]]


@pytest.fixture
def serve(
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    source: Path,
) -> Serve:
    """A service on the synced subscribers list with these ``cache`` (and other) settings:
    its test client and config."""

    async def served(cache: dict[str, int], **extra: Any) -> tuple[Any, Config]:
        config = make_config(subscribers_config(cache=cache, **extra), base_dir=source)
        await load_blocklist(redis, [])
        await sync_list(redis, config, "personal")
        return await make_client(config), config

    return served


async def test_a_cached_subscriber_is_answered_without_redis(
    redis: Redis,
    counting_redis: LeanRedis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    source: Path,
) -> None:
    # No poll during the test (refresh 60 s): every command sent is a call's.
    data = subscribers_config(cache={"refresh_ms": 60_000, "max_stale_ms": 120_000})
    config = make_config(data, base_dir=source)
    await load_blocklist(redis, [])
    await sync_list(redis, config, "personal")
    client = await make_client(config, redis_client=counting_redis)
    assert await answer(client, "15165550101") == PERSONAL
    before = sends(counting_redis)
    for _ in range(20):  # a contact centre: the same DID, many callers
        assert await answer(client, "15165550101") == PERSONAL
        assert await answer(client, "19005550000") == []  # its allow entry
        assert await answer(client, "15165559999") == []  # on no side
    assert sends(counting_redis) == before  # not one command
    assert await metric(client, HITS) == 60
    # Another subscriber is read once, then cached too.
    assert await answer(client, "15165550102", SUB_B) == PERSONAL
    assert sends(counting_redis) == before + 1
    assert await answer(client, "15165550102", SUB_B) == PERSONAL
    assert sends(counting_redis) == before + 1


async def test_admin_changes_and_syncs_are_seen_within_a_refresh(
    redis: Redis, serve: Serve, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CALLSCREEN_ADMIN_TOKENS", ADMIN_TOKEN)
    # A long max age: only the polled write count and generation can drop an entry.
    client, config = await serve(
        {"refresh_ms": 100, "max_stale_ms": 1000, "subscriber_max_age_ms": 3_600_000}
    )
    caller = "15165550177"
    assert [await answer(client, caller) for _ in range(3)] == [[]] * 3  # cached
    hits = await metric(client, HITS)
    assert hits >= 2

    async def answered(expected: Any) -> bool:
        return bool(await answer(client, caller) == expected)

    # A single-entry admin write: seen within cache.refresh_ms and a poll (docs: ~1 s).
    path = f"/v1/lists/personal/subscribers/{SUB_A}/entries/{caller}"
    response = await client.put(path, headers=ADMIN)
    assert response.status == 200, await response.text()
    written = time.monotonic()
    await wait_for(lambda: answered(PERSONAL), timeout_s=1.0, interval_s=0.005)
    assert time.monotonic() - written < 1.0
    assert await redis.get(keys.subscriber_changes("personal")) == b"1"
    # A bulk removal, the same.
    bulk = {"remove": [{"subscriber": SUB_A, "entry": caller}]}
    response = await client.post("/v1/lists/personal/subscribers", json=bulk, headers=ADMIN)
    assert response.status == 200, await response.text()
    await wait_for(lambda: answered([]), timeout_s=1.0, interval_s=0.005)
    assert await redis.get(keys.subscriber_changes("personal")) == b"2"
    # A full sync (a new generation) drops what was cached from the old one. (Another
    # caller: the admin removal of ``caller`` outlives syncs, the admin overlay.)
    caller = "15165550178"
    assert [await answer(client, caller) for _ in range(2)] == [[]] * 2
    (source / "personal.csv").write_text(CSV + f"{SUB_A},{caller}\n")
    await sync_list(redis, config, "personal")
    await wait_for(lambda: answered(PERSONAL), timeout_s=1.0, interval_s=0.005)
    assert await metric(client, HITS) > hits  # the cache was in use all along


async def test_a_lost_bucket_is_still_noticed(
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    source: Path,
) -> None:
    data = subscribers_config(
        cache={"refresh_ms": 100, "max_stale_ms": 5000, "subscriber_max_age_ms": 300},
        handler={"on_error": "reject", "on_error_operands": ["unavailable", "redis-trouble"]},
    )
    config = make_config(data, base_dir=source)
    await load_blocklist(redis, [])
    await sync_list(redis, config, "personal")
    gen = int(await redis.hget(keys.meta("personal"), "gen") or 0)
    client = await make_client(config)
    assert keys.subscriber_bucket_of(SUB_A) != keys.subscriber_bucket_of(SUB_B)
    assert await answer(client, "15165550101") == PERSONAL  # SUB_A, now cached
    await redis.delete(keys.subscribers("personal", keys.subscriber_bucket_of(SUB_A), gen))
    lost = time.monotonic()
    # Answered from the cache at most subscriber_max_age_ms more, then read: on_error.
    await wait_for(
        lambda: answer_is(client, "15165550101", ON_ERROR), timeout_s=2.0, interval_s=0.01
    )
    assert time.monotonic() - lost < 0.3 + 0.5
    # Never cached without its marker: every later call reads the bucket again.
    hits = await metric(client, HITS)
    assert [await answer(client, "15165550101") for _ in range(5)] == [ON_ERROR] * 5
    assert await metric(client, HITS) == hits
    # The intact bucket's subscriber is answered from its entries as usual.
    assert await answer(client, "15165550102", SUB_B) == PERSONAL


async def answer_is(client: Any, caller: str, expected: Any) -> bool:
    return bool(await answer(client, caller) == expected)


RENEWED = 'callscreen_subscriber_cache_renewals_total{result="ok"}'
MISSES = 'callscreen_subscriber_cache_lookups_total{result="miss"}'


async def test_a_subscriber_called_within_its_max_age_is_renewed_off_the_calls_path(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CALLSCREEN_ADMIN_TOKENS", ADMIN_TOKEN)
    # No poll during the test (refresh 60 s): only the max age makes entries read again.
    client, _ = await serve(
        {"refresh_ms": 60_000, "max_stale_ms": 120_000, "subscriber_max_age_ms": 1000}
    )
    assert await answer(client, "15165550101") == PERSONAL  # read by the call: a miss
    # Called every 100 ms for four max ages: a call in the last fifth of the age has the
    # entry read again in the background, so no call reads Redis itself after the first.
    started = time.monotonic()
    while time.monotonic() - started < 4.0:
        assert await answer(client, "15165550101") == PERSONAL
        await asyncio.sleep(0.1)  # the time between calls is what is tested
    assert await metric(client, MISSES) == 1
    assert await metric(client, RENEWED) >= 3
    # An admin write, with no poll to see its count: the next renewal reads it, so it is
    # answered within the max age all the same.
    path = f"/v1/lists/personal/subscribers/{SUB_A}/entries/15165550101"
    response = await client.delete(path, headers=ADMIN)
    assert response.status == 200, await response.text()
    written = time.monotonic()
    await wait_for(lambda: answer_is(client, "15165550101", []), timeout_s=2.0, interval_s=0.05)
    assert time.monotonic() - written < 1.0 + 0.3
    assert await metric(client, MISSES) == 1


async def test_a_renewal_redis_does_not_answer_leaves_the_entry_to_age_out(
    redis: Redis, serve: Serve
) -> None:
    client, _ = await serve(
        {"refresh_ms": 60_000, "max_stale_ms": 120_000, "subscriber_max_age_ms": 1000},
        handler={"deadline_ms": 100},
    )
    assert await answer(client, "15165550101") == PERSONAL  # read by the call
    await asyncio.sleep(0.85)  # into the last fifth of its max age
    await redis.client_pause(400, all=True)
    # Answered from the cache while the renewal it started waits in vain (100 ms).
    assert await answer(client, "15165550101") == PERSONAL
    failed = 'callscreen_subscriber_cache_renewals_total{result="failed"}'
    await wait_for(lambda: metric_is_at_least(client, failed, 1), timeout_s=2.0)
    assert await metric(client, RENEWED) == 0
    # Redis answers again: once the entry aged out a call reads it, and renewals resume.
    await asyncio.sleep(0.5)
    assert await answer(client, "15165550101") == PERSONAL
    assert await metric(client, MISSES) == 2

    async def renewed() -> bool:
        assert await answer(client, "15165550101") == PERSONAL
        return await metric(client, RENEWED) >= 1

    await wait_for(renewed, timeout_s=3.0, interval_s=0.1)


async def metric_is_at_least(client: Any, line: str, value: float) -> bool:
    return await metric(client, line) >= value
