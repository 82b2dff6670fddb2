"""``python -m bench.coalesce``: a call's Redis read, three ways.

``--concurrency`` callers loop over ``ListStore.fetch_for_call`` (one call-rate rule
and one subscriber read: 4 commands) against a local ``redis-server`` for
``--seconds``, alternating rounds of ``direct`` (one redis-py pipeline per call),
``coalesced`` (redis-py pipelines joined per event-loop turn, core/coalesce.py, the path
Sentinel and TLS take) and ``wire`` (the service's own connection, core/wire.py).
Prints calls/s and this process's CPU time per call: the client-side cost.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from core.shards import Command, LeanRedis
from core.store import ListStore
from devtools.redis_server import RedisProcess

WINDOWS = [("p:flood", 60)]


MODES = ("direct", "coalesced", "wire")


async def _round(url: str, mode: str, concurrency: int, seconds: float) -> tuple[float, float]:
    client = LeanRedis.from_url(url) if mode == "wire" else Redis.from_url(url)
    store = ListStore(client)
    if mode == "direct":
        dispatcher = store.dispatcher

        async def direct(commands: Sequence[Command], timeout_s: float | None = None) -> list[Any]:
            return await dispatcher.run(commands, timeout_s=timeout_s)

        store.coalescer.run = direct  # type: ignore[method-assign]
    done = 0
    stop = time.monotonic() + seconds

    async def caller(i: int) -> None:
        nonlocal done
        number, subscriber = f"1516555{i:04d}", f"1951262{i:04d}"
        while time.monotonic() < stop:
            await store.fetch_for_call(
                number, WINDOWS, time.time(), subscribers=[("personal", 1, subscriber)]
            )
            done += 1

    cpu, wall = time.process_time(), time.monotonic()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    await client.aclose()
    return done / wall, cpu / done * 1e6


async def main(rounds: int, concurrency: int, seconds: float) -> None:
    server = RedisProcess(Path(tempfile.mkdtemp(prefix="bench-coalesce-"))).start()
    try:
        for n in range(rounds):
            for mode in MODES:
                rate, cpu_us = await _round(server.url, mode, concurrency, seconds)
                print(f"round {n} {mode:9} {rate:8.0f} calls/s {cpu_us:7.1f} us CPU a call")
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.concurrency, args.seconds))
