"""A large admin bulk change must not stall the calls a worker is answering meanwhile.

CarrierX gives the external handler a timeout of its own (the trunk group's, 250 ms
here): a call answered later than that is lost, the trunk group's error handler decides
it instead. So every call answered while 25,000 CNAM entries are written through the
admin API, and then reloaded by the worker, must be answered within 250 ms. That is a
functional requirement, not a benchmark, and the bound is generous: a call takes about
a millisecond. It is the only timing bound in the tests.

The list already holds 300,000 names: rebuilt on the event loop (re-read from Redis,
merged, indexed), a list that size stalled calls for about half a second.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from core.config import Config
from devtools.redis_server import RedisProcess, free_port
from service.operator import admin as admin_module
from tests.helpers import REJECT, body_from, load_list, wait_for
from tests.load import Load
from tests.procs import BLOCKLIST_CONFIG, ServiceProcess, scrape

#: The CarrierX trunk group timeout: later answers are lost (see the module docstring).
CARRIER_TIMEOUT_S = 0.25
TOKEN = "stall-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CNAM_REJECT = [{"action": "reject", "operands": ["unavailable", "cnam"]}]
NAMES_CONFIG: dict[str, Any] = {
    "lists": {"cnam": {"kind": "names"}},
    "policies": {
        "default": {
            "rules": [
                {
                    "name": "cnam",
                    "match": "caller_name_matches_list",
                    "list": "cnam",
                    "operands": ["unavailable", "cnam"],
                }
            ]
        }
    },
}
#: A large CNAM list (see the module docstring).
BASE = ["Spam Likely", *(f"base caller {i:06d}" for i in range(300_000))]
#: 25,000 names: mostly exact, some substrings, a few patterns.
BULK = [
    *(f"Robo Caller {i:05d}" for i in range(15_000)),
    *(f"contains:spamword{i:04d}" for i in range(9_980)),
    *(f"re:^scam[0-9]+x{i}$" for i in range(20)),
]
#: Each probe's allowed answers, in the order they may come: a new entry is let through
#: until the reload lands, then rejected for good.
PROBES: dict[str, tuple[Any, ...]] = {
    "Spam Likely": (CNAM_REJECT,),
    "John Smith": ([],),
    "Robo Caller 00042": ([], CNAM_REJECT),
}


@pytest.fixture
def service(tmp_path: Path, redis_server: RedisProcess) -> Iterator[ServiceProcess]:
    process = ServiceProcess(
        tmp_path, redis_server.url, overrides=NAMES_CONFIG, env={"CALLSCREEN_ADMIN_TOKENS": TOKEN}
    )
    yield process
    process.stop()


class Caller:
    """Screening calls one after another, each timed, until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[tuple[str, Any, float]] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        names = list(PROBES)
        async with aiohttp.ClientSession() as session:
            while not self.stop.is_set():
                name = names[len(self.answers) % len(names)]
                body = orjson.dumps(body_from("15162065613", name=name))
                started = time.perf_counter()
                async with session.post(f"{self.url}/tg/main", data=body) as response:
                    answer = await response.json()
                self.answers.append((name, answer, time.perf_counter() - started))

    def rejected(self, name: str) -> bool:
        return any(n == name and a == CNAM_REJECT for n, a, _ in self.answers)


async def test_calls_stay_within_the_carrier_timeout_while_a_bulk_change_lands(
    service: ServiceProcess, redis: Redis
) -> None:
    await load_list(redis, "cnam", "names", BASE)
    service.start()
    await service.ready()
    bulk = orjson.dumps({"add": BULK})  # encoded up front: the test's own loop stays free
    caller = Caller(service.url)
    calls = asyncio.create_task(caller.run())
    try:
        await wait_for(lambda: _answered(caller, 30), timeout_s=10)
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{service.url}/v1/lists/cnam/entries",
                data=bulk,
                headers={**AUTH, "Content-Type": "application/json"},
            ) as response,
        ):
            assert response.status == 200, await response.text()
            assert (await response.json())["added"] == len(BULK)
        await wait_for(lambda: _rejected(caller, "Robo Caller 00042"), timeout_s=30)
        loaded = len(caller.answers)
        await wait_for(lambda: _answered(caller, loaded + 30), timeout_s=10)
    finally:
        caller.stop.set()
        await calls

    seen: dict[str, int] = dict.fromkeys(PROBES, 0)
    for name, answer, took in caller.answers:
        allowed = PROBES[name]
        assert answer in allowed[seen[name] :], (name, answer)
        seen[name] = allowed.index(answer)  # never back to an earlier answer
        assert took < CARRIER_TIMEOUT_S, f"a call took {took * 1000:.0f} ms"

    async def screen(name: str) -> Any:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{service.url}/tg/main", json=body_from(name=name)) as response,
        ):
            return await response.json()

    for name in ("Robo Caller 14999", "Big SPAMWORD9979 deals", "scam123x7", "base caller 000001"):
        assert await screen(name) == CNAM_REJECT, name
    assert await screen("scam123x77") == []


async def _answered(caller: Caller, count: int) -> bool:
    return len(caller.answers) >= count


async def _rejected(caller: Caller, name: str) -> bool:
    return caller.rejected(name)


