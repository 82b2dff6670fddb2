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

from core.config import Config, load_config
from core.subscribers import Changes, SubscriberStore
from devtools.redis_server import RedisProcess, free_port
from loader.sync import sync_list
from service.operator import admin as admin_module
from service.operator import offload
from tests.helpers import REJECT, LoopHolds, body_from, load_list, thread_cpu_s, wait_for
from tests.load import Load
from tests.procs import BLOCKLIST_CONFIG, ServiceProcess, scrape
from tests.test_subscribers import PERSONAL, SUB_A, call_body, subscribers_config

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


#: The longest the service's own code may hold its event loop (CPU time, less garbage
#: collection) for a bulk change, as a share of what preparing the same change on the
#: loop takes on the same machine: before the bulk's parse moved to a helper process and
#: the delta sets were decoded in slices, a 100 k-entry change held the loop for all of
#: it (40-110 ms on the machines of the time), now for a few slices of work.
MAX_HOLD_SHARE = 1 / 3
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
    # Late answers are the service's own wall clock too, from arrival to answer, so the
    # moments the OS gives this shared 2-core machine to other processes can push one
    # past the deadline: at most one call in 500, where a loop held past the deadline
    # delays every call arriving meanwhile (2,000 a second here).
    assert found["callscreen_late_answers_total"] <= len(calls.answers) / 500
    assert found['callscreen_on_error_total{reason="deadline"}'] == 0


async def _load_answered(load: Load, count: int) -> bool:
    return len(load.answers) >= count


async def _count(timings: list[Any], count: int) -> bool:
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
    holds = LoopHolds()

    async def listed() -> bool:
        response = await client.post("/tg/main", json=body_from("12120099999"))
        return bool(await response.json() == REJECT)

    bulk = orjson.dumps({"add": BULK_NUMBERS})
    on_the_loop_s = thread_cpu_s(lambda: offload.prepare(bulk, "numbers", "1", 100_000))
    holds.start()
    try:
        response = await client.post(
            "/v1/lists/blocklist/entries",
            data=io.BytesIO(bulk),
            headers={**AUTH, "Content-Type": "application/json"},
        )
        assert response.status == 200, await response.text()
        await wait_for(listed, timeout_s=30, interval_s=0.05)
    finally:
        await holds.stop()
    longest = holds.longest()
    print(f"longest hold {longest * 1000:.1f} ms; on the loop the change took "
          f"{on_the_loop_s * 1000:.1f} ms")  # fmt: skip
    assert longest < MAX_HOLD_SHARE * on_the_loop_s, f"held for {longest * 1000:.0f} ms"


def subscriber_bulk() -> bytes:
    """A subscribers bulk change as large as admin.max_bulk_entries allows by default: a
    block entry for each of 100 k subscribers (about 7 MB of JSON). Written as text: held
    as 100 k dicts, the test's own objects would lengthen the collector's passes in the
    in-process test."""
    items = ",".join(
        f'{{"subscriber":"1951{i:07d}","entry":"1212{i:07d}","side":"block"}}'
        for i in range(100_000)
    )
    return f'{{"add":[{items}]}}'.encode()


