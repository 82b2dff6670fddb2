"""Soak and fault run: load on the service while Redis stops, restarts and lists swap.

    python -m devtools.soak --duration 60 [--connections 8] [--workers 1] [--json]

Everything runs on 127.0.0.1 and in a temp dir, and stops after ``--duration`` seconds
(plus start-up): its own ``redis-server`` (AOF on, like production), the service
(``python -m service``) and the load. While the load runs, Redis is alternately frozen
(SIGSTOP) and restarted (SIGTERM, start again on the same port), every
``--fault-every`` seconds for ``--fault-length`` seconds, and the loader swaps the block
list between two versions every ``--swap-every`` seconds.

Callers are of three kinds: *stable* ones on every version of the list (must be
rejected), *unlisted* ones on none (must go on), and *churn* ones that move with each
swap (not judged). ``handler.on_error`` rejects with the tag ``soak-on-error``, so an
answer by ``on_error`` is told apart from one by the lists: a wrong answer is a stable
caller let through or an unlisted one rejected by the list, and only on_error may
differ from the lists, while Redis cannot be trusted.

The report: requests sent, answered, answered within the handler deadline and within
the trunk group timeout, on_error answers, 5xx, wrong answers, unanswered requests,
latency, faults and swaps. Exit status 0 when 5xx, wrong and unanswered are all 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import orjson
import yaml
from redis.asyncio import Redis

from core.config import load_config
from devtools.redis_server import RedisProcess, free_port
from loader.sync import sync_list

HOST = "127.0.0.1"  # loopback only, whatever the arguments
ON_ERROR_TAG = "soak-on-error"
LIST_TAG = "aniblock"
STABLE = [f"1516206{i:04d}" for i in range(200)]
UNLISTED = [f"1516555{i:04d}" for i in range(200)]
CHURN = ([f"1516777{i:04d}" for i in range(20)], [f"1516888{i:04d}" for i in range(20)])
ROOT = Path(__file__).resolve().parent.parent
#: Time allowed on top of ``--duration`` for start-up and wind-down before giving up.
START_AND_STOP_S = 90.0


@dataclass
class Report:
    duration_s: float = 0.0
    connections: int = 0
    workers: int = 0
    deadline_ms: int = 0
    trunk_timeout_ms: int = 0
    sent: int = 0
    answered: int = 0
    within_deadline: int = 0
    within_trunk_timeout: int = 0
    on_error: int = 0
    status_5xx: int = 0
    other_status: int = 0
    wrong: int = 0
    unanswered: int = 0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    latency_max_ms: float = 0.0
    redis_pauses: int = 0
    redis_restarts: int = 0
    swaps_ok: int = 0
    swaps_failed: int = 0
    wrong_examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status_5xx == 0 and self.wrong == 0 and self.unanswered == 0

    def text(self) -> str:
        def share(n: int) -> str:
            return f"{n} ({100 * n / self.answered:.1f} %)" if self.answered else str(n)

        lines = [
            f"soak: {self.duration_s:.0f} s, {self.connections} connections, "
            f"{self.workers} worker(s), deadline {self.deadline_ms} ms",
            f"requests sent              {self.sent}",
            f"answered                   {self.answered}",
            f"within the deadline        {share(self.within_deadline)}",
            f"within the trunk timeout   {share(self.within_trunk_timeout)}"
            f" ({self.trunk_timeout_ms} ms)",
            f"answered by on_error       {share(self.on_error)}",
            f"5xx                        {self.status_5xx}",
            f"other non-200              {self.other_status}",
            f"wrong answers              {self.wrong}",
            f"unanswered                 {self.unanswered}",
            f"latency p50 / p99 / max    {self.latency_p50_ms:.2f} / "
            f"{self.latency_p99_ms:.2f} / {self.latency_max_ms:.2f} ms",
            f"Redis faults               {self.redis_pauses} pauses, "
            f"{self.redis_restarts} restarts",
            f"list swaps                 {self.swaps_ok} done, {self.swaps_failed} failed",
            *(f"  wrong: {example}" for example in self.wrong_examples),
            "PASS" if self.ok else "FAIL",
        ]
        return "\n".join(lines)


def _body(caller: str) -> bytes:
    return orjson.dumps(
        {
            "Call-ID": [f"soak-{random.getrandbits(64):x}@127.0.0.1"],
            "From": [{"user": caller, "host": "127.0.0.1", "name": "Soak",
                      "raw": f"<sip:{caller}@127.0.0.1>", "header_parameters": {},
                      "uri_parameters": {}}],
            "To": [{"user": "19512623062", "host": "127.0.0.1", "name": "",
                    "raw": "<sip:19512623062@127.0.0.1>", "header_parameters": {},
                    "uri_parameters": {}}],
        }
    )  # fmt: skip


def _write_list(path: Path, version: int) -> None:
    numbers = [*STABLE, *CHURN[version % 2]]
    path.write_text("number\n" + "\n".join(numbers) + "\n")


def _config(folder: Path, redis_url: str, port: int, deadline_ms: int) -> Path:
    data = {
        "redis": {"url": redis_url, "socket_timeout_ms": 1000},
        "server": {"host": HOST, "port": port, "admin_port": None},
        "handler": {
            "deadline_ms": deadline_ms,
            "on_error": "reject",
            "on_error_operands": ["unavailable", ON_ERROR_TAG],
        },
        "loader": {"lock_ttl_s": 2},
        "lists": {"blocklist": {"kind": "numbers", "source": "blocklist.csv", "column": "number"}},
        "policies": {
            "default": {
                "rules": [
                    {"name": "blocklist", "match": "caller_in_list", "list": "blocklist"},
                    # Each unlisted call makes the one Redis round trip a request may make.
                    {"name": "flood", "match": "call_rate", "limit": 1_000_000, "window_s": 60},
                ]
            }
        },
        "trunk_groups": {"main": {"policy": "default"}},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Soak:
    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args = args
        self.folder = folder
        self.redis = RedisProcess(folder / "redis", None, "--appendonly", "yes")
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}/tg/main"
        self.report = Report(
            duration_s=args.duration,
            connections=args.connections,
            workers=args.workers,
            deadline_ms=args.deadline_ms,
            trunk_timeout_ms=args.trunk_timeout_ms,
        )
        self.latencies: list[float] = []
        self.service: subprocess.Popen[bytes] | None = None
        self.stopping = asyncio.Event()
        self.chores_stop = asyncio.Event()

    # --- the pieces ----------------------------------------------------------------
    def _spawn_service(self, config_path: Path) -> subprocess.Popen[bytes]:
        with (self.folder / "service.log").open("wb") as log:
            return subprocess.Popen(
                [
                    sys.executable, "-m", "service", "--config", str(config_path),
                    "--host", HOST, "--port", str(self.port),
                    "--workers", str(self.args.workers), "--log-level", "WARNING",
                ],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    async def _start_service(self, config_path: Path) -> None:
        self.service = self._spawn_service(config_path)
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 30
            while True:
                if self.service.poll() is not None:
                    log = (self.folder / "service.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"the service exited on start:\n{log}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://{HOST}:{self.port}/readyz") as response:
                        if response.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise RuntimeError("the service did not become ready within 30 s")
                await asyncio.sleep(0.1)

    def _stop_service(self) -> None:
        if self.service is not None and self.service.poll() is None:
            self.service.send_signal(signal.SIGTERM)
            try:
                self.service.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.service.kill()
                self.service.wait()

    def _judge(self, caller: str, status: int, body: bytes, took_s: float) -> None:
        report = self.report
        report.answered += 1
        self.latencies.append(took_s)
        if took_s * 1000 <= self.args.deadline_ms:
            report.within_deadline += 1
        if took_s * 1000 <= self.args.trunk_timeout_ms:
            report.within_trunk_timeout += 1
        if status >= 500:
            report.status_5xx += 1
            return
        if status != 200:
            report.other_status += 1
            return
        try:
            answer = orjson.loads(body)
            tag = answer[0]["operands"][1] if answer else None
        except (orjson.JSONDecodeError, LookupError, TypeError):
            answer, tag = None, None  # not an answer CarrierX could use: wrong
        if tag == ON_ERROR_TAG:
            report.on_error += 1
            return
        wrong = (
            answer is None
            or (caller in self._stable and tag != LIST_TAG)
            or (caller in self._unlisted and answer != [])
        )
        if wrong:
            report.wrong += 1
            if len(report.wrong_examples) < 10:
                report.wrong_examples.append(f"caller {caller} got {body.decode()}")

    _stable = frozenset(STABLE)
    _unlisted = frozenset(UNLISTED)

    async def _client(self, session: aiohttp.ClientSession) -> None:
        callers = [*STABLE, *UNLISTED, *CHURN[0], *CHURN[1]]
        timeout = aiohttp.ClientTimeout(total=5)
        while not self.stopping.is_set():
            caller = random.choice(callers)
            self.report.sent += 1
            started = time.perf_counter()
            try:
                async with session.post(
                    self.url,
                    data=_body(caller),
                    headers={"Content-Type": "application/json"},
                    timeout=timeout,
                ) as response:
                    body = await response.read()
                    self._judge(caller, response.status, body, time.perf_counter() - started)
            except (aiohttp.ClientError, TimeoutError):
                self.report.unanswered += 1

    async def _rest(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless the chores are told to stop first; True if told."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.chores_stop.wait()
        return self.chores_stop.is_set()

    async def _faults(self) -> None:
        # Never cancelled: each fault ends with Redis back, whatever happens meanwhile.
        length = self.args.fault_length
        pause = True
        while not await self._rest(self.args.fault_every):
            if pause:
                self.redis.pause()
                self.report.redis_pauses += 1
                try:
                    await asyncio.sleep(length)
                finally:
                    self.redis.resume()
            else:
                await asyncio.to_thread(self.redis.stop)
                self.report.redis_restarts += 1
                try:
                    await asyncio.sleep(length)
                finally:
                    await asyncio.to_thread(self.redis.start)
            pause = not pause

    async def _swaps(self, config_path: Path) -> None:
        config = load_config(config_path)
        redis = Redis.from_url(self.redis.url, socket_timeout=1, socket_connect_timeout=1)
        version = 0
        try:
            while not await self._rest(self.args.swap_every):
                version += 1
                _write_list(self.folder / "blocklist.csv", version)
                try:
                    await sync_list(redis, config, "blocklist")
                    self.report.swaps_ok += 1
                except Exception:  # Redis frozen or down: the old list stays, as designed
                    self.report.swaps_failed += 1
        finally:
            await redis.aclose()

    # --- the run -------------------------------------------------------------------
    async def run(self) -> Report:
        """The whole run, bounded: set-up, load, wind-down; everything started is stopped."""
        self.redis.start()
        try:
            async with asyncio.timeout(self.args.duration + START_AND_STOP_S):
                await self._run()
        finally:
            self._stop_service()
            if self.redis.process is not None:
                self.redis.resume()
            self.redis.stop()
        self._latency_summary()
        return self.report

    async def _run(self) -> None:
        _write_list(self.folder / "blocklist.csv", 0)
        config_path = _config(self.folder, self.redis.url, self.port, self.args.deadline_ms)
        redis = Redis.from_url(self.redis.url)
        try:
            await sync_list(redis, load_config(config_path), "blocklist")
        finally:
            await redis.aclose()
        await self._start_service(config_path)
        connector = aiohttp.TCPConnector(limit=self.args.connections)
        async with aiohttp.ClientSession(connector=connector) as session:
            clients = [
                asyncio.create_task(self._client(session)) for _ in range(self.args.connections)
            ]
            chores = [
                asyncio.create_task(self._faults()),
                asyncio.create_task(self._swaps(config_path)),
            ]
            await asyncio.sleep(self.args.duration)
            self.chores_stop.set()
            await asyncio.gather(*chores)  # the fault under way ends with Redis back
            self.stopping.set()
            await asyncio.gather(*clients)

    def _latency_summary(self) -> None:
        if not self.latencies:
            return
        ordered = sorted(self.latencies)
        report = self.report
        report.latency_p50_ms = 1000 * ordered[len(ordered) // 2]
        report.latency_p99_ms = 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        report.latency_max_ms = 1000 * ordered[-1]


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devtools.soak", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--connections", type=int, default=8, help="concurrent clients")
    parser.add_argument("--workers", type=int, default=1, help="service worker processes")
    parser.add_argument("--deadline-ms", type=int, default=100, help="handler.deadline_ms")
    parser.add_argument(
        "--trunk-timeout-ms", type=int, default=250, help="the trunk group's handler timeout"
    )
    parser.add_argument("--fault-every", type=float, default=10.0, help="seconds between faults")
    parser.add_argument("--fault-length", type=float, default=2.0, help="seconds each lasts")
    parser.add_argument("--swap-every", type=float, default=1.0, help="seconds between swaps")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= 3600:
        parser.error("--duration must be in (0, 3600] seconds")
    if args.connections < 1 or args.workers < 1:
        parser.error("--connections and --workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    with tempfile.TemporaryDirectory(prefix="callscreen-soak-") as folder:
        try:
            report = asyncio.run(Soak(args, Path(folder)).run())
        except TimeoutError:
            print(f"soak did not finish within {START_AND_STOP_S:.0f} s of --duration")
            return 2
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok}))
    else:
        print(report.text())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