async def test_an_over_limit_bulk_body_is_refused_before_any_entry_is_read(
    monkeypatch: pytest.MonkeyPatch,
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
) -> None:
    monkeypatch.setenv("CALLSCREEN_ADMIN_TOKENS", TOKEN)
    config = make_config({**NAMES_CONFIG, "admin": {"max_bulk_entries": 1000}})
    client = await make_client(config, redis_client=redis)
    looked_at: list[str] = []

    def canonical(kind: str, raw: str, country: str = "1") -> str:
        looked_at.append(raw)
        raise AssertionError("an over-limit body must be refused before any entry is read")

    monkeypatch.setattr(admin_module, "canonical", canonical)
    invalid = ["re:(unclosed"] * 1001  # bad entries: 400 if they were looked at first
    response = await client.post("/v1/lists/cnam/entries", json={"add": invalid}, headers=AUTH)
    assert response.status == 413
    assert "1001 entries in one request; at most 1000" in (await response.json())["error"]
    assert looked_at == []
    split = {"add": ["a"] * 600, "remove": ["b"] * 401}  # the limit is on both together
    assert (await client.post("/v1/lists/cnam/entries", json=split, headers=AUTH)).status == 413
    assert looked_at == []


#: The longest the service's own code may hold its event loop (CPU time) for a bulk
#: change: a few slices of work. Before the bulk's parse moved to a helper process and
#: the delta sets were decoded in slices, a 100 k-entry change held it for 40-110 ms.
MAX_HOLD_S = 0.03
#: A bulk change as large as admin.max_bulk_entries allows by default.
BULK_NUMBERS = [f"+1212{i:07d}" for i in range(100_000)]


async def test_a_100k_bulk_on_the_operator_listener_leaves_local_list_calls_in_time(
    tmp_path: Path, redis_server: RedisProcess, redis: Redis
) -> None:
    """One process: the operator listener and the handler share an event loop."""
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    admin_port = free_port()
    service = ServiceProcess(
        tmp_path,
        redis_server.url,
        overrides={"server": {**BLOCKLIST_CONFIG["server"], "admin_port": admin_port}},
        env={"CALLSCREEN_ADMIN_TOKENS": TOKEN},
    )
    bulk = orjson.dumps({"add": BULK_NUMBERS})
    # Local-list calls at issue 17's load level, paced over keep-alive connections.
    calls = Load(service.url, [orjson.dumps(body_from("15162065613"))], rate_per_s=2000.0)
    try:
        service.start()
        await service.ready()
        calls.start()
        await wait_for(lambda: _load_answered(calls, 500), timeout_s=10)
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{admin_port}/v1/lists/blocklist/entries",
                data=io.BytesIO(bulk),  # raw bytes this large: aiohttp warns
                headers={**AUTH, "Content-Type": "application/json"},
            ) as response,
        ):
            assert response.status == 200, await response.text()
            assert (await response.json())["added"] == len(BULK_NUMBERS)
        loaded = len(calls.answers)

        async def listed() -> bool:  # the new entries are screened: the list reloaded
            body = orjson.dumps(body_from("12120099999"))
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"{service.url}/tg/main", data=body) as response,
            ):
                return bool(await response.json() == REJECT)

        await wait_for(listed, timeout_s=30, interval_s=0.05)
        await wait_for(lambda: _load_answered(calls, loaded + 500), timeout_s=10)
        await calls.stop()
        found = await scrape(f"http://127.0.0.1:{admin_port}")
    finally:
        if calls.started_s and not calls.stopping_s:
            await calls.stop()
        service.stop()
    # Wall time on a shared 2-core machine also holds the moments the OS runs other
    # processes: printed, not asserted (test_a_100k_bulk_holds_the_event_loop_... bounds
    # what the service's own code holds). The service counted no answer past the deadline.
    print(calls.report())
    assert calls.errors == [] and calls.statuses() == {200}
    assert all(answer == REJECT for answer in calls.after(0.0))
    assert found["callscreen_late_answers_total"] == 0
    assert found['callscreen_on_error_total{reason="deadline"}'] == 0


async def _load_answered(load: Load, count: int) -> bool:
    return len(load.answers) >= count


async def _count(timings: list[float], count: int) -> bool:
    return len(timings) >= count


async def test_a_100k_bulk_holds_the_event_loop_a_few_ms_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
) -> None:
    """The CPU the loop's thread spends between two of its turns, not wall time.

    Wall time also counts the moments a busy machine gives the process no CPU at all;
    this measure is what the service's own code holds the loop for, which is what a
    call waiting behind it would wait on a quiet machine.
    """
    monkeypatch.setenv("CALLSCREEN_ADMIN_TOKENS", TOKEN)
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    config = make_config({**BLOCKLIST_CONFIG, "cache": {"refresh_ms": 50}})
    client = await make_client(config, redis_client=redis)
    holds: list[float] = []
    stop = asyncio.Event()

    async def watch() -> None:
        last = time.thread_time()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.thread_time()
            holds.append(now - last)
            last = now

    async def listed() -> bool:
        response = await client.post("/tg/main", json=body_from("12120099999"))
        return bool(await response.json() == REJECT)

    bulk = orjson.dumps({"add": BULK_NUMBERS})
    watcher = asyncio.create_task(watch())
    try:
        response = await client.post(
            "/v1/lists/blocklist/entries",
            data=io.BytesIO(bulk),
            headers={**AUTH, "Content-Type": "application/json"},
        )
        assert response.status == 200, await response.text()
        await wait_for(listed, timeout_s=30, interval_s=0.05)
    finally:
        stop.set()
        await watcher
    print(f"longest holds: {[round(h * 1000, 1) for h in sorted(holds)[-5:]]} ms")
    assert max(holds) < MAX_HOLD_S, f"the loop was held for {max(holds) * 1000:.0f} ms"
