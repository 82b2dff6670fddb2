"""The fraud rules end to end on a real service and a real Redis: call rates by key,
sequential dialing and neighbour spoofing, with explain, dry-run and on_error."""

from __future__ import annotations

import copy
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core import fraud, keys, wire
from core.config import Config
from core.store import ListStore
from devtools.redis_server import RedisProcess
from tests.helpers import body_from, load_list

Client = TestClient[Any, Any]
FLOOD = [{"action": "reject", "operands": ["busy-here", "flood"]}]
WAR_DIAL = [{"action": "reject", "operands": ["unwanted", "war-dialer"]}]
SPOOF = [{"action": "reject", "operands": ["unwanted", "neighbour"]}]
ON_ERROR = [{"action": "reject", "operands": ["unavailable", "redis-trouble"]}]
#: A CarrierX DID under attack, and a caller in another exchange.
DID = "15162061000"
CALLER = "12125550100"


def policy(*rules: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "lists": {
            "blocklist": {"kind": "numbers"},
            "neighbours-ok": {"kind": "numbers"},
        },
        "policies": {"default": {"rules": list(rules)}},
        "trunk_groups": {"main": {"policy": "default"}, "other": {"policy": "default"}},
        **extra,
    }


def flood(key: str, limit: int = 3, window_s: int = 3600, **more: Any) -> dict[str, Any]:
    return {
        "name": f"flood-{key}",
        "match": "call_rate",
        "key": key,
        "limit": limit,
        "window_s": window_s,
        "operands": ["busy-here", "flood"],
        **more,
    }


def war_dial(**more: Any) -> dict[str, Any]:
    rule = {
        "name": "war-dial",
        "match": "sequential_dialing",
        "run_length": 4,
        "window_s": 600,
        "operands": ["unwanted", "war-dialer"],
    }
    return {**rule, **more}


def neighbour(**more: Any) -> dict[str, Any]:
    return {
        "name": "neighbour",
        "match": "neighbour_spoofing",
        "unless_list": "neighbours-ok",
        "operands": ["unwanted", "neighbour"],
        **more,
    }


def call(caller: str | None, called: str = DID, verstat: str | None = None) -> dict[str, Any]:
    body = body_from(caller)
    to = copy.deepcopy(body["To"][0])
    to["user"] = called
    to["raw"] = f"<sip:{called}@10.1.10.190:5060>"
    body["To"] = [to]
    if verstat is not None:
        body["From"][0]["uri_parameters"] = {"verstat": verstat}
    return body


async def answer(client: Client, body: dict[str, Any], path: str = "/tg/main") -> Any:
    response = await client.post(path, json=body)
    assert response.status == 200
    return await response.json()


async def explain(client: Client, body: dict[str, Any]) -> Any:
    response = await client.post("/v1/explain/tg/main", json=body)
    assert response.status == 200
    return await response.json()


@pytest.fixture
async def start(
    redis: Redis, make_config: Callable[..., Config], make_client: Callable[..., Any]
) -> Callable[..., Any]:
    async def started(data: dict[str, Any], instances: int = 1) -> list[Client]:
        await load_list(redis, "blocklist", "numbers", [])
        await load_list(redis, "neighbours-ok", "numbers", ["15162069999"])
        config = make_config(data)
        return [await make_client(config) for _ in range(instances)]

    return started


# --- call_rate by key ------------------------------------------------------------------
async def test_a_flood_towards_one_did_from_many_callers_is_capped(
    start: Callable[..., Any],
) -> None:
    first, second = await start(policy(flood("called")), instances=2)
    # Six different callers (one anonymous), alternating instances: three get through.
    callers = ["12125550101", "13125550102", "anonymous", "14155550103", "12125550104", "1305555"]
    answers = [await answer((first, second)[i % 2], call(c)) for i, c in enumerate(callers)]
    assert answers == [[], [], [], FLOOD, FLOOD, FLOOD]
    # Another DID has its own count; so has the same DID on another rule key.
    assert await answer(first, call("12125550101", "15162061001")) == []


