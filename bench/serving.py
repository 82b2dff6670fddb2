"""``python -m bench.serving``: our supervisor against gunicorn's aiohttp worker.

The same app (``service.app.create_app``, the seed block list) served with 2 workers
two ways:

- ``callscreen``: ``python -m service --workers 2`` (service/procs/workers.py and the drain
  of service/edge/connections.py);
- ``gunicorn``: ``gunicorn bench.gunicorn_app:app --worker-class
  aiohttp.GunicornUVLoopWebWorker --workers 2`` (gunicorn's arbiter and aiohttp's own
  graceful stop).

Three measures, each run for both in alternating rounds:

1. **throughput**: wrk, 32 connections, rotating request bodies; requests/s per round,
   and the ratio gunicorn / callscreen of each pair of rounds (median and spread);
2. **graceful stop under keep-alive load**: 128 aiohttp clients send calls back to back
   on keep-alive connections, then SIGTERM goes to the master; counts calls answered,
   calls lost (sent on an open connection and then reset, disconnected or timed out)
   and the seconds until the master exited;
3. **worker restart**: under keep-alive load (32 connections) the worker holding the
   most connections is SIGKILLed; counts failed calls (the calls in flight on it are
   lost either way) and the seconds until a new worker process runs; and how the
   connections are spread over the workers (sockets each holds) before the kill.

The figures go to BENCHMARKS.md ("Serving: supervisor or gunicorn").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from bench.load import run_wrk, write_wrk_script, wrk_binary
from bench.servers import Server
from devtools.redis_server import RedisProcess, free_port

BLOCKED = {"From": [{"user": "15162065613", "name": "Robo Caller"}], "Call-ID": ["b"]}
ALLOWED = {"From": [{"user": "15162065699", "name": "Jane Doe"}], "Call-ID": ["a"]}


def _config(folder: Path, redis_url: str) -> Path:
    (folder / "blocklist.csv").write_text("number\n5162065613\n")
    config = {
        "redis": {"url": redis_url},
        "server": {"host": "127.0.0.1", "admin_port": None, "log_format": "json"},
        "lists": {"blocklist": {"kind": "numbers", "source": "blocklist.csv", "column": 0}},
        "policies": {
            "default": {
                "rules": [{"name": "blocklist", "match": "caller_in_list", "list": "blocklist"}]
            }
        },
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _servers(folder: Path, config: Path) -> dict[str, Callable[[int], Server]]:
    env = {**os.environ, "CALLSCREEN_CONFIG": str(config), "PYTHONPATH": os.getcwd()}

    def ours(port: int) -> Server:
        command = [sys.executable, "-m", "service", "--config", str(config),
                   "--port", str(port), "--workers", "2", "--log-level", "WARNING"]  # fmt: skip
        return Server("callscreen", command=command, port=port,
                      log=folder / "callscreen.log", ready_path="/readyz", env=env)  # fmt: skip

    def gunicorn(port: int) -> Server:
        command = [sys.executable, "-m", "gunicorn", "bench.gunicorn_app:app",
                   "--worker-class", "aiohttp.GunicornUVLoopWebWorker", "--workers", "2",
                   "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "10",
                   "--log-level", "warning"]  # fmt: skip
        return Server("gunicorn", command=command, port=port,
                      log=folder / "gunicorn.log", ready_path="/readyz", env=env)  # fmt: skip

    return {"callscreen": ours, "gunicorn": gunicorn}


def _workers(master: int) -> list[int]:
    done = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True, check=False)
    return [int(pid) for pid in done.stdout.split()]


def _sockets(pid: int) -> int:
    """Open sockets of a process (its connections, give or take a listener and Redis)."""
    count = 0
    for link in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            count += link.readlink().as_posix().startswith("socket:")
    return count


async def _keepalive_load(
    url: str, stop: asyncio.Event, counts: dict[str, int], connections: int = 128
) -> None:
    """Calls back to back on keep-alive connections until ``stop`` or the port closes."""
    bodies = [orjson.dumps(BLOCKED), orjson.dumps(ALLOWED)]
    timeout = aiohttp.ClientTimeout(total=5.0)
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client(index: int) -> None:
            while not stop.is_set():
                try:
                    async with session.post(f"{url}/", data=bodies[index % 2]) as response:
                        await response.read()
                    counts["answered" if response.status == 200 else "failed"] += 1
                except aiohttp.ClientConnectorError:
                    counts["refused"] += 1
                    await asyncio.sleep(0.05)
                except (aiohttp.ClientError, TimeoutError):
                    counts["lost"] += 1

        await asyncio.gather(*(client(i) for i in range(connections)))


async def _graceful_stop(server: Server) -> dict[str, Any]:
    assert server.process is not None
    counts = {"answered": 0, "lost": 0, "refused": 0, "failed": 0}
    stop = asyncio.Event()
    load = asyncio.create_task(_keepalive_load(server.url, stop, counts))
    await asyncio.sleep(3.0)
    before = counts["answered"]
    started = time.monotonic()
    os.kill(server.process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        await asyncio.to_thread(server.process.wait, 30)
    exited_s = time.monotonic() - started
    await asyncio.sleep(0.5)
    stop.set()
    await load
    return {"answered_during_stop": counts["answered"] - before, "lost": counts["lost"],
            "failed": counts["failed"], "exit_s": round(exited_s, 2)}  # fmt: skip


async def _restart(server: Server) -> dict[str, Any]:
    assert server.process is not None
    counts = {"answered": 0, "lost": 0, "refused": 0, "failed": 0}
    stop = asyncio.Event()
    load = asyncio.create_task(_keepalive_load(server.url, stop, counts, connections=32))
    await asyncio.sleep(2.0)
    # The busiest worker: with one shared listening socket (gunicorn) a worker may hold
    # every connection and the other none, and killing an idle one proves nothing.
    victim = max(_workers(server.process.pid), key=_sockets)
    before = set(_workers(server.process.pid))
    spread = sorted((_sockets(pid) for pid in before), reverse=True)
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    replaced_s = None
    while time.monotonic() - killed < 30:
        now = set(_workers(server.process.pid))
        if len(now) >= 2 and now - before:
            replaced_s = time.monotonic() - killed
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(3.0)
    stop.set()
    await load
    return {"lost": counts["lost"] + counts["refused"], "failed": counts["failed"],
            "answered": counts["answered"], "sockets_per_worker_before": spread,
            "replaced_s": None if replaced_s is None else round(replaced_s, 2)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args(argv)
    if wrk_binary() is None:
        print("wrk is needed (apt-get install wrk)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        folder = Path(tmp)
        server = RedisProcess(folder / "redis").start()
        try:
            config = _config(folder, server.url)
            subprocess.run([sys.executable, "-m", "loader", "--config", str(config),
                            "--progress", "off", "sync"], check=True)  # fmt: skip
            bodies = folder / "bodies.txt"
            bodies.write_bytes(orjson.dumps(BLOCKED) + b"\n" + orjson.dumps(ALLOWED) + b"\n")
            script = write_wrk_script(folder, bodies, "/")
            makers = _servers(folder, config)
            rps: dict[str, list[float]] = {name: [] for name in makers}
            for _ in range(args.rounds):
                for name, make in makers.items():
                    with make(free_port()) as running:
                        result = run_wrk(running.url, script, args.seconds, 32, 2)
                        rps[name].append(result.rps)
            ratios = [g / c for g, c in zip(rps["gunicorn"], rps["callscreen"], strict=True)]
            report: dict[str, Any] = {
                "rps": {k: [round(v) for v in vs] for k, vs in rps.items()},
                "ratio_gunicorn_to_callscreen": {
                    "median": round(statistics.median(ratios), 3),
                    "min": round(min(ratios), 3),
                    "max": round(max(ratios), 3),
                },
            }
            for label, measure in (("graceful_stop", _graceful_stop), ("restart", _restart)):
                for name, make in makers.items():
                    running = make(free_port()).start()
                    try:
                        report.setdefault(label, {})[name] = asyncio.run(measure(running))
                    finally:
                        running.stop()
        finally:
            server.stop()
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
