"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import copy
import gc
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner
from redis.asyncio.connection import Connection

from core.build import start_build
from core.config import ListKind
from core.entries import canonical
from core.shards import LeanRedis
from core.store import RedisClient
from service.app import DIRECT_HANDLERS
from service.appkeys import INTERNALS
from service.edge.dispatch import direct_runner

#: The request CarrierX documents for its external handlers.
EXAMPLE_BODY: dict[str, Any] = {
    "Call-ID": ["243b35b872d5bb005af22dd9339e8149@10.1.10.190"],
    "From": [
        {
            "header_parameters": {"tag": "as69da6efa"},
            "host": "10.1.10.190",
            "name": "John Smith",
            "raw": '"John Smith" <sip:15162065613@10.1.10.190>;tag=as69da6efa',
            "uri_parameters": {},
            "user": "15162065613",
        }
    ],
    "Remote-Party-ID": [
        {
            "header_parameters": {"screen": "no", "privacy": "off", "party": "calling"},
            "host": "10.1.10.190",
            "name": "John Smith",
            "raw": '"John Smith" <sip:15162065613@10.1.10.190>;party=calling;screen=no;privacy=off',
            "uri_parameters": {},
            "user": "15162065613",
        }
    ],
    "To": [
        {
            "header_parameters": {},
            "host": "10.1.10.190:5060",
            "name": "",
            "raw": "<sip:19512623062@10.1.10.190:5060>",
            "uri_parameters": {},
            "user": "19512623062",
        }
    ],
    "User-Agent": ["VirtualPBX"],
    "CSeq": ["103 INVITE"],
    "Max-Forwards": ["69"],
}
REJECT = [{"action": "reject", "operands": ["unavailable", "aniblock"]}]


def body_from(
    user: str | None = "15162065613", name: str = "John Smith", **headers: Any
) -> dict[str, Any]:
    """The example body with another caller user (None drops ``user``) and extra headers."""
    body = copy.deepcopy(EXAMPLE_BODY)
    del body["Remote-Party-ID"]
    sender = body["From"][0]
    if user is None:
        del sender["user"]
    else:
        sender["user"] = user
        sender["raw"] = f'"{name}" <sip:{user}@10.1.10.190>;tag=as69da6efa'
    sender["name"] = name
    body.update(headers)
    return body


def process_state(pid: int) -> str | None:
    """The process's state letter (proc(5): ``T`` stopped, ``Z`` zombie), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (not exited, not a zombie)."""
    return process_state(pid) not in (None, "Z")


async def wait_for(
    check: Callable[[], Awaitable[bool]],
    timeout_s: float = 5.0,
    interval_s: float = 0.02,
    what: str = "condition",
) -> float:
    """Poll ``check`` until it returns True; fail the test after ``timeout_s``, naming
    ``what`` it waited for. Returns the :func:`time.monotonic` time it first held."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await check():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s}s")
        await asyncio.sleep(interval_s)


async def holds_for(
    check: Callable[[], Awaitable[bool]],
    window_s: float,
    interval_s: float = 0.02,
    what: str = "condition",
) -> None:
    """Poll ``check`` for ``window_s``; fail the test as soon as it stops holding, naming
    ``what``. For "nothing more happens": a window is the only way to see an absence."""
    deadline = time.monotonic() + window_s
    while time.monotonic() < deadline:
        if not await check():
            raise AssertionError(f"{what} stopped holding")
        await asyncio.sleep(interval_s)
    if not await check():
        raise AssertionError(f"{what} stopped holding")


async def load_list(redis: RedisClient, name: str, kind: ListKind, entries: list[str]) -> int:
    """Replace a list with ``entries`` (canonicalised) by a real full sync; return version."""
    builder = await start_build(redis, name, kind)
    await builder.add([canonical(kind, e) for e in entries])
    await builder.finish()
    return await builder.commit({"source": "test"})


class ServiceTestServer(TestServer):
    """aiohttp's test server with the service's runner: screening POSTs skip the router
    as they do in production (service/edge/dispatch.py)."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return direct_runner(self.app, self.app[INTERNALS], direct=DIRECT_HANDLERS, **kwargs)


#: The subscriber policy the subscribers tests share: the called subscriber's allow
#: entries first, then (after any rules put between) its block entries.
PERSONAL_ALLOW: dict[str, Any] = {
    "name": "personal-allow",
    "match": "caller_in_subscriber_list",
    "list": "personal",
    "action": "allow",
}
PERSONAL_BLOCK: dict[str, Any] = {
    "name": "personal-block",
    "match": "caller_in_subscriber_list",
    "list": "personal",
    "operands": ["decline", "subscriber-block"],
}


async def ready_client(make_client: Callable[..., Awaitable[Any]], config: Any) -> Any:
    """A test client for ``config``, once its ``/readyz`` answers 200."""
    client = await make_client(config)

    async def ready() -> bool:
        return bool((await client.get("/readyz")).status == 200)

    await wait_for(ready)
    return client


async def metric(client: Any, line: str) -> float:
    """The value of one series (``name{labels}``) in a test client's ``/metrics``."""
    text = await (await client.get("/metrics")).text()
    for row in text.splitlines():
        if row.startswith(line + " "):
            return float(row.split()[-1])
    raise AssertionError(f"{line} not in /metrics")


class CountingConnection(Connection):
    """A real connection that counts the writes it sends (one per pipeline or command)."""

    sends = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sends += 1
        await super().send_packed_command(command, check_health)


def sends(client: LeanRedis) -> int:
    """Writes to Redis so far: the calls' link's (core/wire.py) and redis-py's."""
    return client.dispatcher.sent()[0] + CountingConnection.sends


class LoopHolds:
    """How long the event loop's thread held the loop between two turns of a watcher
    task, in CPU time of that thread (a busy machine's preemption is not the code's),
    less what the garbage collector took meanwhile: its passes over a large change's
    objects are a documented cost of the write, not of the work a test bounds."""

    def __init__(self) -> None:
        self.holds: list[float] = []
        self._gc_s = 0.0
        self._gc_started: float | None = None
        self._thread = threading.get_ident()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _on_gc(self, phase: str, _info: dict[str, Any]) -> None:
        if threading.get_ident() != self._thread:
            return
        if phase == "start":
            self._gc_started = time.thread_time()
        elif self._gc_started is not None:
            self._gc_s += time.thread_time() - self._gc_started
            self._gc_started = None

    async def _watch(self) -> None:
        last, gc_then = time.thread_time(), self._gc_s
        while not self._stop.is_set():
            await asyncio.sleep(0.001)
            now = time.thread_time()
            self.holds.append(now - last - (self._gc_s - gc_then))
            last, gc_then = now, self._gc_s

    def start(self) -> None:
        gc.callbacks.append(self._on_gc)
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        gc.callbacks.remove(self._on_gc)

    def longest(self, upto: int | None = None) -> float:
        return max(self.holds[:upto])


def thread_cpu_s(work: Callable[[], Any]) -> float:
    """The CPU time of this thread that ``work()`` takes."""
    started = time.thread_time()
    work()
    return time.thread_time() - started
