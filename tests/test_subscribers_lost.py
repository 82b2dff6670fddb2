"""A subscribers list that lost some buckets but kept its ``meta``: calls to them by on_error.

Every bucket of a generation carries a marker field (core/keys.py), read with the
subscriber in the call's one round trip: a bucket without it is one Redis lost (on a
Cluster, a master failed over to an empty or lagging replica while the master holding
``meta`` kept its data). Calls to the subscribers of such a bucket are answered by
``on_error`` with reason ``list_lost``; the others are answered from their entries;
``/readyz`` stays 200 (docs/subscribers.md says why); a full sync repairs it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from core import keys
from core.config import Config
from core.subscribers import _RESERVE_GEN, SubscriberStore, code_of, mark_buckets
from devtools.redis_server import LocalCluster
from loader.sync import SyncOptions, sync_list
from tests.helpers import PERSONAL_ALLOW, PERSONAL_BLOCK, metric, ready_client, wait_for
from tests.test_subscribers import ON_ERROR, PERSONAL, answer, call_body

TOKEN = "subscribers-lost-admin-token-0123"
RATE = [{"action": "reject", "operands": ["busy-here", "too-many-calls"]}]
SUBSCRIBERS = [f"1951262{i:04d}" for i in range(60)]


def lost_config(redis_url: str | None = None) -> dict[str, Any]:
    """Two trunk groups: ``main`` (allow, then block) and ``rate`` (a call-rate rule first)."""
    data: dict[str, Any] = {
        # Every call reads Redis (no entries cache): the tests are of what Redis shows.
        "cache": {"refresh_ms": 100, "max_stale_ms": 5000, "subscriber_entries": 0},
        # A deadline no Redis hiccup of a busy test machine reaches: on_error here must
        # mean a lost bucket, never a slow read.
        "handler": {"on_error": "reject", "on_error_operands": ["unavailable", "redis-trouble"],
                    "deadline_ms": 2000},
        "lists": {"personal": {"kind": "subscribers", "source": "personal.csv"}},
        "policies": {
            "main": {"rules": [PERSONAL_ALLOW, PERSONAL_BLOCK]},
            "rate": {
                "rules": [
                    {"name": "flood", "match": "call_rate", "limit": 1, "window_s": 60,
                     "operands": ["busy-here", "too-many-calls"]},
                    PERSONAL_BLOCK,
                ]
            },
        },
        "default_policy": "main",
        "trunk_groups": {"main": {"policy": "main"}, "rate": {"policy": "rate"}},
    }  # fmt: skip
    if redis_url:
        data["redis"] = {"url": redis_url}
    return data


def write_source(folder: Path) -> None:
    rows = "".join(f"{s},1516555{i:04d}\n{s},1900*\n" for i, s in enumerate(SUBSCRIBERS))
    (folder / "personal.csv").write_text(rows + f"{SUBSCRIBERS[0]},19005550000,allow\n")


LOST = 'callscreen_on_error_total{reason="list_lost"}'


async def served_on_cluster(
    cluster_redis: RedisCluster, config: Config, make_client: Callable[..., Any]
) -> tuple[Any, str, dict[str, str]]:
    """Sync ``personal`` on the Cluster and serve it: the ready client, the node holding
    the list's ``meta``, and the node holding each of SUBSCRIBERS' buckets."""
    await sync_list(cluster_redis, config, "personal")
    gen = int(await cluster_redis.hget(keys.meta("personal"), "gen") or 0)
    client = await ready_client(make_client, config)

    def node_of(key: str) -> str:
        node = cluster_redis.get_node_from_key(key)
        assert node is not None
        return str(node.name)

    where = {
        s: node_of(keys.subscribers("personal", keys.subscriber_bucket_of(s), gen))
        for s in SUBSCRIBERS
    }
    return client, node_of(keys.meta("personal")), where


async def test_a_lost_bucket_answers_its_subscribers_by_on_error(
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CALLSCREEN_ADMIN_TOKENS", TOKEN)
    write_source(tmp_path)
    config = make_config(lost_config(), base_dir=tmp_path)
    await sync_list(redis, config, "personal")
    gen = int(await redis.hget(keys.meta("personal"), "gen") or 0)
    client = await ready_client(make_client, config)
    victim, other = SUBSCRIBERS[3], SUBSCRIBERS[4]
    bucket = keys.subscriber_bucket_of(victim)
    assert keys.subscriber_bucket_of(other) != bucket
    # Every bucket carries the marker, empty ones too.
    empty = next(b for b in range(keys.SUBSCRIBER_BUCKETS)
                 if b not in {keys.subscriber_bucket_of(s) for s in SUBSCRIBERS})  # fmt: skip
    assert await redis.hgetall(keys.subscribers("personal", empty, gen)) == {
        keys.SUBSCRIBER_MARKER.encode(): str(gen).encode()
    }
    assert await answer(client, "15165550003", victim) == PERSONAL
    await redis.delete(keys.subscribers("personal", bucket, gen))  # Redis lost that bucket

    assert await answer(client, "15165550003", victim) == ON_ERROR  # its block entry
    assert await answer(client, "15165559999", victim) == ON_ERROR  # on no entry: unknown
    assert await answer(client, "15165550004", other) == PERSONAL  # another bucket: answered
    assert await answer(client, "15165559999", other) == []
    assert await metric(client, LOST) == 2
    admin = {"Authorization": f"Bearer {TOKEN}"}
    explained = await client.post(
        "/v1/explain/tg/main", json=call_body("15165550003", victim), headers=admin
    )
    body = await explained.json()
    assert (body["rule"], body["on_error"]) == ("on_error", "list_lost")
    assert await metric(client, LOST) == 3  # explain's answer is by on_error too
    # A rule ahead of the list still decides: the second call breaks the call-rate limit.
    first = await client.post("/tg/rate", json=call_body("15165550777", victim))
    assert await first.json() == ON_ERROR  # within the limit: reached the lost list
    second = await client.post("/tg/rate", json=call_body("15165550777", victim))
    assert await second.json() == RATE
    assert await metric(client, LOST) == 4
    # Ready: the loss is per bucket, seen by calls alone (docs/subscribers.md); the
    # operator's /readyz names the list and how many of its buckets calls found lost.
    ready = await client.get("/readyz")
    assert ready.status == 200
    report = (await ready.json())["lost_buckets"]
    assert report == {
        "personal": {"gen": gen, "buckets_seen_lost": 1, "share": 1 / keys.SUBSCRIBER_BUCKETS}
    }
    # The admin GET flags the lost bucket; another bucket's subscriber is not flagged.
    path = "/v1/lists/personal/subscribers"
    got = await (await client.get(f"{path}/{victim}", headers=admin)).json()
    assert (got["lost"], got["block"]) == (True, [])
    assert (await (await client.get(f"{path}/{other}", headers=admin)).json())["lost"] is False
    # An admin write lands, but does not make the bucket trusted again.
    put = await client.put(
        f"/v1/lists/personal/subscribers/{victim}/entries/15165550888", headers=admin
    )
    assert put.status == 200
    assert (await put.json())["lost"] is True
    assert await answer(client, "15165550888", victim) == ON_ERROR
    # A full sync writes a new generation with every bucket: answered again.
    report = await sync_list(redis, config, "personal", SyncOptions(force=True))
    assert report.outcome == "success"

    async def repaired() -> bool:
        return bool(await answer(client, "15165550003", victim) == PERSONAL)

    await wait_for(repaired)
    # Not in the source, but an admin write on a list with a source: the overlay keeps it.
    assert await answer(client, "15165550888", victim) == PERSONAL


async def test_a_sync_rewrites_buckets_it_finds_lost(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """The diff takes a lost bucket as empty: its pairs count as added, none as removed."""
    write_source(tmp_path)
    config = make_config(lost_config(), base_dir=tmp_path)
    await sync_list(redis, config, "personal")
    store = SubscriberStore(redis)
    gen = await store.gen("personal")
    lost = {keys.subscriber_bucket_of(s) for s in SUBSCRIBERS[:5]}
    await redis.delete(*(keys.subscribers("personal", b, gen) for b in lost))
    # An admin write into a lost bucket recreates it without its marker.
    await store.change("personal", SUBSCRIBERS[0], "15165550999", "block")
    report = await sync_list(redis, config, "personal")
    assert report.result is not None and report.outcome == "success"
    lost_pairs = sum(
        2 + (s == SUBSCRIBERS[0]) for s in SUBSCRIBERS if keys.subscriber_bucket_of(s) in lost
    )
    assert (report.result.added, report.result.removed) == (lost_pairs, 0)
    new_gen = await store.gen("personal")
    for bucket in lost:
        key = keys.subscribers("personal", bucket, new_gen)
        marker = await redis.hget(key, keys.SUBSCRIBER_MARKER)
        assert marker == str(new_gen).encode()
    assert (await store.read("personal", SUBSCRIBERS[0]))[1].as_dict()["block"] == [
        "15165550000",
        "1900*",
    ]


async def test_a_cluster_master_lost_answers_its_buckets_by_on_error(
    cluster: LocalCluster,
    cluster_redis: RedisCluster,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    tmp_path: Path,
) -> None:
    write_source(tmp_path)
    config = make_config(lost_config(cluster.url), base_dir=tmp_path)
    client, meta_node, where = await served_on_cluster(cluster_redis, config, make_client)
    flushed = sorted({n for n in where.values() if n != meta_node})[0]
    lost = [s for s in SUBSCRIBERS if where[s] == flushed]
    kept = [s for s in SUBSCRIBERS if where[s] != flushed]
    assert lost and kept and any(where[s] == meta_node for s in kept)
    for i, s in enumerate(SUBSCRIBERS):
        assert await answer(client, f"1516555{i:04d}", s) == PERSONAL
    # That master comes back empty (failed over to an empty replica); meta's master kept
    # its data, so the list's meta shows nothing wrong.
    host, port = flushed.rsplit(":", 1)
    node = Redis(host=host, port=int(port))
    try:
        await node.flushall()
    finally:
        await node.aclose()

    before = await metric(client, LOST)
    for i, s in enumerate(SUBSCRIBERS):
        expected = ON_ERROR if s in lost else PERSONAL
        assert await answer(client, f"1516555{i:04d}", s) == expected, (s, where[s])
        assert await answer(client, "19005551234", s) == expected  # the 1900* prefix
    assert await answer(client, "19005550000", SUBSCRIBERS[0]) == (
        ON_ERROR if SUBSCRIBERS[0] in lost else []
    )
    calls = 2 * len(lost) + (SUBSCRIBERS[0] in lost)
    assert await metric(client, LOST) - before == calls
    assert (await client.get("/readyz")).status == 200
    # A full sync rewrites the generation, every master's buckets included.
    await sync_list(cluster_redis, config, "personal")

    async def repaired() -> bool:
        return all([await answer(client, "19005551234", s) == PERSONAL for s in lost])

    await wait_for(repaired)


async def markers(redis: Redis | RedisCluster, name: str, gen: int) -> set[Any]:
    """The marker of every bucket of ``gen`` (None for a bucket without one)."""
    async with redis.pipeline(transaction=False) as pipe:
        for bucket in range(keys.SUBSCRIBER_BUCKETS):
            pipe.hget(keys.subscribers(name, bucket, gen), keys.SUBSCRIBER_MARKER)
        return set(await pipe.execute())


async def test_a_writer_killed_while_marking_is_finished_by_the_next_one(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    store = SubscriberStore(redis)
    # A writer reserved generation 1 and marked part of it, then died.
    live, marking = await redis.eval(_RESERVE_GEN, 1, keys.meta("adminonly"))
    assert (live, marking) == (0, 1)
    await redis.hset(keys.subscribers("adminonly", 5, 1), keys.SUBSCRIBER_MARKER, 1)
    assert await store.gen("adminonly") == 0  # never made live: no call reads it
    # The next write marks the same generation whole, then makes it live.
    assert await store.change("adminonly", SUBSCRIBERS[0], "15165550101", "block") == 1
    assert await markers(redis, "adminonly", 1) == {b"1"}
    assert not await redis.hexists(keys.meta("adminonly"), "marking")
    # A generation marked but never adopted (its writer lost to a full sync) is deleted
    # by a later sync of the list, once one is live.
    write_source(tmp_path)
    config = make_config(lost_config(), base_dir=tmp_path)
    await sync_list(redis, config, "personal")
    await redis.eval(_RESERVE_GEN, 1, keys.meta("personal"))  # gen is live: no reservation
    await redis.hset(keys.meta("personal"), "marking", 99)
    await mark_buckets(redis, "personal", 99)
    await sync_list(redis, config, "personal", SyncOptions(force=True))
    assert await markers(redis, "personal", 99) == {None}
    assert not await redis.hexists(keys.meta("personal"), "marking")


async def test_an_admin_only_list_on_a_cluster_gets_every_bucket_marked(
    cluster_redis: RedisCluster,
) -> None:
    store = SubscriberStore(cluster_redis)
    changes: dict[str, dict[str, bool]] = {
        s: {code_of("1900*", "block"): True} for s in SUBSCRIBERS
    }
    assert await store.bulk_change("adminonly", changes) == 1
    assert await markers(cluster_redis, "adminonly", 1) == {b"1"}
    for s in SUBSCRIBERS:
        assert (await store.read("adminonly", s))[1].as_dict()["block"] == ["1900*"]


async def test_a_sync_with_only_empty_buckets_lost_still_writes_them(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """No pair changed, but a bucket lost its marker: the sync commits, not "unchanged"."""
    write_source(tmp_path)
    config = make_config(lost_config(), base_dir=tmp_path)
    await sync_list(redis, config, "personal")
    store = SubscriberStore(redis)
    gen = await store.gen("personal")
    used = {keys.subscriber_bucket_of(s) for s in SUBSCRIBERS}
    empty = next(b for b in range(keys.SUBSCRIBER_BUCKETS) if b not in used)
    await redis.delete(keys.subscribers("personal", empty, gen))
    report = await sync_list(redis, config, "personal")
    assert report.outcome == "success"
    assert report.result is not None and (report.result.added, report.result.removed) == (0, 0)
    new_gen = await store.gen("personal")
    assert new_gen != gen
    marker = await redis.hget(keys.subscribers("personal", empty, new_gen), keys.SUBSCRIBER_MARKER)
    assert marker == str(new_gen).encode()