async def test_a_100k_subscriber_bulk_is_prepared_without_holding_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """Like the list bulk above, for what runs before the write: the body's JSON, every
    item's checks and canonical form (in the helper process) and the changes handed back.

    Measured up to the moment the write begins (:meth:`SubscriberStore.bulk_change`,
    wrapped to note when). The write itself yields every few ms, but its 100 k-subscriber
    structures cost a full pass of the cyclic collector of tens of ms (docs/subscribers.md).
    """
    monkeypatch.setenv("CALLSCREEN_ADMIN_TOKENS", TOKEN)
    (tmp_path / "personal.csv").write_text(f"{SUB_A},15165550101\n")
    config = make_config(subscribers_config(), base_dir=tmp_path)
    await sync_list(redis, config, "personal")
    client = await make_client(config, redis_client=redis)
    holds = LoopHolds()
    writing: list[int] = []  # how many holds were seen when the write began
    bulk_change = SubscriberStore.bulk_change

    async def noted(store: SubscriberStore, name: str, changes: Changes, **how: Any) -> int:
        writing.append(len(holds.holds))
        return await bulk_change(store, name, changes, **how)

    monkeypatch.setattr(SubscriberStore, "bulk_change", noted)

    bulk = subscriber_bulk()
    on_the_loop_s = thread_cpu_s(lambda: offload.prepare_subscribers(bulk, "1", 100_000))
    holds.start()
    try:
        response = await client.post(
            "/v1/lists/personal/subscribers",
            data=io.BytesIO(bulk),
            headers={**AUTH, "Content-Type": "application/json"},
        )
        assert response.status == 200, await response.text()
        assert (await response.json())["added"] == 100_000
    finally:
        await holds.stop()

    async def screened() -> bool:  # the bulk's last pair (after the worker's next poll)
        call = await client.post("/tg/main", json=call_body("12120099999", "19510099999"))
        return bool(await call.json() == PERSONAL)

    await wait_for(screened, timeout_s=10)
    longest = holds.longest(writing[0])
    print(f"longest hold before the write {longest * 1000:.1f} ms; on the loop the "
          f"preparation took {on_the_loop_s * 1000:.1f} ms")  # fmt: skip
    assert longest < MAX_HOLD_SHARE * on_the_loop_s, f"held for {longest * 1000:.0f} ms"


async def test_a_100k_subscriber_bulk_on_the_operator_listener_leaves_calls_in_time(
    tmp_path: Path, redis_server: RedisProcess, redis: Redis
) -> None:
    """One process: the operator listener and the handler share an event loop; calls
    that read a subscriber from Redis go on while the bulk change is prepared and written."""
    admin_port = free_port()
    (tmp_path / "personal.csv").write_text(f"{SUB_A},15165550101\n")
    overrides = subscribers_config()
    overrides["lists"]["personal"]["source"] = str(tmp_path / "personal.csv")
    service = ServiceProcess(
        tmp_path / "service",
        redis_server.url,
        overrides={
            **overrides,
            "server": {**BLOCKLIST_CONFIG["server"], "admin_port": admin_port},
        },
        env={"CALLSCREEN_ADMIN_TOKENS": TOKEN},
    )
    bulk = subscriber_bulk()
    answers: list[Any] = []
    stop = asyncio.Event()

    async def calls() -> None:  # a subscriber's block entry, paced, one connection
        body = orjson.dumps(call_body("15165550101", SUB_A))
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                async with session.post(f"{service.url}/tg/main", data=body) as response:
                    answers.append(await response.json())
                await asyncio.sleep(0.002)

    try:
        await sync_list(redis, load_config(service.config_path), "personal")
        service.start()
        await service.ready()
        running = asyncio.create_task(calls())
        await wait_for(lambda: _count(answers, 50), timeout_s=10)
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{admin_port}/v1/lists/personal/subscribers",
                data=io.BytesIO(bulk),
                headers={**AUTH, "Content-Type": "application/json"},
            ) as response,
        ):
            assert response.status == 200, await response.text()
            assert (await response.json())["added"] == 100_000
        done = len(answers)
        await wait_for(lambda: _count(answers, done + 50), timeout_s=10)
        stop.set()
        await running
        found = await scrape(f"http://127.0.0.1:{admin_port}")
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{service.url}/tg/main", json=call_body("12120099999", "19510099999")
            ) as response,
        ):
            assert await response.json() == PERSONAL  # the bulk's last pair is screened
    finally:
        stop.set()
        service.stop()
    assert answers and all(answer == PERSONAL for answer in answers)
    assert found["callscreen_late_answers_total"] == 0
    assert found['callscreen_on_error_total{reason="deadline"}'] == 0
