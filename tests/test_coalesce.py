"""Calls that need Redis in the same event-loop turn share one round trip (issue 19), and
each keeps its own deadline and its own failures: on one server and on a Cluster with a
frozen master."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from core import keys
from core.store import ListStore
from devtools.redis_server import LocalCluster, RedisProcess
from tests.helpers import CountingConnection

WINDOWS = [("p:flood", 60)]
CALLERS = [f"1516555{i:04d}" for i in range(30)]


@pytest.fixture
async def counting(redis: Redis, redis_server: RedisProcess) -> AsyncIterator[Redis]:
    """A client on redis-py's own connections (as for Sentinel or TLS), counting writes."""
    pool = ConnectionPool.from_url(redis_server.url, connection_class=CountingConnection)
    client = Redis(connection_pool=pool)
    yield client
    await client.aclose()
    await pool.disconnect()  # a pool passed in is not closed by the client


def check_own_counts(calls: list[str], counts: list[dict[str, int]]) -> None:
    """Each call got its own reply: the n-th call of a caller saw n in its window."""
    seen: dict[str, list[int]] = {}
    for caller, got in zip(calls, counts, strict=True):
        seen.setdefault(caller, []).append(got["p:flood"])
    for i, caller in enumerate(CALLERS):
        assert seen[caller] == list(range(1, i + 2))


async def test_concurrent_calls_share_one_write_and_get_their_own_counts(redis: Redis) -> None:
    store = ListStore(redis)
    assert store.dispatcher.lean  # a plain server: the calls' own connection (core/wire.py)
    now_s = 1_000_000.0
    await store.count_call("15165559999", WINDOWS, now_s)  # connected
    writes, callers = store.dispatcher.sent()
    # Caller i calls i+1 times, all in the same turn.
    calls = [c for i, c in enumerate(CALLERS) for _ in range(i + 1)]
    counts = await asyncio.gather(*(store.count_call(c, WINDOWS, now_s) for c in calls))
    after_writes, after_callers = store.dispatcher.sent()
    assert (after_writes - writes, after_callers - callers) == (1, len(calls))
    check_own_counts(calls, counts)


async def test_on_redis_py_connections_the_turn_still_shares_one_pipeline(
    counting: Redis,
) -> None:
    store = ListStore(counting)
    assert not store.dispatcher.lean
    now_s = 1_000_000.0
    # Two connections made (one call alone, one joined), so none is opened below.
    await asyncio.gather(*(store.count_call("15165559999", WINDOWS, now_s) for _ in range(2)))
    # Their batch's task and any write sent after them finish first: one still running
    # would make the next call join it rather than go alone (a loaded machine's race).
    await store.coalescer.aclose()
    await store.drain()
    before_sends, before_batches = CountingConnection.sends, store.coalescer.batches
    calls = [c for i, c in enumerate(CALLERS) for _ in range(i + 1)]
    counts = await asyncio.gather(*(store.count_call(c, WINDOWS, now_s) for c in calls))
    # The first call, with nothing in flight, goes at once; the others of the turn join.
    assert CountingConnection.sends - before_sends == 2
    assert store.coalescer.batches - before_batches == 1
    assert store.coalescer.callers == 1 + len(calls) - 1
    check_own_counts(calls, counts)


async def test_one_call_gone_past_its_deadline_leaves_the_batch_to_the_others(
    redis: Redis,
) -> None:
    store = ListStore(redis)
    now_s = 2_000_000.0

    async def hasty() -> None:
        # Zero time: gives up before the turn's write.
        async with asyncio.timeout(0):
            await store.count_call("15165550001", WINDOWS, now_s)

    results = await asyncio.gather(
        store.count_call("15165550002", WINDOWS, now_s),
        hasty(),
        store.count_call("15165550003", WINDOWS, now_s),
        return_exceptions=True,
    )
    assert isinstance(results[1], TimeoutError)
    assert results[0] == results[2] == {"p:flood": 1}
    assert store.dispatcher.sent()[1] == 2
    # The hasty call's commands were never sent: it counted nothing.
    index = int(now_s // 60)
    assert await redis.get(keys.rate("15165550001", "p:flood", index)) is None
    assert await redis.get(keys.rate("15165550002", "p:flood", index)) == b"1"


async def test_a_frozen_master_fails_only_the_calls_that_read_it(
    cluster: LocalCluster, cluster_redis: RedisCluster
) -> None:
    """Thirty calls in one turn over three masters, one frozen: each call with its own
    100 ms deadline; those reading the frozen master time out, the others are answered
    at once from the same coalesced batch."""
    store = ListStore(cluster_redis)
    now_s = 3_000_000.0
    await store.count_call(CALLERS[0], WINDOWS, now_s)  # slot map and connections

    def node_of(caller: str) -> str:
        node = cluster_redis.get_node_from_key(keys.rate(caller, "p:flood", 0))
        assert node is not None
        return str(node.name)

    frozen_name = node_of(CALLERS[1])
    frozen = next(n for n in cluster.nodes if f"127.0.0.1:{n.port}" == frozen_name)
    on_frozen = {c for c in CALLERS if node_of(c) == frozen_name}
    assert on_frozen and len(on_frozen) < len(CALLERS)

    async def call(caller: str) -> tuple[str, object, float]:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(0.1):
                got: object = await store.count_call(caller, WINDOWS, now_s)
        except (TimeoutError, RedisError) as exc:
            got = type(exc)
        return caller, got, time.perf_counter() - started

    # Frozen for one deadline's worth: well under cluster-node-timeout (shared fixture).
    frozen.pause()
    try:
        results = await asyncio.gather(*(call(c) for c in CALLERS))
    finally:
        frozen.resume()
    for caller, got, took_s in results:
        if caller in on_frozen:
            assert got is TimeoutError, caller
            assert took_s < 0.5
        else:
            assert got == {"p:flood": 1 + (caller == CALLERS[0])}, caller  # in time
    # The frozen node's calls are answered again once it is back.
    assert (await store.count_call(CALLERS[1], WINDOWS, now_s + 0.1))["p:flood"] >= 1
