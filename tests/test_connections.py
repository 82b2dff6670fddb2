"""Connections on a real service process: the SIGTERM drain, read timeouts, the cap,
recycling, client disconnects and restarting on a port with TIME_WAIT connections.

Each test starts ``python -m service`` and talks to it over real sockets. Where a test
bounds a wait, the bound is what makes the behaviour (a connection closed "at once"
versus after the 10 s shutdown timeout; a call answered at all), not a speed figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from devtools.redis_server import RedisProcess, free_port
from tests.helpers import REJECT, body_from, load_list, wait_for
from tests.procs import BLOCKLIST_CONFIG, ServiceProcess, scrape

SERVER = BLOCKLIST_CONFIG["server"]
BLOCKED = orjson.dumps(body_from("15162065613"))
ALLOWED = orjson.dumps(body_from("15162065699"))


class LimitedService(ServiceProcess):
    """A service process started with a low open-files limit, like many servers have."""

    def __init__(self, *args: Any, nofile: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nofile = nofile

    def start(self) -> ServiceProcess:
        # The limit is set inside the child before the service starts (no preexec_fn:
        # forking with a callback is unsafe while the test runs threads).
        prelude = (
            "import resource, runpy, sys; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({self.nofile}, {self.nofile})); "
            "sys.argv[0] = 'service'; runpy.run_module('service', run_name='__main__')"
        )
        command = ["-c", prelude] if self.nofile is not None else ["-m", "service"]
        argv = [
            sys.executable, *command, "--config", str(self.config_path),
            "--port", str(self.port), *self.args,
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(argv, stderr=log, stdout=log)
        return self


@pytest.fixture
def processes() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for process in started:
        process.stop()


async def _service(
    processes: list[ServiceProcess], folder: Path, redis_url: str, **kwargs: Any
) -> ServiceProcess:
    service = LimitedService(folder, redis_url, **kwargs)
    processes.append(service)
    service.start()
    await service.ready()
    return service


def _request(body: bytes, *, close: bool = False) -> bytes:
    connection = b"Connection: close\r\n" if close else b""
    return (
        b"POST /tg/main HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"%sContent-Length: %d\r\n\r\n%s" % (connection, len(body), body)
    )


async def _read_answer(reader: asyncio.StreamReader) -> tuple[dict[bytes, bytes], Any]:
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
    fields = {
        name.lower(): value
        for name, value in (line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if line)
    }
    return fields, orjson.loads(await reader.readexactly(int(fields[b"content-length"])))


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await reader.read(1) == b""
    except ConnectionError:
        return True


# --- SIGTERM ------------------------------------------------------------------------------
async def test_sigterm_closes_idle_keepalive_connections_at_once(
    processes: list[ServiceProcess], tmp_path: Path, redis_server: RedisProcess, redis: Redis
) -> None:
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    service = await _service(processes, tmp_path, redis_server.url)
    idle = []
    for _ in range(20):
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(_request(BLOCKED))
        fields, answer = await _read_answer(reader)
        assert answer == REJECT and fields.get(b"connection") != b"close"
        idle.append((reader, writer))

    service.signal(signal.SIGTERM)
    # Closed by the server itself at once, not left open until the 10 s shutdown timeout.
    async with asyncio.timeout(3.0):
        closed = await asyncio.gather(*(_closed_by_server(reader) for reader, _ in idle))
    assert all(closed)
    for _, writer in idle:
        writer.close()
    assert await service.exited(timeout_s=5.0) == 0
    assert "still open after" not in service.log_text()


async def test_sigterm_answers_a_busy_connection_until_it_says_connection_close(
    processes: list[ServiceProcess], tmp_path: Path, redis_server: RedisProcess, redis: Redis
) -> None:
    """A connection in use is not cut under its client: every request sent on it after
    SIGTERM is answered, until an answer carries ``Connection: close``; then the server
    closes it."""
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    service = await _service(processes, tmp_path, redis_server.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    writer.write(_request(ALLOWED))
    await _read_answer(reader)

    service.signal(signal.SIGTERM)
    answers = 0
    async with asyncio.timeout(5.0):
        while True:
            writer.write(_request(BLOCKED))  # calls back to back
            fields, answer = await _read_answer(reader)
            assert answer == REJECT
            answers += 1
            if fields.get(b"connection") == b"close":
                break
        assert await _closed_by_server(reader)
    writer.close()
    assert answers >= 1
    assert await service.exited(timeout_s=5.0) == 0


# Two workers on aiohttp's public API lose a few calls: connections that were just
# opened and had sent nothing yet are invisible to the public-mode drain
# (docs/operations.md, "aiohttp internals").
@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.internals)])
async def test_sigterm_under_load_loses_no_request_on_128_keepalive_connections(
    processes: list[ServiceProcess],
    tmp_path: Path,
    redis_server: RedisProcess,
    redis: Redis,
    workers: int,
) -> None:
    """128 clients send calls back to back on keep-alive connections while SIGTERM comes.

    Every request that reached an open connection is answered; afterwards a client
    finds the port closed when it connects (so its call never left it). A request
    that is sent and then gets no answer (reset, disconnected, timed out) is a lost call.
    """
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    service = await _service(processes, tmp_path, redis_server.url, workers=workers)
    answered = 0
    lost: list[str] = []
    wrong: list[Any] = []
    refused = 0
    stop_load = asyncio.Event()

    async def client(session: aiohttp.ClientSession, index: int) -> None:
        nonlocal answered, refused
        body, expected = (BLOCKED, REJECT) if index % 2 else (ALLOWED, [])
        while not stop_load.is_set():
            try:
                async with session.post(
                    f"{service.url}/tg/main",
                    data=body,
                    headers={"Content-Type": "application/json"},
                ) as response:
                    answer = await response.json()
            except aiohttp.ClientConnectorError:
                refused += 1  # nothing listens any more: the call was never sent
                return
            except (aiohttp.ClientError, TimeoutError) as exc:
                lost.append(repr(exc))
                return
            answered += 1
            if response.status != 200 or answer != expected:
                wrong.append((response.status, answer))

    connector = aiohttp.TCPConnector(limit=128, force_close=False)
    timeout = aiohttp.ClientTimeout(total=5.0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(client(session, i)) for i in range(128)]
        await wait_for(_answered_at_least(lambda: answered, 2000), timeout_s=60.0)
        before = answered
        service.signal(signal.SIGTERM)
        async with asyncio.timeout(30.0):
            await asyncio.gather(*tasks)
        stop_load.set()
    assert lost == []
    assert wrong == []
    assert refused == 128
    assert answered > before  # requests arriving during the drain were answered
    assert await service.exited(timeout_s=20.0) == 0
    assert "still open after" not in service.log_text()


def _answered_at_least(count: Any, wanted: int) -> Any:
    async def check() -> bool:
        return bool(count() >= wanted)

    return check


# --- read timeouts and the connection cap --------------------------------------------------
async def _slow_sender(
    port: int, stop: asyncio.Event, started: list[bool], closed: list[bool]
) -> None:
    """A slowloris client: a request head sent one byte at a time, every 0.5 s."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        started.append(True)
        closed.append(True)
        return
    started.append(True)
    head = b"POST /tg/main HTTP/1.1\r\nHost: test\r\nX-Padding: " + b"a" * 200
    try:
        for byte in head:
            writer.write(bytes([byte]))
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    if await reader.read(1) == b"":
                        closed.append(True)
                        return
            if stop.is_set():
                return
    except ConnectionError:
        closed.append(True)
    finally:
        writer.close()


