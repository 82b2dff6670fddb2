"""Per-subscriber block/allow lists on a real Redis: policy, handler, loader, admin, outage."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core import keys
from core.config import Config
from core.shards import LeanRedis
from core.subscribers import (
    MAX_ENTRIES,
    BadSubscriberEntry,
    Entries,
    SubscriberStore,
    canonical_entry,
    code_of,
    pack,
    settle,
)
from devtools.redis_server import RedisProcess
from loader.sync import SyncOptions, SyncRefused, sync_list
from service.appkeys import CACHE
from service.screening.lists import NumberList, SubscriberList
from service.screening.policy import CompiledPolicy, NeedsRates
from service.screening.request import CallParser
from service.screening.subscriber_cache import CachedFound, SubscriberCache
from tests.helpers import (
    PERSONAL_ALLOW,
    PERSONAL_BLOCK,
    REJECT,
    body_from,
    ready_client,
    sends,
    wait_for,
)
from tests.test_call_rate import load_blocklist

Client = TestClient[Any, Any]
ADMIN_TOKEN = "subscribers-test-admin-token-0123"
SUB_A = "19512623062"  # the To of the example body
SUB_B = "19512623063"
PERSONAL = [{"action": "reject", "operands": ["decline", "subscriber-block"]}]
ON_ERROR = [{"action": "reject", "operands": ["unavailable", "redis-trouble"]}]
CSV = f"""subscriber,entry,side
{SUB_A},15165550101,block
+1 951 262 3062,1900*
{SUB_A},19005550000,allow
{SUB_A},15162065613,allow
{SUB_B},15165550102
not-a-number,15165550101,block
{SUB_A},15165550103,maybe
"""


def subscribers_config(**extra: Any) -> dict[str, Any]:
    return {
        "lists": {
            "blocklist": {"kind": "numbers"},
            "personal": {
                "kind": "subscribers",
                "source": "personal.csv",
                "max_rejected_share": 0.5,
            },
        },
        "policies": {
            "default": {
                "rules": [
                    PERSONAL_ALLOW,
                    {"name": "blocklist", "match": "caller_in_list", "list": "blocklist"},
                    PERSONAL_BLOCK,
                ]
            }
        },
        "trunk_groups": {"main": {"policy": "default"}},
        **extra,
    }


def call_body(caller: str | None, called: str = SUB_A) -> dict[str, Any]:
    body = body_from(caller)
    body["To"][0]["user"] = called
    body["To"][0]["raw"] = f"<sip:{called}@10.1.10.190:5060>"
    return body


async def answer(client: Client, caller: str | None, called: str = SUB_A) -> Any:
    response = await client.post("/tg/main", json=call_body(caller, called))
    assert response.status == 200
    return await response.json()


# --- encoding and policy ------------------------------------------------------------------
def test_packing_round_trips_and_is_compact() -> None:
    codes = settle(
        [
            code_of("15165550101", "block"),
            code_of("1900*", "block"),
            code_of("1900*", "allow"),  # both sides: separate, both kept
            code_of("911", "allow"),
            code_of("911", "allow"),  # a duplicate is dropped
        ]
    )
    blob = pack(codes)
    assert len(blob) == 13  # 12 + 5 + 5 + 4 nibbles (digits and an end nibble each), padded
    entries = Entries.unpack(blob)
    assert entries.as_dict() == {"block": ["15165550101", "1900*"], "allow": ["911", "1900*"]}
    assert entries.match("block", "15165550101") == "15165550101"
    assert entries.match("allow", "19005551234") == "1900*"
    assert entries.match("block", "19005551234") == "1900*"  # on both sides
    assert entries.match("block", "19115551234") is None
    assert Entries.unpack(None).match("block", "1") is None
    ten = pack(settle(code_of(f"1516555{i:04d}", "block") for i in range(10)))
    assert len(ten) == 60  # under Redis's listpack value limit (64 bytes)


def test_entries_are_checked() -> None:
    assert canonical_entry("+1 (900) *") == "1900*"
    assert canonical_entry("(516) 555-0101") == "15165550101"
    for bad in ("*", "19x*", "hello"):
        with pytest.raises(BadSubscriberEntry):
            canonical_entry(bad)


def test_policy_stops_for_the_entries_then_decides(make_config: Callable[..., Config]) -> None:
    config = make_config(subscribers_config())
    policy = CompiledPolicy("default", config.policies["default"])
    assert policy.subscriber_lists == ("personal",)
    parser = CallParser(config.caller.sources, config.caller.default_country)
    lists: dict[str, Any] = {"personal": SubscriberList(3, 10)}
    lists["blocklist"] = NumberList([], frozenset({"15162065613"}), frozenset())
    call = parser.parse(call_body("15162065613"))
    stopped = policy.evaluate(call, lists)
    assert (
        isinstance(stopped, NeedsRates) and policy.rules[stopped.at].rule.name == "personal-allow"
    )
    allow = pack([code_of("15162065613", "allow")])
    decided = policy.conclude(call, lists, {}, {"personal": Entries.unpack(allow)})
    assert (decided.outcome.action, decided.outcome.rule) == ("allow", "personal-allow")
    assert decided.matched == f"15162065613 (subscriber {SUB_A})"
    # Without the allow entry the global block list decides; a subscriber block after it.
    decided = policy.conclude(call, lists, {}, {})
    assert decided.outcome.rule == "blocklist"
    other = parser.parse(call_body("19005551234"))
    block = Entries.unpack(pack([code_of("1900*", "block")]))
    assert policy.conclude(other, lists, {}, {"personal": block}).outcome.rule == "personal-block"
    # No caller number, or no called number: no match, and nothing to read.
    for anonymous in (
        parser.parse(call_body("anonymous")),
        parser.parse(call_body("19005551234", "")),
    ):
        assert policy.conclude(anonymous, lists).outcome.rule == "default"


def test_the_entries_cache_answers_as_the_rules_reach_it(
    make_config: Callable[..., Config],
) -> None:
    """A policy that needs only subscribers' entries from Redis looks in the cache as its
    subscriber rules are reached: it decides at once when the entries are cached and
    fresh, and stops for Redis where they are not, as a read would have it."""
    config = make_config(subscribers_config())
    policy = CompiledPolicy("default", config.policies["default"])
    parser = CallParser(config.caller.sources, config.caller.default_country)
    live = SubscriberList(3, 10)
    lists: dict[str, Any] = {"personal": live}
    lists["blocklist"] = NumberList([], frozenset({"15162065613"}), frozenset())
    now = [100.0]
    cache = SubscriberCache(100, 5_000, clock=lambda: now[0])
    view = CachedFound(cache)
    allowed = parser.parse(call_body("15162065613"))  # allowed by SUB_A, on the block list

    def decide(call: Any) -> Any:
        return policy.evaluate(call, lists, None, view.start(lists, call))

    stopped = decide(allowed)
    assert isinstance(stopped, NeedsRates)
    assert policy.rules[stopped.at].rule.name == "personal-allow"
    entries = Entries.unpack(pack([code_of("15162065613", "allow"), code_of("1900*", "block")]))
    cache.put("personal", live, SUB_A, entries, sent_at=now[0])
    assert decide(allowed).outcome.rule == "personal-allow"
    # Read by two rules (allow, then block after the block list), looked up once.
    blocked = parser.parse(call_body("19005551234"))
    assert decide(blocked).outcome.rule == "personal-block"
    assert list(view.served) == ["personal"]
    # Past its max age, or cached under a list copy a sync has replaced: Redis again.
    now[0] += 6
    assert isinstance(decide(blocked), NeedsRates)
    cache.put("personal", live, SUB_A, entries, sent_at=now[0])
    lists["personal"] = SubscriberList(4, 10)
    assert isinstance(decide(blocked), NeedsRates)
    # A list with nothing loaded (generation 0) holds no entries: nothing to read.
    lists["personal"] = SubscriberList(0, 0)
    assert decide(blocked).outcome.rule == "default"
    assert decide(allowed).outcome.rule == "blocklist"


# --- end to end on a real Redis -------------------------------------------------------------
@pytest.fixture
def personal_source(tmp_path: Path) -> Path:
    (tmp_path / "personal.csv").write_text(CSV)
    return tmp_path


async def test_calls_are_decided_by_the_called_subscriber(
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    personal_source: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CALLSCREEN_ADMIN_TOKENS", ADMIN_TOKEN)
    config = make_config(subscribers_config(), base_dir=personal_source)
    await load_blocklist(redis, ["15162065613"])
    report = await sync_list(redis, config, "personal")
    assert report.result is not None
    assert (report.result.size, report.rows_read, report.rows_rejected) == (5, 7, 2)
    assert report.outcome == "success"
    meta = await redis.hgetall(keys.meta("personal"))
    assert (meta[b"kind"], meta[b"size"], meta[b"subscribers"]) == (b"subscribers", b"5", b"2")
    client = await make_client(config)
    assert await answer(client, "15165550101") == PERSONAL  # A's block entry
    assert await answer(client, "15165550101", SUB_B) == []  # B did not block them
    assert await answer(client, "15165550102", SUB_B) == PERSONAL
    assert await answer(client, "19005551234") == PERSONAL  # A's prefix 1900*
    assert await answer(client, "19005550000") == []  # allowed ahead of the prefix
    assert await answer(client, "15162065613") == []  # allowed ahead of the global list
    assert await answer(client, "15162065613", SUB_B) == REJECT  # B: the global list
    assert await answer(client, "anonymous") == []  # no caller number: no match
    # Not held in worker memory: the worker keeps only the live generation.
    assert isinstance(client.app[CACHE].lists["personal"], SubscriberList)

    # Admin changes are seen once the poll saw the list's write count move (the
    # entries cache: docs/subscribers.md), within a cache refresh.
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    path = f"/v1/lists/personal/subscribers/{SUB_B}/entries/1516555019%2A"

    async def answered(caller: str, expected: Any) -> bool:
        return bool(await answer(client, caller, SUB_B) == expected)

    response = await client.put(path, headers=admin)
    assert response.status == 200, await response.text()
    assert (await response.json())["block"] == ["15165550102", "1516555019*"]
    await wait_for(lambda: answered("15165550199", PERSONAL), timeout_s=2.0)
    # Block and allow are separate sides: allowing leaves the block entry alone...
    response = await client.put(path + "?side=allow", headers=admin)
    body = await response.json()
    assert (body["block"], body["allow"]) == (["15165550102", "1516555019*"], ["1516555019*"])
    assert body["lost"] is False
    await wait_for(lambda: answered("15165550199", []), timeout_s=2.0)  # allow rule first
    # ...and a DELETE names its side (block by default): the allow entry stays
    response = await client.delete(path, headers=admin)
    body = await response.json()
    assert (body["block"], body["allow"]) == (["15165550102"], ["1516555019*"])
    response = await client.delete(path + "?side=allow", headers=admin)
    body = await response.json()
    assert (body["block"], body["allow"]) == (["15165550102"], [])
    response = await client.get(f"/v1/lists/personal/subscribers/{SUB_A}", headers=admin)
    assert (await response.json())["allow"] == ["15162065613", "19005550000"]
    # The admin API's refusals: no token, a wrong list kind, a bad entry or side.
    assert (await client.get(f"/v1/lists/personal/subscribers/{SUB_A}")).status == 401
    for method, bad in (
        ("GET", f"/v1/lists/blocklist/subscribers/{SUB_A}"),
        ("PUT", f"/v1/lists/personal/subscribers/{SUB_A}/entries/abc"),
        ("PUT", f"/v1/lists/personal/subscribers/{SUB_A}/entries/1900%2A?side=maybe"),
        ("GET", "/v1/lists/personal/subscribers/x"),
    ):
        assert (await client.request(method, bad, headers=admin)).status == 400
    assert (await client.get("/v1/lists/personal/entries/1900", headers=admin)).status == 400


async def test_explain_and_one_round_trip(
    redis: Redis,
    counting_redis: LeanRedis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    personal_source: Path,
) -> None:
    data = subscribers_config(cache={"refresh_ms": 60_000, "max_stale_ms": 120_000})
    data["policies"]["default"]["rules"].append(
        {"name": "flood", "match": "call_rate", "limit": 1000, "window_s": 60}
    )
    config = make_config(data, base_dir=personal_source)
    await load_blocklist(redis, [])
    await sync_list(redis, config, "personal")
    client = await make_client(config, redis_client=counting_redis)
    explained = await client.post("/v1/explain/tg/main", json=call_body("19005551234"))
    body = await explained.json()
    assert (body["rule"], body["matched"]) == ("personal-block", f"1900* (subscriber {SUB_A})")
    before = sends(counting_redis)
    for i in range(10):
        assert await answer(client, f"1516555{i:04d}") == []
    # Rate counts and both subscriber reads (two rules, one list: one HGET): one send.
    assert sends(counting_redis) - before == 10


# --- loader -------------------------------------------------------------------------------
async def test_loader_guards_dry_run_and_a_second_sync(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    config = make_config(subscribers_config(), base_dir=tmp_path)
    source = tmp_path / "personal.csv"
    source.write_text("subscriber,entry\n")
    with pytest.raises(SyncRefused, match="no valid entries"):
        await sync_list(redis, config, "personal")
    rows = "".join(f"1951262{i:04d},1516555{i:04d}\n" for i in range(40))
    source.write_text(rows)
    report = await sync_list(redis, config, "personal")
    assert (report.outcome, report.result and report.result.size) == ("success", 40)
    store = SubscriberStore(redis)
    gen, entries = await store.read("personal", "19512620007")
    assert entries.as_dict()["block"] == ["15165550007"]
    before = sorted(await redis.keys("*"))
    # A dry run of a sync that drops 30 of 40 pairs: refused, nothing written.
    source.write_text(rows.splitlines(keepends=True)[0] * 3 + "".join(rows.splitlines(True)[:10]))
    dry = await sync_list(redis, config, "personal", SyncOptions(dry_run=True))
    assert dry.refusal is not None and "remove 30 of 40" in dry.refusal
    assert any("(block)" in line for line in dry.diff_lines())
    assert sorted(await redis.keys("*")) == before
    with pytest.raises(SyncRefused, match="max_removal_share"):
        await sync_list(redis, config, "personal")
    forced = await sync_list(redis, config, "personal", SyncOptions(force=True))
    assert forced.result is not None and forced.result.size == 10
    new_gen, entries = await store.read("personal", "19512620007")
    assert new_gen > gen and entries.as_dict()["block"] == ["15165550007"]
    assert (await store.read("personal", "19512620030"))[1].as_dict()["block"] == []
    # Only the changed buckets were written anew; the old copy of one is still readable
    # for a moment, and expires. An unchanged bucket stays where the first sync put it.
    dropped = keys.subscriber_bucket_of("19512620030")
    old_key = keys.subscribers("personal", dropped, gen)
    assert 0 < await redis.ttl(old_key) <= keys.OLD_GENERATION_GRACE_S
    assert await redis.ttl(keys.subscribers("personal", dropped, new_gen)) == -1
    kept_key = keys.subscribers("personal", keys.subscriber_bucket_of("19512620007"), gen)
    assert await redis.ttl(kept_key) == -1
    assert not await redis.exists(
        keys.subscribers("personal", keys.subscriber_bucket_of("19512620007"), new_gen)
    )
    assert not await redis.keys("*stage*")


async def test_admin_store_caps_and_allocates_a_generation(redis: Redis) -> None:
    store = SubscriberStore(redis)
    assert (
        await store.change("adminonly", SUB_A, "15165550101", "block", remove=True) == 0
    )  # nothing
    gen = await store.change("adminonly", SUB_A, "15165550101", "block")
    assert gen == 1 and await store.change("adminonly", SUB_A, "911", "allow") == 1
    entries = (await store.read("adminonly", SUB_A))[1].as_dict()
    assert entries == {"block": ["15165550101"], "allow": ["911"]}
    for i in range(MAX_ENTRIES - 2):
        await store.change("adminonly", SUB_A, f"1516556{i:04d}", "block")
    with pytest.raises(BadSubscriberEntry, match="already holds"):
        await store.change("adminonly", SUB_A, "15165559999", "block")
    await store.change("adminonly", SUB_A, "911", "allow", remove=True)
    await store.change("adminonly", SUB_A, "15165559999", "block")


# --- Redis trouble ------------------------------------------------------------------------
@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis").start()
    yield server
    if server.process is not None:
        server.resume()
    server.stop()


async def test_redis_trouble_answers_by_on_error_within_the_deadline(
    own_redis: RedisProcess,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    personal_source: Path,
) -> None:
    data = subscribers_config(
        redis={"url": own_redis.url, "socket_timeout_ms": 5000},
        handler={
            "deadline_ms": 100,
            "on_error": "reject",
            "on_error_operands": ["unavailable", "redis-trouble"],
        },
        # Every call reads Redis: a cached subscriber is answered while the list is not
        # stale, as from a local list (tests/test_subscriber_cache.py).
        cache={"refresh_ms": 250, "max_stale_ms": 60_000, "subscriber_entries": 0},
    )
    config = make_config(data, base_dir=personal_source)
    setup = Redis.from_url(own_redis.url)
    await load_blocklist(setup, [])
    await sync_list(setup, config, "personal")
    await setup.aclose()
    client = await ready_client(make_client, config)
    assert await answer(client, "15165550101") == PERSONAL
    own_redis.pause()  # nothing answers: the deadline cuts each call short
    assert [await answer(client, "15165550101") for _ in range(2)] == [ON_ERROR] * 2
    own_redis.resume()
    own_redis.stop()  # refused connections
    assert [await answer(client, "15165550109") for _ in range(2)] == [ON_ERROR] * 2
    metrics = await (await client.get("/metrics")).text()
    assert 'callscreen_on_error_total{reason="deadline"} 2.0' in metrics
    assert 'callscreen_on_error_total{reason="redis_error"} 2.0' in metrics
