"""Call history: rejected calls found by number within a second, masking, sampling, drops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from core import keys
from core.config import Config, ConfigError
from core.shards import dispatcher_for
from service.appkeys import SCREENER
from service.metrics import Metrics
from service.screening.history import CHUNK_MAX, CallHistory, history_key
from service.screening.policy import Evaluation, outcome_for
from service.screening.request import Call, CallParser
from tests.helpers import REJECT, body_from, load_list, wait_for

TOKEN = "history-test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HISTORY_KEY = "history-hmac-key-for-tests"
CONFIG: dict[str, Any] = {
    "lists": {"blocklist": {"kind": "numbers"}, "watch": {"kind": "numbers"}},
    "policies": {
        "default": {
            "rules": [
                {"name": "watch", "match": "caller_in_list", "list": "watch", "dry_run": True},
                {"name": "blocklist", "match": "caller_in_list", "list": "blocklist"},
            ]
        }
    },
    "trunk_groups": {"main": {"policy": "default"}},
    "history": {"enabled": True, "flush_ms": 50},
}
Client = TestClient[Any, Any]


@pytest.fixture
async def started(
    monkeypatch: pytest.MonkeyPatch,
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
) -> Callable[..., Any]:
    monkeypatch.setenv("CALLSCREEN_ADMIN_TOKENS", TOKEN)
    monkeypatch.setenv("CALLSCREEN_HISTORY_KEY", HISTORY_KEY)
    await load_list(redis, "blocklist", "numbers", ["15162065613"])
    await load_list(redis, "watch", "numbers", ["15162065620"])

    async def start(**history: Any) -> Client:
        data = {**CONFIG, "history": {**CONFIG["history"], **history}}
        client: Client = await make_client(make_config(data), redis_client=redis)
        return client

    return start


async def history_of(client: Client, number: str, **query: str) -> list[dict[str, Any]]:
    params = {"number": number, **query}
    response = await client.get("/v1/history", params=params, headers=AUTH)
    assert response.status == 200, await response.text()
    calls: list[dict[str, Any]] = (await response.json())["calls"]
    return calls


async def test_a_rejected_call_is_found_by_number_within_a_second(
    started: Callable[..., Any], redis: Redis
) -> None:
    client = await started()
    body = body_from("+1 516 206 5613")
    body["Call-ID"] = ["call-1@pbx"]
    called_at = time.time()
    answer = await client.post("/tg/main", json=body)
    assert await answer.json() == REJECT
    allowed = await client.post("/tg/main", json=body_from("15162065699"))
    assert await allowed.json() == []

    async def found() -> bool:
        return bool(await history_of(client, "5162065613"))

    await wait_for(found, timeout_s=1.0)
    [call] = await history_of(client, "(516) 206-5613")
    assert call["call_id"] == "call-1@pbx"
    assert (call["trunk_group"], call["decision"], call["rule"], call["list"]) == (
        "main",
        "reject",
        "blocklist",
        "blocklist",
    )
    assert call["answer"] == ["unavailable", "aniblock"]
    # Masked like the logs: neither the record nor the key names hold the full number.
    assert call["caller"] == "1516206****" and call["matched"] == "1516206****"
    assert call["called"] == "1951262****"
    assert abs(call["time"] - called_at) < 1
    key_names: Any = await redis.keys("*hist*")
    assert key_names and not any(b"5162065613" in name for name in key_names)
    # Found by the called number too; the allowed call is not sampled (sample 0).
    assert [c["call_id"] for c in await history_of(client, "19512623062")] == ["call-1@pbx"]
    assert await history_of(client, "15162065699") == []
    # The time range applies.
    assert await history_of(client, "15162065613", until=str(called_at - 60)) == []
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(called_at - 5))
    assert len(await history_of(client, "15162065613", since=iso)) == 1
    recent = await (await client.get("/v1/history/recent?decision=reject", headers=AUTH)).json()
    assert recent["by_rule"] == {"blocklist": 1}


async def test_dry_run_matches_and_sampled_allowed_calls_are_recorded_unmasked_when_asked(
    started: Callable[..., Any],
) -> None:
    client = await started(sample_allowed=1.0, unmasked=True)
    assert await (await client.post("/tg/main", json=body_from("15162065620"))).json() == []
    assert await (await client.post("/tg/main", json=body_from("15162065699"))).json() == []

    async def both() -> bool:
        return bool(await history_of(client, "15162065699")) and bool(
            await history_of(client, "15162065620")
        )

    await wait_for(both, timeout_s=2.0)
    [watched] = await history_of(client, "15162065620")
    assert watched["caller"] == "15162065620" and watched["decision"] == "allow"
    assert watched["dry_run_matches"] == [
        {"rule": "watch", "list": "watch", "matched": "15162065620"}
    ]


async def test_a_slow_or_absent_redis_drops_records_but_never_an_answer(
    started: Callable[..., Any],
) -> None:
    client = await started(queue_max=3, flush_ms=10_000)
    history = client.app[SCREENER].history
    assert isinstance(history, CallHistory)
    for _ in range(5):
        assert await (await client.post("/tg/main", json=body_from("15162065613"))).json() == REJECT
    assert len(history.queue) == 3  # two dropped: the queue was full
    history.redis = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    history.dispatcher = dispatcher_for(history.redis)
    try:
        assert await history.flush() == 0  # Redis unreachable: dropped, counted
    finally:
        await history.redis.aclose()
    metrics = await (await client.get("/metrics")).text()
    assert 'callscreen_history_records_total{outcome="dropped_queue_full"} 2.0' in metrics
    assert 'callscreen_history_records_total{outcome="dropped_redis"} 3.0' in metrics


def test_masked_history_needs_its_key(make_config: Callable[..., Config]) -> None:
    config = make_config(CONFIG)
    with pytest.raises(ConfigError, match="CALLSCREEN_HISTORY_KEY"):
        history_key(config, {})
    assert history_key(config, {"CALLSCREEN_HISTORY_KEY": "k"}) == b"k"
    unmasked = make_config({**CONFIG, "history": {"enabled": True, "unmasked": True}})
    assert history_key(unmasked, {}) is None


async def test_history_keys_expire_with_the_retention(
    started: Callable[..., Any], redis: Redis
) -> None:
    client = await started(retention_s=3600)
    await client.post("/tg/main", json=body_from("15162065613"))

    async def written() -> bool:
        return bool(await redis.keys(keys.history_calls("*")))

    await wait_for(written, timeout_s=1.0)
    for key in await redis.keys(keys.history_calls("*")):
        # Pushed back every tenth of the retention, to 1.1x: no call outlived early.
        assert 3600 < await redis.ttl(key) <= 3960


async def test_lookup_gathers_lists_decisions_calls_and_audit(started: Callable[..., Any]) -> None:
    client = await started()
    await client.post("/tg/main", json=body_from("15162065613"))
    put = await client.put("/v1/lists/watch/entries/15162065613?reason=seen", headers=AUTH)
    assert put.status == 200

    async def recorded() -> bool:
        return bool(await history_of(client, "15162065613"))

    await wait_for(recorded, timeout_s=1.0)
    response = await client.get("/v1/lookup?number=516-206-5613", headers=AUTH)
    body = await response.json()
    assert body["number"] == "15162065613"
    assert {item["list"]: item["listed"] for item in body["lists"]} == {
        "blocklist": True,
        "watch": True,
    }
    decisions = {d["trunk_group"]: (d["decision"], d["rule"]) for d in body["decisions"]}
    assert decisions == {None: ("reject", "blocklist"), "main": ("reject", "blocklist")}
    assert [c["rule"] for c in body["calls"]] == ["blocklist"]
    assert [(r["action"], r["list"], r["reason"]) for r in body["audit"]] == [
        ("add", "watch", "seen")
    ]
    bad = await client.get("/v1/lookup?number=nope", headers=AUTH)
    assert bad.status == 400 and "not a phone number" in (await bad.json())["error"]


def rejected_call(n: int) -> tuple[Call, Evaluation]:
    body = body_from(f"1516206{5600 + n}")
    body["Call-ID"] = [f"call-{n}@pbx"]
    call = CallParser(("from",), "1").parse(body)
    outcome = outcome_for("reject", ("unavailable", "aniblock"), "blocklist", "blocklist")
    return call, Evaluation(outcome, matched=call.caller)


async def test_the_writer_keeps_the_newest_calls_per_number(
    redis: Redis, make_config: Callable[..., Config]
) -> None:
    await check_writer(redis, make_config)


async def test_the_writer_works_on_a_cluster(
    cluster_redis: RedisCluster, make_config: Callable[..., Config]
) -> None:
    await check_writer(cluster_redis, make_config)


async def check_writer(client: Redis | RedisCluster, make_config: Callable[..., Config]) -> None:
    config = make_config({**CONFIG, "history": {"enabled": True, "max_per_number": 2}})
    metrics = Metrics(config, CollectorRegistry())
    history = CallHistory(config, client, metrics, {"CALLSCREEN_HISTORY_KEY": HISTORY_KEY})
    for n in range(3):  # three calls to the same called number, from three callers
        history.add("main", *rejected_call(n))
    assert await history.flush() == 3
    called = await history.calls("19512623062", 0, time.time() + 1, 10)
    assert [c["call_id"] for c in called] == ["call-2@pbx", "call-1@pbx"]  # the newest two
    for n in range(3):
        assert len(await history.calls(f"1516206{5600 + n}", 0, time.time() + 1, 10)) == 1
    assert len(await history.recent(10)) == 3


async def test_a_large_flush_lets_the_loop_answer_calls_between_its_chunks(
    redis: Redis, make_config: Callable[..., Config]
) -> None:
    config = make_config(CONFIG)
    metrics = Metrics(config, CollectorRegistry())
    history = CallHistory(config, redis, metrics, {"CALLSCREEN_HISTORY_KEY": HISTORY_KEY})
    queued = 12 * CHUNK_MAX  # under history.max_per_number: all stay findable
    for n in range(queued):
        history.add("main", *rejected_call(n))
    # Another task (an answer, in the service) gets the loop while the flush goes on:
    # at least once per chunk, never only once the whole batch is encoded.
    flush = asyncio.create_task(history.flush())
    turns_meanwhile = 0
    while not flush.done():
        turns_meanwhile += 1
        await asyncio.sleep(0)
    assert await flush == queued
    assert turns_meanwhile >= queued // CHUNK_MAX
    assert len(await history.recent(queued)) == queued
    called = await history.calls("19512623062", 0, time.time() + 1, queued)
    assert {c["call_id"] for c in called} == {f"call-{n}@pbx" for n in range(queued)}


async def test_a_busy_numbers_set_stays_near_its_cap_and_old_calls_are_not_read(
    redis: Redis, make_config: Callable[..., Config]
) -> None:
    config = make_config({**CONFIG, "history": {"enabled": True, "max_per_number": 20}})
    metrics = Metrics(config, CollectorRegistry())
    history = CallHistory(config, redis, metrics, {"CALLSCREEN_HISTORY_KEY": HISTORY_KEY})
    for flush in range(3):  # 45 calls to one called number, 15 a flush
        for n in range(15 * flush, 15 * flush + 15):
            history.add("main", *rejected_call(n))
        assert await history.flush() == 15
    key = keys.history_calls(history.number_key("19512623062"))
    # Trimmed after every second call (a tenth of 20): never more than 20 + 2 kept.
    assert 20 <= await redis.zcard(key) <= 22
    called = await history.calls("19512623062", 0, time.time() + 1, 20)
    assert [c["call_id"] for c in called] == [f"call-{n}@pbx" for n in range(44, 24, -1)]
    # A call older than the retention is not shown, though its set still holds it.
    await redis.zadd(key, {b'{"call_id":"old@pbx"}': (time.time() - 8 * 86_400) * 1000})
    older = await history.calls("19512623062", 0, time.time() - 3600, 10)
    assert older == []


async def test_the_writer_reloads_its_script_after_redis_forgot_it(
    redis: Redis, make_config: Callable[..., Config]
) -> None:
    config = make_config(CONFIG)
    metrics = Metrics(config, CollectorRegistry())
    history = CallHistory(config, redis, metrics, {"CALLSCREEN_HISTORY_KEY": HISTORY_KEY})
    history.add("main", *rejected_call(0))
    assert await history.flush() == 1
    await redis.script_flush()  # as after a restart: EVALSHA now answers NOSCRIPT
    history.add("main", *rejected_call(1))
    assert await history.flush() == 1
    assert {c["call_id"] for c in await history.recent(10)} == {"call-0@pbx", "call-1@pbx"}