@pytest.mark.parametrize(
    ("key", "more", "same", "apart"),
    [
        # Same trunk group, whoever calls whom; another trunk group counts apart.
        ("trunk_group", {}, [call("12125550101"), call("13125550102", "15162060002")], None),
        # Callers of one range (first 7 digits), a caller outside it counts apart.
        (
            "caller_prefix",
            {"prefix_digits": 7},
            [call("12125550101"), call("12125550199", "15162060002")],
            call("12125560101"),
        ),
        # One caller to one number; the same caller to another number counts apart.
        ("caller_called", {}, [call(CALLER), call(CALLER)], call(CALLER, "15162060002")),
    ],
)
async def test_rates_by_key_count_what_the_key_names(
    start: Callable[..., Any],
    key: str,
    more: dict[str, Any],
    same: list[dict[str, Any]],
    apart: dict[str, Any] | None,
) -> None:
    (client,) = await start(policy(flood(key, limit=2, **more)))
    assert [await answer(client, b) for b in (*same, same[0])] == [[], [], FLOOD]
    if apart is not None:
        assert await answer(client, apart) == []
    else:  # trunk_group: another trunk group's calls have a count of their own
        assert await answer(client, same[0], "/tg/other") == []


async def test_the_default_caller_key_keeps_todays_counter_names(
    start: Callable[..., Any], redis: Redis
) -> None:
    (client,) = await start(policy(flood("caller", limit=1)))
    assert [await answer(client, call(CALLER, d)) for d in (DID, "15162060002")] == [[], FLOOD]
    index = int(time.time() // 3600)
    found = {k.decode() if isinstance(k, bytes) else k for k in await redis.keys("{cs:rate:*")}
    # Rare: the hour turned between the two calls.
    assert found & {keys.rate(CALLER, "default:flood-caller", i) for i in (index, index - 1)}
    assert all(k.startswith("{cs:rate:" + CALLER + "}") for k in found)


async def test_keyed_windows_slide_like_caller_windows(redis: Redis) -> None:
    store = ListStore(redis)
    rule = fraud.KeyedRate("p:tdos", "called", 10)
    base = 1_000_000.0  # a window boundary

    async def count(at_s: float, increment: bool = True) -> int:
        plan = fraud.plan(
            [rule], [], caller=None, called=DID, trunk_group="main", now_s=at_s, increment=increment
        )
        *_, replies = await store.fetch_for_call(None, (), at_s, extra=plan.commands)
        return plan.read(replies)["p:tdos"]

    assert [await count(base - t) for t in (0.3, 0.2, 0.1)] == [1, 2, 3]
    # Across the boundary the last window still weighs nearly whole.
    assert await count(base + 0.1) == 4
    # Half a window on, it weighs half: ceil(3 * 0.5) + 1, plus this (explained) call.
    assert await count(base + 5, increment=False) == 2 + 1 + 1
    # Two windows on, everything has slid out; the counters expire by themselves.
    assert await count(base + 25) == 1
    ttls = [await redis.ttl(k) for k in await redis.keys("{cs:rate:called:*")]
    assert ttls and all(0 < ttl <= 20 for ttl in ttls)


def test_a_plans_text_is_its_commands_as_hiredis_packs_them() -> None:
    """The RESP text a plan composes for the lean link is its commands byte for byte,
    counting and explaining, with and without the upkeep (expiry and trim) commands."""
    rules = [
        fraud.KeyedRate("p:tdos", "called", 60),
        fraud.KeyedRate("p:cp", "caller_prefix", 10, 4),
    ]
    sequence = [fraud.SequenceRule("p:seq", window_s=60, max_gap=1, track=8)]
    upkeep = fraud.Upkeep()
    seen: set[Any] = set()
    for i, (at_s, increment) in enumerate(
        [(1_000.25, True), (1_000.5, True), (1_001.0, False)] * 4
    ):
        plan = fraud.plan(
            rules, sequence, caller=CALLER, called=str(15162060000 + i), trunk_group="main",
            now_s=at_s + i / 3, increment=increment, upkeep=upkeep, resp=True,
        )  # fmt: skip
        assert plan.text is not None and len(plan.text) == len(plan.commands)
        assert "".join(plan.text).encode() == wire.encode(plan.commands)
        seen.update(command[0] for command in plan.commands)
    assert seen == {"INCRBY", "GET", "EXPIRE", "ZADD", "ZRANGEBYSCORE", "ZREMRANGEBYRANK"}
    assert fraud.plan(rules, sequence, caller=CALLER, called=DID, trunk_group="main",
                      now_s=1.0).text is None  # fmt: skip


# --- sequential dialing ------------------------------------------------------------------
async def test_a_caller_walking_consecutive_numbers_is_stopped(
    start: Callable[..., Any],
) -> None:
    first, second = await start(policy(war_dial()), instances=2)
    walked = [f"1516206{n:04d}" for n in (100, 101, 103, 102, 104)]
    answers = [await answer((first, second)[i % 2], call(CALLER, d)) for i, d in enumerate(walked)]
    # 100, 101, 103 are no run of 4; 102 closes the gap (dialling order does not matter).
    assert answers == [[], [], [], WAR_DIAL, WAR_DIAL]
    # Another caller dialling the same numbers starts from nothing.
    assert await answer(first, call("13125550100", walked[0])) == []
    # A number far from the run is not part of it.
    assert await answer(first, call(CALLER, "15162069000")) == []


async def test_near_consecutive_numbers_match_within_max_gap(start: Callable[..., Any]) -> None:
    (client,) = await start(policy(war_dial(max_gap=10)))
    walked = [f"1516206{n:04d}" for n in (100, 110, 120, 131, 141, 151)]
    answers = [await answer(client, call(CALLER, d)) for d in walked]
    # 131 is 11 above 120: a new run starts there and reaches 3 numbers only.
    assert answers == [[], [], [], [], [], []]
    assert await answer(client, call(CALLER, "15162060130")) == WAR_DIAL  # joins both runs


async def test_a_dialled_set_deleted_meanwhile_gets_its_expiry_back(redis: Redis) -> None:
    store = ListStore(redis)
    rule = fraud.SequenceRule("p:seq", window_s=60, max_gap=1, track=8)
    upkeep = fraud.Upkeep()
    key = keys.dialed(CALLER, "p:seq")

    async def run(called: int, at_s: float) -> int:
        plan = fraud.plan(
            [], [rule], caller=CALLER, called=str(called), trunk_group="main", now_s=at_s,
            upkeep=upkeep,
        )  # fmt: skip
        *_, replies = await store.fetch_for_call(CALLER, (), at_s, extra=plan.commands)
        store.send_later(plan.repairs(replies))
        return plan.read(replies)["p:seq"]

    assert await run(15162060000, 1_000.0) == 1
    assert await run(15162060001, 1_001.0) == 2  # its expiry not sent again so soon
    await redis.delete(key)
    assert await run(15162060002, 1_002.0) == 1  # a set holding only this call: new
    await store.drain()
    assert 60 < await redis.ttl(key) <= 66


async def test_a_redial_of_the_same_number_sends_no_repair(redis: Redis) -> None:
    """A caller dialling one number again finds a set holding only that number, which
    is no sign of a deleted set: no EXPIRE goes after the call (the set keeps its TTL)."""
    store = ListStore(redis)
    rule = fraud.SequenceRule("p:seq", window_s=60, max_gap=1, track=8)
    upkeep = fraud.Upkeep()
    key = keys.dialed(CALLER, "p:seq")
    repairs = []
    for at_s in (1_000.0, 1_001.0, 1_002.0):
        plan = fraud.plan(
            [], [rule], caller=CALLER, called="15162060000", trunk_group="main", now_s=at_s,
            upkeep=upkeep,
        )  # fmt: skip
        *_, replies = await store.fetch_for_call(CALLER, (), at_s, extra=plan.commands)
        repairs.append(plan.repairs(replies))
        assert plan.read(replies)["p:seq"] == 1
    assert repairs == [[], [], []]
    assert 60 < await redis.ttl(key) <= 66  # from the first call's own EXPIRE


@pytest.mark.parametrize("remembered", [False, True], ids=["every-call", "upkeep"])
async def test_sequential_dialing_window_and_memory_are_bounded(
    redis: Redis, remembered: bool
) -> None:
    """Without an Upkeep every call trims and pushes the expiry back; with the service's
    (core.fraud.Upkeep) a trim comes every quarter of ``track`` calls and the expiry every
    tenth of the window, and the answers are the same."""
    store = ListStore(redis)
    rule = fraud.SequenceRule("p:seq", window_s=60, max_gap=1, track=8)
    base = 2_000_000.0
    upkeep = fraud.Upkeep(clock=lambda: now[0]) if remembered else None
    now = [0.0]

    async def run(called: int, at_s: float) -> int:
        now[0] = at_s
        plan = fraud.plan(
            [], [rule], caller=CALLER, called=str(called), trunk_group="main", now_s=at_s,
            upkeep=upkeep,
        )  # fmt: skip
        *_, replies = await store.fetch_for_call(CALLER, (), at_s, extra=plan.commands)
        return plan.read(replies)["p:seq"]

    number = 15162060000
    assert await run(number, base) == 1
    assert await run(number + 1, base + 59.9) == 2  # just inside the window
    assert await run(number + 2, base + 60.1) == 2  # the first call slid out
    key = keys.dialed(CALLER, "p:seq")
    for i in range(3, 40):  # a long walk: a run of the newest ``track`` numbers only
        assert await run(number + i, base + 61 + i / 100) == min(i, 8)
    # The newest ``track`` kept, and at most a quarter more between two trims.
    assert 8 <= await redis.zcard(key) <= (10 if remembered else 8)
    assert 60 < await redis.ttl(key) <= 66  # 1.1 windows: outlives its calls by a window
    usage = await redis.memory_usage(key)
    assert usage is not None and usage < 400  # measured 200 bytes (docs/fraud.md)


# --- neighbour spoofing --------------------------------------------------------------------
async def test_a_caller_in_the_called_numbers_exchange_is_rejected(
    start: Callable[..., Any], redis: Redis
) -> None:
    (client,) = await start(policy(neighbour(unless_verstat=["TN-Validation-Passed"])))
    assert await answer(client, call("15162064321")) == SPOOF  # 1-516-206, same as DID
    assert await answer(client, call("15162074321")) == []  # another exchange
    assert await answer(client, call("15162069999")) == []  # on the allow list
    assert await answer(client, call("15162064321", verstat="tn-validation-passed")) == []
    assert await answer(client, call("15162064321", verstat="TN-Validation-Failed")) == SPOOF
    assert await answer(client, call("anonymous")) == []
    # Purely local: nothing was read from or written to Redis for these calls.
    assert await redis.keys("{cs:rate:*") == [] and await redis.keys("{cs:seq:*") == []


async def test_neighbour_digits_are_configurable(start: Callable[..., Any]) -> None:
    (client,) = await start(policy(neighbour(digits=4, unless_list=None)))
    assert await answer(client, call("15169990000")) == SPOOF  # same 1-516 area code


async def test_a_missing_allow_list_answers_by_on_error(
    redis: Redis, make_config: Callable[..., Config], make_client: Callable[..., Any]
) -> None:
    await load_list(redis, "blocklist", "numbers", [])
    data = policy(
        neighbour(), handler={"on_error": "reject", "on_error_operands": ON_ERROR[0]["operands"]}
    )
    # A list with a source that was never synced is not trusted (an empty one would be).
    data["lists"]["neighbours-ok"]["source"] = "neighbours.txt"
    client = await make_client(make_config(data))
    assert await answer(client, call("15162064321")) == ON_ERROR
    explained = await explain(client, call("15162064321"))
    assert explained["on_error"] == "list_not_loaded"


# --- explain and dry-run for every new rule ------------------------------------------------
async def test_explain_names_each_new_rule_and_counts_nothing(
    start: Callable[..., Any], redis: Redis
) -> None:
    (client,) = await start(policy(neighbour(), flood("called", limit=1), war_dial(run_length=2)))
    spoofed = await explain(client, call("15162064321"))
    assert (spoofed["rule"], spoofed["decision"]) == ("neighbour", "reject")
    assert "1516206" in spoofed["matched"]
    assert await answer(client, call(CALLER, "15162060100")) == []
    before = sorted(await redis.keys("*cs:rate:*") + await redis.keys("*cs:seq:*"))
    # One call counted towards 15162060100: explain judges the next one as the second.
    flooded = await explain(client, call("13125550100", "15162060100"))
    assert (flooded["rule"], flooded["matched"]) == ("flood-called", "2 calls by called in 3600s")
    walked = await explain(client, call(CALLER, "15162060101"))
    assert (walked["rule"], walked["matched"]) == ("war-dial", "2 numbers at most 1 apart in 600s")
    after = sorted(await redis.keys("*cs:rate:*") + await redis.keys("*cs:seq:*"))
    assert after == before
    assert await redis.zcard(keys.dialed(CALLER, "default:war-dial")) == 1


async def test_dry_run_fraud_rules_are_reported_and_let_calls_through(
    start: Callable[..., Any],
) -> None:
    rules = (
        neighbour(dry_run=True),
        flood("called", limit=1, dry_run=True),
        war_dial(run_length=2, dry_run=True),
    )
    (client,) = await start(policy(*rules))
    assert await answer(client, call("15162060100", "15162060101")) == []
    body = call("15162060100", "15162060102")
    explained = await explain(client, body)
    assert explained["decision"] == "allow"
    assert [m["rule"] for m in explained["dry_run_matches"]] == ["neighbour", "war-dial"]
    assert await answer(client, body) == []
    assert await answer(client, call(CALLER, "15162060102")) == []  # the DID's second call
    metrics = await (await client.get("/metrics")).text()
    for rule, count in (("neighbour", 2), ("war-dial", 1), ("flood-called", 1)):
        line = (
            f'callscreen_decisions_total{{decision="reject",dry_run="true",rule="{rule}",'
            f'trunk_group="main"}} {count}.0'
        )
        assert line in metrics


# --- metrics ------------------------------------------------------------------------------
async def test_rate_peaks_show_how_close_each_rule_is_to_its_limit(
    start: Callable[..., Any],
) -> None:
    (client,) = await start(policy(flood("called", limit=10), war_dial(run_length=10)))
    for n in range(4):
        assert await answer(client, call(CALLER, f"1516206010{n}")) == []
    assert await answer(client, call("13125550100", "15162060100")) == []
    metrics = await (await client.get("/metrics")).text()
    assert 'callscreen_rate_peak{policy="default",rule="flood-called"} 2.0' in metrics
    assert 'callscreen_rate_limit{policy="default",rule="flood-called"} 10.0' in metrics
    assert 'callscreen_rate_peak{policy="default",rule="war-dial"} 4.0' in metrics
    assert CALLER not in metrics and "15162060100" not in metrics


# --- Redis slow or down -------------------------------------------------------------------
@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis").start()
    yield server
    if server.process is not None:
        server.resume()  # a stopped process would not see SIGTERM
    server.stop()


@pytest.mark.parametrize("rule", [flood("called"), war_dial()], ids=["rate", "sequence"])
async def test_redis_slow_or_down_answers_by_on_error_in_time(
    own_redis: RedisProcess,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    rule: dict[str, Any],
) -> None:
    setup = Redis.from_url(own_redis.url)
    await load_list(setup, "blocklist", "numbers", [])
    await load_list(setup, "neighbours-ok", "numbers", [])
    await setup.aclose()
    deadline_ms = 100
    data = policy(
        rule,
        redis={"url": own_redis.url, "socket_timeout_ms": 5000},
        handler={
            "deadline_ms": deadline_ms,
            "on_error": "reject",
            "on_error_operands": ["unavailable", "redis-trouble"],
        },
        cache={"refresh_ms": 250, "max_stale_ms": 60_000},
    )
    client = await make_client(make_config(data))
    assert await answer(client, call(CALLER)) == []

    async def timed(count: int) -> float:
        started = time.perf_counter()
        for i in range(count):
            assert await answer(client, call(CALLER, f"151620611{i:02d}")) == ON_ERROR
        return (time.perf_counter() - started) / count

    own_redis.pause()
    slow = await timed(2)
    own_redis.resume()
    own_redis.stop()
    down = await timed(2)
    assert max(slow, down) < deadline_ms / 1000 + 0.5
    metrics = await (await client.get("/metrics")).text()
    assert 'callscreen_on_error_total{reason="deadline"} 2.0' in metrics
    assert 'callscreen_on_error_total{reason="redis_error"} 2.0' in metrics