async def _real_calls(url: str, count: int) -> list[Any]:
    """``count`` screening calls, each on a fresh connection; their answers."""
    answers = []
    timeout = aiohttp.ClientTimeout(total=10.0)
    for i in range(count):
        body = BLOCKED if i % 2 else ALLOWED
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(
                f"{url}/tg/main", data=body, headers={"Content-Type": "application/json"}
            ) as response,
        ):
            answers.append(await response.json())
    return answers


@pytest.mark.internals  # the read timeout and the cap see connections through aiohttp's internals
@pytest.mark.parametrize("slow", [500, 5000])
async def test_slow_senders_neither_starve_real_calls_nor_stay(
    processes: list[ServiceProcess],
    tmp_path: Path,
    redis_server: RedisProcess,
    redis: Redis,
    slow: int,
) -> None:
    """Slowloris against a worker limited to 1,024 open files (a common default).

    Real calls keep being answered while the slow connections are held, and the slow
    connections are closed by the read timeout (or evicted past the cap) instead of
    holding their sockets for the keep-alive timeout.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < slow + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    service = await _service(
        processes,
        tmp_path,
        redis_server.url,
        nofile=1024,
        overrides={"server": {**SERVER, "request_timeout_ms": 2000}},
    )
    stop = asyncio.Event()
    started: list[bool] = []
    closed: list[bool] = []
    attackers = []
    for start in range(0, slow, 500):
        attackers += [
            asyncio.create_task(_slow_sender(service.port, stop, started, closed))
            for _ in range(min(500, slow - start))
        ]
        # A batch at a time, each connected before the next: the listen queue is short.
        await wait_for(_answered_at_least(lambda: len(started), len(attackers)), timeout_s=60.0)
    answers = await _real_calls(service.url, 20)
    assert answers == [REJECT if i % 2 else [] for i in range(20)]
    # The read timeout (2 s) closes the slow connections long before their heads end.
    await wait_for(_answered_at_least(lambda: len(closed), slow), timeout_s=60.0)
    stop.set()
    await asyncio.gather(*attackers)
    samples = await scrape(service.url)
    cut = samples['callscreen_errors_total{kind="read_timeout"}']
    evicted = samples['callscreen_errors_total{kind="overloaded"}']
    assert cut + evicted >= slow
    if slow > 1024:
        assert evicted > 0
    assert await _real_calls(service.url, 4) == [[], REJECT, [], REJECT]


# --- client disconnects ---------------------------------------------------------------------
async def test_a_client_hanging_up_mid_body_is_counted_not_an_internal_error(
    processes: list[ServiceProcess], tmp_path: Path, redis_server: RedisProcess, redis: Redis
) -> None:
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    service = await _service(processes, tmp_path, redis_server.url)
    head = (
        b"POST /tg/main HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: 1000\r\n\r\n"
    )
    for abort in (False, True):
        sock = socket.create_connection(("127.0.0.1", service.port))
        sock.sendall(head)
        # "100 Continue" comes from inside the handler: it is reading the body now.
        sock.settimeout(10.0)
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(BLOCKED[:20])
        if abort:  # RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    async def counted() -> bool:
        samples = await scrape(service.url)
        return samples['callscreen_errors_total{kind="client_disconnected"}'] == 2

    await wait_for(counted, timeout_s=5.0)
    samples = await scrape(service.url)
    assert samples['callscreen_errors_total{kind="internal"}'] == 0
    records = service.log_records()
    assert not [r for r in records if "exception" in r or r["level"] == "ERROR"]
    assert await _real_calls(service.url, 2) == [[], REJECT]  # and serving on


# --- restarting on the same port ------------------------------------------------------------
async def test_several_workers_start_on_a_port_with_time_wait_connections(
    processes: list[ServiceProcess], tmp_path: Path, redis_server: RedisProcess, redis: Redis
) -> None:
    """A single-process run closed connections itself (TIME_WAIT on the server side);
    a multi-worker start right after it must still get the port."""
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    port = free_port()
    single = await _service(processes, tmp_path / "one", redis_server.url, port=port)
    for _ in range(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_request(ALLOWED, close=True))
        await _read_answer(reader)
        assert await _closed_by_server(reader)  # the server closed first: its side waits
        writer.close()
    single.signal(signal.SIGTERM)
    assert await single.exited() == 0

    several = await _service(processes, tmp_path / "two", redis_server.url, port=port, workers=2)
    assert await _real_calls(several.url, 2) == [[], REJECT]


# --- recycling ------------------------------------------------------------------------------
def _established(pid: int, port: int) -> int:
    """Established TCP connections on ``port`` whose sockets process ``pid`` holds."""
    inodes = set()
    for link in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = link.readlink().as_posix()
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "01" and fields[9] in inodes:
                    count += 1
    return count


def _worker_pids(service: ServiceProcess) -> list[int]:
    pids = []
    for record in service.log_records():
        message = record["message"]
        if message.startswith("worker ") and " started (pid " in message:
            pids.append(int(message.rsplit("pid ", 1)[1].rstrip(")")))
    return pids


async def test_recycled_connections_reach_a_restarted_worker(
    processes: list[ServiceProcess], tmp_path: Path, redis_server: RedisProcess, redis: Redis
) -> None:
    """After one of two workers is killed, its clients reconnect to the survivor; with
    recycling, connections come back to the restarted worker instead of staying there."""
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    service = await _service(
        processes,
        tmp_path,
        redis_server.url,
        workers=2,
        overrides={"server": {**SERVER, "max_requests_per_connection": 25}},
    )
    first, _second = _worker_pids(service)[:2]
    connector = aiohttp.TCPConnector(limit=16)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def calls(count: int) -> None:
            async def one() -> None:
                for _ in range(count):
                    async with session.post(
                        f"{service.url}/tg/main",
                        data=ALLOWED,
                        headers={"Content-Type": "application/json"},
                    ) as response:
                        assert await response.json() == []

            await asyncio.gather(*(one() for _ in range(16)))

        await calls(10)
        os.kill(first, signal.SIGKILL)

        async def restarted() -> bool:
            return len(_worker_pids(service)) >= 3

        await wait_for(restarted, timeout_s=30.0)
        await service.ready()
        newcomer = _worker_pids(service)[2]
        await calls(10)  # the killed worker's clients reconnect (to the survivor)

        async def rebalanced() -> bool:
            await calls(5)
            return _established(newcomer, service.port) > 0

        await wait_for(rebalanced, timeout_s=60.0, interval_s=0.0)
