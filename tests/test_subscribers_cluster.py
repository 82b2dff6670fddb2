"""Subscribers lists on a real 3-master Redis Cluster: buckets spread, calls answered right,
a slow master's subscribers answered by on_error within the deadline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster

from core import bucket_gens, keys
from core.config import Config
from devtools.redis_server import LocalCluster
from loader.sync import SyncOptions, sync_list
from tests.helpers import PERSONAL_ALLOW, PERSONAL_BLOCK, ready_client, wait_for
from tests.test_subscribers import ON_ERROR, PERSONAL, answer
from tests.test_subscribers_lost import (
    SUBSCRIBERS,
    lost_config,
    served_on_cluster,
    write_source,
)

ADMIN_TOKEN = "cluster-subscribers-admin-token-01"


async def test_subscribers_spread_over_the_masters_and_calls_are_answered(
    cluster: LocalCluster,
    cluster_redis: RedisCluster,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CALLSCREEN_ADMIN_TOKENS", ADMIN_TOKEN)
    subscribers = SUBSCRIBERS
    write_source(tmp_path)
    data = {
        "redis": {"url": cluster.url},
        "cache": {"refresh_ms": 100, "max_stale_ms": 2000},
        # A call's first read opens the connection to its bucket's master (core/shards.py
        # connects per node on first use): on a busy CI machine that took over 100 ms.
        # What this test checks is where the buckets live and that calls are answered.
        "handler": {"deadline_ms": 1000},
        "lists": {"personal": {"kind": "subscribers", "source": "personal.csv"}},
        "policies": {"default": {"rules": [PERSONAL_ALLOW, PERSONAL_BLOCK]}},
        "trunk_groups": {"main": {"policy": "default"}},
    }
    config = make_config(data, base_dir=tmp_path)
    report = await sync_list(cluster_redis, config, "personal")
    assert report.result is not None and report.result.size == 121
    gen = int(await cluster_redis.hget(keys.meta("personal"), "gen") or 0)
    nodes = set()
    for s in subscribers:
        key = keys.subscribers("personal", keys.subscriber_bucket_of(s), gen)
        node = cluster_redis.get_node_from_key(key)
        assert node is not None
        nodes.add(node.name)
    assert len(nodes) == 3  # the buckets of one list spread over every master

    client = await ready_client(make_client, config)
    for i, s in enumerate(subscribers):
        assert await answer(client, f"1516555{i:04d}", s) == PERSONAL
        assert await answer(client, f"1516555{(i + 1) % 60:04d}", s) == []  # another's
    assert await answer(client, "19005551234", subscribers[5]) == PERSONAL
    assert await answer(client, "19005550000", subscribers[0]) == []
    # An admin change lands in its bucket's slot; the write count (on the meta's
    # master) moves, and the cached subscriber is read again within a refresh.
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    path = f"/v1/lists/personal/subscribers/{subscribers[7]}/entries/15165550001"
    assert (await client.put(path, headers=admin)).status == 200

    async def changed() -> bool:
        return bool(await answer(client, "15165550001", subscribers[7]) == PERSONAL)

    await wait_for(changed, timeout_s=2.0)
    # A second sync swaps the generation; workers follow within a refresh.
    source = tmp_path / "personal.csv"
    rows = source.read_text().removesuffix(f"{subscribers[0]},19005550000,allow\n")
    source.write_text(rows.replace("1900*", "1976*"))
    await sync_list(cluster_redis, config, "personal", SyncOptions(force=True))

    async def swapped() -> bool:
        return bool(await answer(client, "19005551234", subscribers[5]) == [])

    await wait_for(swapped, timeout_s=2.0)
    assert await answer(client, "19765551234", subscribers[5]) == PERSONAL
    # Only the changed buckets were written (every subscriber's here): the new
    # generation's map, in the meta's slot, names the others where the first sync put
    # them.
    new_gen = int(await cluster_redis.hget(keys.meta("personal"), "gen") or 0)
    named = await bucket_gens.read(cluster_redis, "personal", new_gen)
    held = {keys.subscriber_bucket_of(s) for s in subscribers}
    assert {named.of(b) for b in held} == {new_gen}
    assert {named.of(b) for b in range(keys.SUBSCRIBER_BUCKETS) if b not in held} == {gen}
    # The admin write outlived the sync: kept in the admin overlay, in its bucket's slot.
    assert await answer(client, "15165550001", subscribers[7]) == PERSONAL
    bucket = keys.subscriber_bucket_of(subscribers[7])
    overlay_key = keys.subscriber_overlay("personal", bucket)
    assert await cluster_redis.exists(overlay_key) == 1
    slot = cluster_redis.keyslot(keys.subscribers("personal", bucket, gen))
    assert cluster_redis.keyslot(overlay_key) == slot
    metrics = await (await client.get("/metrics")).text()
    assert 'callscreen_on_error_total{reason="redis_error"} 0.0' in metrics


async def test_a_slow_master_answers_its_subscribers_by_on_error_within_the_deadline(
    cluster: LocalCluster,
    cluster_redis: RedisCluster,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """A frozen master: calls reading its buckets hit ``handler.deadline_ms`` (on_error,
    ``deadline``); calls to subscribers on the other masters are answered meanwhile."""
    write_source(tmp_path)
    data = lost_config(cluster.url)
    data["handler"]["deadline_ms"] = 100
    config = make_config(data, base_dir=tmp_path)
    client, meta_node, where = await served_on_cluster(cluster_redis, config, make_client)
    slow_name = sorted({n for n in where.values() if n != meta_node})[0]
    slow = next(n for n in cluster.nodes if f"127.0.0.1:{n.port}" == slow_name)
    victim = next(s for s in SUBSCRIBERS if where[s] == slow_name)
    other = next(s for s in SUBSCRIBERS if where[s] != slow_name)
    i, j = SUBSCRIBERS.index(victim), SUBSCRIBERS.index(other)
    # Frozen for two deadlines' worth of calls only: well under cluster-node-timeout, so
    # the cluster never marks it failed (the fixture is shared).
    slow.pause()
    try:
        assert await answer(client, f"1516555{i:04d}", victim) == ON_ERROR
        assert await answer(client, f"1516555{j:04d}", other) == PERSONAL
    finally:
        slow.resume()
    metrics = await (await client.get("/metrics")).text()
    assert 'callscreen_on_error_total{reason="deadline"} 1.0' in metrics

    async def answered() -> bool:
        return bool(await answer(client, f"1516555{i:04d}", victim) == PERSONAL)

    await wait_for(answered)
