"""The subscribers bulk change (POST /v1/lists/{name}/subscribers) on a real Redis and Cluster.

Its guards are those of the other bulk change: body size and shape, then the item count
(before any item is looked at), then every item, and nothing is written when any fails;
a subscriber taken past 100 entries refuses the whole change too (409).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from core import keys
from core.config import Config
from core.subscribers import MAX_ENTRIES
from devtools.redis_server import LocalCluster
from loader.sync import sync_list
from tests.helpers import ready_client, wait_for
from tests.test_subscribers import PERSONAL, SUB_A, SUB_B, answer, subscribers_config

Client = TestClient[Any, Any]
TOKEN = "subscribers-bulk-admin-token-0123"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
BULK = "/v1/lists/personal/subscribers"


def many(count: int, first: int = 0) -> list[str]:
    """``count`` subscriber numbers (canonical)."""
    return [f"1951262{i:04d}" for i in range(first, first + count)]


async def snapshot(redis: Redis | RedisCluster) -> dict[bytes, Any]:
    """Every key with its value: strings and hashes (what a subscribers list uses).

    The audit trail is left out: a change sent again is a request worth recording.
    """
    names = [key async for key in redis.scan_iter(count=1000) if key != keys.AUDIT_LOG.encode()]
    async with redis.pipeline(transaction=False) as pipe:
        for key in names:
            pipe.type(key)
        kinds = await pipe.execute()
    async with redis.pipeline(transaction=False) as pipe:
        for key, kind in zip(names, kinds, strict=True):
            if kind == b"hash":
                pipe.hgetall(key)
            elif kind == b"string":
                pipe.get(key)
            else:
                pipe.type(key)
        values = await pipe.execute()
    return dict(zip(names, values, strict=True))


async def post(client: Client, body: Any) -> tuple[int, Any]:
    response = await client.post(BULK, json=body, headers=ADMIN)
    return response.status, await response.json()


@pytest.fixture
async def client(
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Client:
    monkeypatch.setenv("CALLSCREEN_ADMIN_TOKENS", TOKEN)
    (tmp_path / "personal.csv").write_text(f"{SUB_A},15165550101\n{SUB_B},15165550102\n")
    data = subscribers_config(admin={"max_bulk_entries": 2000, "max_body_bytes": 200_000})
    config = make_config(data, base_dir=tmp_path)
    await sync_list(redis, config, "personal")
    made: Client = await make_client(config)

    async def ready() -> bool:
        return bool((await made.get("/readyz")).status == 200)

    await wait_for(ready)
    return made


async def test_many_subscribers_change_in_one_request(client: Client, redis: Redis) -> None:
    subscribers = many(300)
    adds = [
        {"subscriber": s, "entry": f"1516555{i:04d}", "side": "block"}
        for i, s in enumerate(subscribers)
    ]
    adds += [{"subscriber": s, "entry": "1900*"} for s in subscribers[:100]]  # block default
    adds += [{"subscriber": s, "entry": "+1 (900) 555-0000", "side": "allow"} for s in subscribers]
    removes = [{"subscriber": SUB_A, "entry": "15165550101"}]
    status, body = await post(client, {"add": adds, "remove": removes})
    assert status == 200, body
    expected = {"list": "personal", "gen": body["gen"], "added": 700, "removed": 1}
    assert body == {**expected, "subscribers": 301}
    # The very next call sees every change.
    assert await answer(client, "15165550007", subscribers[7]) == PERSONAL
    assert await answer(client, "15165550007", subscribers[8]) == []
    assert await answer(client, "19005551234", subscribers[50]) == PERSONAL  # 1900*
    assert await answer(client, "19005550000", subscribers[50]) == []  # allowed ahead of it
    assert await answer(client, "19005551234", subscribers[150]) == []  # no prefix there
    assert await answer(client, "15165550101", SUB_A) == []  # removed
    assert await answer(client, "15165550102", SUB_B) == PERSONAL  # untouched
    response = await client.get(f"{BULK}/{subscribers[50]}", headers=ADMIN)
    entries = await response.json()
    assert (entries["block"], entries["allow"]) == (["15165550050", "1900*"], ["19005550000"])
    # Sent again: the same answer, nothing moves (each item is idempotent).
    before = await snapshot(redis)
    status, again = await post(client, {"add": adds, "remove": removes})
    assert (status, again) == (200, body)
    assert await snapshot(redis) == before
    # Sides are separate: allowing keeps the block entry; a removal names its side.
    moves = {
        "add": [{"subscriber": subscribers[7], "entry": "15165550007", "side": "allow"}],
        "remove": [
            {"subscriber": subscribers[50], "entry": "19005550000"},  # block: not there
            {"subscriber": subscribers[51], "entry": "19005550000", "side": "allow"},
        ],
    }
    assert (await post(client, moves))[0] == 200
    assert await answer(client, "15165550007", subscribers[7]) == []  # allow rule first
    entries = await (await client.get(f"{BULK}/{subscribers[7]}", headers=ADMIN)).json()
    assert (entries["block"], entries["allow"]) == (
        ["15165550007", "1900*"],
        ["15165550007", "19005550000"],
    )
    assert await answer(client, "19005550000", subscribers[50]) == []  # still allowed
    assert await answer(client, "19005550000", subscribers[51]) == PERSONAL  # 1900* blocks


async def test_the_change_is_checked_whole_before_anything_is_written(
    client: Client, redis: Redis
) -> None:
    before = await snapshot(redis)
    good = {"subscriber": SUB_A, "entry": "15165550199"}
    # The body's shape.
    for body, error in (
        ({}, "nothing to change"),
        ({"add": []}, "nothing to change"),
        ({"add": "x"}, '"add" must be an array of objects'),
        ({"add": [good], "other": 1}, "the body must be an object"),
        ([good], "the body must be an object"),
    ):
        status, answer_ = await post(client, body)
        assert (status, error in answer_["error"]) == (400, True), (body, answer_)
    # Too many items: refused before any is looked at (even bad ones).
    status, refused = await post(client, {"add": [good] * 1500, "remove": ["junk"] * 501})
    assert (status, refused["error"]) == (413, "2001 items in one request; at most 2000")
    big = {"add": [{"subscriber": SUB_A, "entry": "1" * 100}] * 1900}
    assert (await post(client, big))[0] == 413  # over admin.max_body_bytes
    # Every bad item is reported with its field and index; the good ones are not written.
    status, refused = await post(
        client,
        {
            "add": [
                good,
                "15165550101",
                {"subscriber": SUB_A},
                {"subscriber": "not-a-number", "entry": "15165550101"},
                {"subscriber": SUB_A, "entry": "19x*"},
                {"subscriber": SUB_A, "entry": "15165550101", "side": "maybe"},
            ],
            "remove": [{"subscriber": SUB_A, "entry": "15165550101", "side": "both"}],
        },
    )
    assert status == 400 and refused["error"] == "6 bad items; nothing was changed"
    reports = refused["bad_entries"]
    assert [(r["field"], r["index"]) for r in reports] == [
        ("add", 1), ("add", 2), ("add", 3), ("add", 4), ("add", 5), ("remove", 0),
    ]  # fmt: skip
    assert reports[0]["error"] == "not an object" and "entry" not in reports[0]
    assert reports[1]["error"].startswith("entry: Field required")
    assert reports[2]["subscriber"] == "not-a-number" and "subscriber" in reports[2]["error"]
    assert reports[3]["entry"] == "19x*" and "prefix" in reports[3]["error"]
    assert reports[4]["error"].startswith("side: ")
    assert reports[5]["error"].startswith("side: ")
    # The example of docs/api.md, answer for answer.
    example = {
        "add": [{"subscriber": SUB_A, "entry": "1900*"}, {"subscriber": SUB_A, "entry": "junk"}]
    }
    assert await post(client, example) == (400, {
        "error": "1 bad items; nothing was changed",
        "bad_entries": [{"field": "add", "index": 1, "entry": "junk", "subscriber": SUB_A,
                         "error": "not a number (or a prefix ending in *): 'junk'"}],
    })  # fmt: skip
    # A pair both added and removed on the same side (spelled differently); adding it
    # on both sides is fine.
    status, refused = await post(
        client,
        {
            "add": [good, {"subscriber": "+1 951 262 3062", "entry": "1900*", "side": "allow"},
                    {"subscriber": SUB_A, "entry": "1900*", "side": "block"}],
            "remove": [{"subscriber": SUB_A, "entry": "(516) 555-0199"},
                       {"subscriber": SUB_A, "entry": "1900*", "side": "allow"}],
        },
    )  # fmt: skip
    assert status == 400
    assert refused["entries"] == [f"{SUB_A}:15165550199 (block)", f"{SUB_A}:1900* (allow)"]
    # A subscriber taken past 100 entries: 409, and the other subscribers' changes are
    # not written either.
    full = [{"subscriber": SUB_B, "entry": f"1516556{i:04d}"} for i in range(MAX_ENTRIES)]
    status, refused = await post(client, {"add": [good, *full]})
    assert status == 409 and SUB_B in refused["error"] and "nothing was changed" in refused["error"]
    assert await snapshot(redis) == before
    # Exactly 100 fits (SUB_B's synced entry is removed in the same change).
    remove = [{"subscriber": SUB_B, "entry": "15165550102"}]
    status, done = await post(client, {"add": full, "remove": remove})
    assert (status, done["added"], done["removed"]) == (200, MAX_ENTRIES, 1)
    # Another list kind, an unknown list, no token.
    other = "/v1/lists/blocklist/subscribers"
    response = await client.post(other, json={"add": [good]}, headers=ADMIN)
    assert response.status == 400 and "not a subscribers list" in (await response.json())["error"]
    response = await client.post("/v1/lists/nope/subscribers", json={"add": [good]}, headers=ADMIN)
    assert response.status == 404
    assert (await client.post(BULK, json={"add": [good]})).status == 401


async def test_an_admin_only_list_gets_a_generation_with_every_bucket_marked(
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CALLSCREEN_ADMIN_TOKENS", TOKEN)
    data = subscribers_config()
    data["lists"]["personal"] = {"kind": "subscribers"}  # no source: kept by the admin API
    config = make_config(data)
    client = await make_client(config)
    # Removals alone from a list that holds nothing: nothing to do, nothing written.
    status, body = await post(client, {"remove": [{"subscriber": SUB_A, "entry": "911"}]})
    assert (status, body["gen"]) == (200, 0)
    assert await redis.exists(keys.meta("personal")) == 0
    status, body = await post(client, {"add": [{"subscriber": SUB_A, "entry": "15165550101"}]})
    assert (status, body["gen"]) == (200, 1)
    meta = await redis.hgetall(keys.meta("personal"))
    assert (meta[b"gen"], meta[b"kind"], b"marking" in meta) == (b"1", b"subscribers", False)
    async with redis.pipeline(transaction=False) as pipe:
        for bucket in range(keys.SUBSCRIBER_BUCKETS):
            pipe.hget(keys.subscribers("personal", bucket, 1), keys.SUBSCRIBER_MARKER)
        markers = await pipe.execute()
    assert set(markers) == {b"1"}

    async def seen() -> bool:
        return bool(await answer(client, "15165550101") == PERSONAL)

    await wait_for(seen)  # the first generation reaches the worker with its next poll
    assert await answer(client, "15165550102") == []


async def test_bulk_change_on_a_cluster(
    cluster: LocalCluster,
    cluster_redis: RedisCluster,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CALLSCREEN_ADMIN_TOKENS", TOKEN)
    subscribers = many(90)
    (tmp_path / "personal.csv").write_text(
        "".join(f"{s},1516555{i:04d}\n" for i, s in enumerate(subscribers))
    )
    # A deadline no loaded test machine misses: the default on_error (allow) would answer
    # a late read [] as if the subscriber had no entry.
    data = subscribers_config(
        redis={"url": cluster.url}, cache={"refresh_ms": 100}, handler={"deadline_ms": 5000}
    )
    config = make_config(data, base_dir=tmp_path)
    await sync_list(cluster_redis, config, "personal")
    client = await ready_client(make_client, config)
    gen = int(await cluster_redis.hget(keys.meta("personal"), "gen") or 0)
    nodes = {
        str(node.name)
        for s in subscribers
        if (node := cluster_redis.get_node_from_key(
            keys.subscribers("personal", keys.subscriber_bucket_of(s), gen))) is not None
    }  # fmt: skip
    assert len(nodes) == 3
    change = {
        "add": [{"subscriber": s, "entry": "1900*"} for s in subscribers],
        "remove": [
            {"subscriber": s, "entry": f"1516555{i:04d}"} for i, s in enumerate(subscribers)
        ],
    }
    status, body = await post(client, change)
    assert (status, body["added"], body["removed"], body["gen"]) == (200, 90, 90, gen)
    for i, s in enumerate(subscribers):
        assert await answer(client, f"1900555{i:04d}", s) == PERSONAL
        assert await answer(client, f"1516555{i:04d}", s) == []
    # Over the cap on one subscriber: nothing written on any master.
    before = await snapshot(cluster_redis)
    full = [{"subscriber": subscribers[0], "entry": f"1516556{i:04d}"} for i in range(MAX_ENTRIES)]
    others = [{"subscriber": s, "entry": "1976*"} for s in subscribers[1:]]
    status, refused = await post(client, {"add": others + full})
    assert status == 409, refused
    assert await snapshot(cluster_redis) == before
