"""A Redis Cluster master killed, restarted and failed over under paced load (issue 22).

A real 3-master + 3-replica cluster (node timeout 1 s), a real service process, calls
sent at a steady pace whose keys (subscriber bucket, call-rate counter) live on known
masters. The one master killed holds no list ``meta``. What the operator must see:
calls whose keys live on the healthy masters answered as usual throughout, the dead
shard's calls answered by ``on_error`` only until its replica's promotion + 0.5 s,
no wrong answer, no internal error; a restart of the old master and a manual
``CLUSTER FAILOVER`` back to it the same. Measured figures are printed (``-s``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from core import keys
from core.config import parse_config
from core.connect import connect
from devtools.redis_server import LocalCluster, cli
from loader.sync import sync_list
from tests.helpers import body_from, load_list, wait_for
from tests.load import Load
from tests.procs import ServiceProcess, scrape

#: Issue 17's load level: 2,000 calls a second over keep-alive connections.
CALLS_PER_S = 2000
CONNECTIONS = 64
#: On_error for the dead shard is allowed until this long after the promotion is seen.
AFTER_PROMOTION_S = 0.5
BLOCKED = "15165550100"
CALLERS = [f"1516555{i:04d}" for i in range(1, 41)]
SUBSCRIBERS = [f"1951262{i:04d}" for i in range(60)]
ON_ERROR = [{"action": "reject", "operands": ["unavailable", "redis-trouble"]}]
PERSONAL = [{"action": "reject", "operands": ["decline", "subscriber-block"]}]
LISTED = [{"action": "reject", "operands": ["unavailable", "aniblock"]}]
# Full coverage off: with it on, every master refuses all commands (CLUSTERDOWN) from the
# moment the dead master is flagged FAIL until its replica is promoted (docs/failure.md).
NODE_ARGS = ("--cluster-require-full-coverage", "no")


def overrides() -> dict[str, Any]:
    personal = {"match": "caller_in_subscriber_list", "list": "personal"}
    return {
        "cache": {"refresh_ms": 100, "max_stale_ms": 2000},
        "handler": {
            # Well above the shipped 100 ms: the test checks which calls Redis failed,
            # not how a busy 2-core test machine schedules them (latency is printed).
            "deadline_ms": 1000,
            "on_error": "reject",
            "on_error_operands": ["unavailable", "redis-trouble"],
        },
        "lists": {
            "blocklist": {"kind": "numbers"},
            "personal": {"kind": "subscribers", "source": "personal.csv"},
        },
        "policies": {
            "default": {
                "rules": [
                    {"name": "blocklist", "match": "caller_in_list", "list": "blocklist"},
                    {"name": "personal-block", **personal,
                     "operands": ["decline", "subscriber-block"]},
                    {"name": "flood", "match": "call_rate", "limit": 1_000_000, "window_s": 60,
                     "operands": ["busy-here", "too-many-calls"]},
                ]
            }
        },
        "trunk_groups": {"main": {"policy": "default"}},
    }  # fmt: skip


@dataclass
class Call:
    caller: str
    called: str
    expected: Any
    #: Whether a key this call reads lives on the slots of the master that is killed.
    on_victim: bool


@dataclass
class Answered:
    call: Call
    sent_s: float
    took_s: float
    status: int
    answer: Any


def call_body(call: Call) -> bytes:
    body = body_from(call.caller)
    body["To"][0]["user"] = call.called
    body["To"][0]["raw"] = f"<sip:{call.called}@10.1.10.190:5060>"
    return orjson.dumps(body)


def answered(load: Load, calls: list[Call]) -> list[Answered]:
    """The load's answers, each with the call it answered."""
    return [
        Answered(
            calls[a.index], a.sent_s, a.took_s, a.status, a.json() if a.status == 200 else None
        )
        for a in load.answers
    ]


async def until(check: Any, what: str, timeout_s: float = 30.0) -> float:
    """Poll a blocking ``check`` in a thread every 20 ms; the time it first held."""
    return await wait_for(lambda: asyncio.to_thread(check), timeout_s, what=what)


async def test_a_dead_master_fails_only_its_own_calls_until_its_replica_takes_over(
    tmp_path: Path,
) -> None:
    cluster = LocalCluster(tmp_path / "cluster", masters=3, replicas=1, extra=NODE_ARGS)
    service: ServiceProcess | None = None
    load: Load | None = None
    await asyncio.to_thread(cluster.start)
    try:
        # Lists: a numbers blocklist and a subscribers list; subscriber i blocks caller i%40.
        rows = "".join(f"{s},{CALLERS[i % 40]},block\n" for i, s in enumerate(SUBSCRIBERS))
        folder = tmp_path / "service"
        folder.mkdir()
        (folder / "personal.csv").write_text(rows)
        config = parse_config(
            {**overrides(), "redis": {"url": cluster.url}}, source="test", base_dir=folder
        )
        redis = connect(cluster.url)
        try:
            await load_list(redis, "blocklist", "numbers", [BLOCKED])
            await sync_list(redis, config, "personal")
            gen = int(await redis.hget(keys.meta("personal"), "gen") or 0)

            def port_of(key: str) -> int:
                node = redis.get_node_from_key(key)  # type: ignore[union-attr]
                assert node is not None
                return int(node.port)

            metas = {port_of(keys.meta("blocklist")), port_of(keys.meta("personal"))}
            victim = next(p for p in cluster.masters_now() if p not in metas)
            calls = []
            for i in range(len(CALLERS) * 3):
                caller = BLOCKED if i % 20 == 0 else CALLERS[i % 40]
                called = SUBSCRIBERS[(i * 7) % len(SUBSCRIBERS)]
                bucket = keys.subscribers("personal", keys.subscriber_bucket_of(called), gen)
                rate = keys.rate(caller, "default:flood", 0)
                if caller == BLOCKED:  # decided from memory: reads nothing
                    expected, on_victim = LISTED, False
                else:
                    blocks = CALLERS[SUBSCRIBERS.index(called) % 40] == caller
                    expected = PERSONAL if blocks else []
                    on_victim = victim in (port_of(bucket), port_of(rate))
                calls.append(Call(caller, called, expected, on_victim))
        finally:
            await redis.aclose()
        assert any(c.on_victim for c in calls) and any(not c.on_victim for c in calls)

        replica = cluster.replica_of(victim)  # blocking calls before the load starts
        service = ServiceProcess(folder, cluster.url, overrides=overrides())
        service.start()
        await service.ready()
        load = Load(
            service.url,
            [call_body(call) for call in calls],
            rate_per_s=CALLS_PER_S,
            connections=CONNECTIONS,
        )
        load.start()
        healthy = next(n for n in cluster.nodes if n.port not in (victim,))
        await load.answered(2 * CALLS_PER_S)

        # 1. The master is killed; its replica is promoted after the node timeout.
        killed_at = time.monotonic()
        cluster.node(victim).kill()

        async def degraded() -> bool:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{service.url}/readyz") as response,
            ):
                body = await response.json()
                # Ready for the healthy shards' calls; the failing node named.
                return response.status == 200 and f"127.0.0.1:{victim}" in str(body["degraded"])

        await wait_for(degraded, timeout_s=1.0)
        failing = f'callscreen_redis_node_failing{{node="127.0.0.1:{victim}"}}'

        async def metric_shows_it() -> bool:  # worker metrics reach /metrics within 1 s
            return (await scrape(service.url)).get(failing) == 1.0

        await wait_for(metric_shows_it, timeout_s=1.5, interval_s=0.1)
        promoted_at = await until(
            lambda: cluster.roles(via=healthy).get(replica, ("", None))[0] == "master",
            "the replica's promotion",
        )
        await load.answered(int(2.5 * CALLS_PER_S), since_s=promoted_at)

        # 2. The old master comes back (empty: no persistence) as the new one's replica.
        restarted_at = time.monotonic()
        await asyncio.to_thread(cluster.node(victim).start)
        await until(
            lambda: (
                cluster.roles(via=healthy).get(victim, ("", None)) == ("slave", replica)
                and "master_link_status:up" in cli(victim, "info", "replication")
            ),
            "the restarted node to sync",
        )
        await load.answered(int(1.5 * CALLS_PER_S), since_s=time.monotonic())

        # 3. A manual failover hands the slots back to it.
        failover_at = time.monotonic()
        await asyncio.to_thread(cli, victim, "cluster", "failover")
        failed_over_at = await until(
            lambda: cluster.roles(via=healthy).get(victim, ("", None))[0] == "master",
            "the manual failover",
        )
        await load.answered(2 * CALLS_PER_S, since_s=failed_over_at)
        await load.stop()
        samples = await scrape(service.url)

        async def metric_cleared() -> bool:  # a master again, answering
            return (await scrape(service.url)).get(failing, 0.0) == 0.0

        await wait_for(metric_cleared, timeout_s=3.0, interval_s=0.1)
    finally:
        if load is not None and not load.stopping_s:
            await load.stop()
        if service is not None:
            service.stop()
        await asyncio.to_thread(cluster.stop)

    print(f"\n{load.report()}")
    done = answered(load, calls)
    # Offered at the level; what one worker achieves beside six Redis nodes on
    # a shared 2-core machine during the faults is printed, not asserted.
    assert load.stopping_s - load.started_s > 8 and all(load.per_second())
    assert load.errors == []
    assert [a for a in done if a.status != 200] == []
    wrong = [a for a in done if a.answer not in (a.call.expected, ON_ERROR)]
    assert wrong == []
    fallbacks = [a for a in done if a.answer == ON_ERROR]
    on_healthy = [a for a in fallbacks if not a.call.on_victim]
    assert on_healthy == [], [
        (round(a.sent_s - killed_at, 3), round(a.took_s, 3)) for a in on_healthy
    ]
    windows = [
        (killed_at, promoted_at + AFTER_PROMOTION_S),
        (failover_at, failed_over_at + AFTER_PROMOTION_S),
    ]
    # A call still in flight when the master died counts as in the window: at 2,000
    # calls a second a few are sent in the last milliseconds before the kill.
    outside = [
        a
        for a in fallbacks
        if not any(lo <= a.sent_s + a.took_s and a.sent_s <= hi for lo, hi in windows)
    ]
    assert outside == [], [round(a.sent_s - killed_at, 3) for a in outside]
    assert samples.get('callscreen_on_error_total{reason="internal"}', 0) == 0
    assert samples.get('callscreen_errors_total{kind="internal"}', 0) == 0
    log = service.log_text()
    assert "answering by on_error (redis_error)" in log
    assert "answers normal again: on_error (redis_error) stopped after" in log

    def last_fallback(lo: float, hi: float) -> str:
        hits = [a.sent_s for a in fallbacks if lo <= a.sent_s <= hi]
        return f"{len(hits)} on_error, last sent {max(hits) - lo:.2f} s in" if hits else "none"

    victim_calls = [a for a in done if a.call.on_victim and killed_at <= a.sent_s < promoted_at]
    during = sorted(
        a.took_s for a in done if not a.call.on_victim and killed_at <= a.sent_s < promoted_at
    )
    before = sorted(a.took_s for a in done if a.sent_s < killed_at)

    def spread(took: list[float]) -> str:
        p50, p99 = took[len(took) // 2], took[int(len(took) * 0.99)]
        return f"p50 {p50 * 1000:.1f} / p99 {p99 * 1000:.1f} / max {took[-1] * 1000:.1f} ms"

    print(
        f"\nhealthy-shard answer time before the kill {spread(before)}, "
        f"until the promotion {spread(during)}"
    )
    print(
        f"\ncalls {len(done)}, healthy on_error 0; kill -> promotion seen "
        f"{promoted_at - killed_at:.2f} s; kill phase: {last_fallback(*windows[0])} "
        f"(of {len(victim_calls)} dead-shard calls before promotion); restart at "
        f"+{restarted_at - killed_at:.1f} s: none; manual failover took "
        f"{failed_over_at - failover_at:.2f} s: {last_fallback(*windows[1])}"
    )


pytestmark = pytest.mark.timeout(120)
