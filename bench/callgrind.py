"""``python -m bench.callgrind``: CPU instructions per call on each screening path.

    python -m bench.callgrind [--calls 2000] [--warmup 300] [--paths local,fraud,...]

Wall-clock rounds on a shared 2-core machine swing by tens of percent; instructions do
not. This runs the service (one process) and the bare-aiohttp baseline under
``valgrind --tool=callgrind`` against a private redis-server (not under valgrind), sends
each path's bodies one at a time on one keep-alive connection, and counts the server's
instructions per call between a ``callgrind_control --zero`` after the warm-up and a
``--dump`` after the measured calls (start-up and warm-up excluded). Paths:

- ``baseline``: bare aiohttp on the bench bodies (bench/baseline.py);
- ``local``: the bench policy, local lists only (no Redis on the call path);
- ``rate``: the bench policy with one call-rate rule after its local rules (a Redis
  round trip for every call the local lists do not reject);
- ``fraud``: bench/fraud.py's policy (two call rates, sequential dialing, neighbour
  spoofing): one Redis round trip a call that passes the lists;
- ``subscribers``: bench/workload.py's subscriber policy (entries and a call rate);
- ``entries``: the subscriber entries alone, nearly every call to a subscriber not
  called before, by this path or another (so a Redis read, as with a cold cache);
- ``entries-hot``: the same policy, its calls going round 200 subscribers (a busy
  DID's traffic): after the warm-up every call is answered from the entries cache;
- ``stir``: every call's PASSporT verified, its certificate cached (bench/stir.py).

One call at a time is the lone caller's cost: nothing is coalesced with other calls.
``--connections 32`` sends on 32 keep-alive connections at once instead, so that, as
under wrk, calls are in flight together: the Redis-backed paths share round trips,
and what a call leaves for the cyclic collector is counted too (as the service is
far slower under callgrind than its clients, all 32 are busy nearly all the time).
What the numbers say is in BENCHMARKS.md; the method in docs/design.md.
"""

from __future__ import annotations

import argparse
import http.client
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import redis

from bench import servers, stir
from bench.fraud import FRAUD_TRUNK_GROUP, fraud_config
from bench.workload import (
    ENTRIES_TRUNK_GROUP,
    RATE_TRUNK_GROUP,
    SUBSCRIBER_TRUNK_GROUP,
    TRUNK_GROUP,
    Sizes,
    SubscriberSizes,
    bench_config,
    generate,
    subscriber_config,
    write_config,
    write_files,
    write_subscribers,
)
from core import keys
from devtools.redis_server import RedisProcess, free_port
from devtools.stir_pki import make_pki

#: The longest ``handler.deadline_ms`` the config accepts (core/config.py).
MAX_DEADLINE_MS = 10_000
#: The longest ``cache.subscriber_max_age_ms`` it accepts.
MAX_AGE_MS = 3_600_000
PATHS = ("baseline", "local", "rate", "fraud", "subscribers", "entries", "entries-hot", "stir")
#: Subscribers the ``entries-hot`` path's calls go round.
HOT_SUBSCRIBERS = 200
#: The trunk group each path is sent to.
GROUPS = {
    "baseline": TRUNK_GROUP,
    "local": TRUNK_GROUP,
    "rate": RATE_TRUNK_GROUP,
    "fraud": FRAUD_TRUNK_GROUP,
    "subscribers": SUBSCRIBER_TRUNK_GROUP,
    "entries": ENTRIES_TRUNK_GROUP,
    "entries-hot": ENTRIES_TRUNK_GROUP,
    "stir": "stir",
}
#: Start-up under valgrind takes a minute or two (imports and the lists, ~50x slower).
START_TIMEOUT_S = 900.0
_TOTALS = re.compile(rb"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.callgrind", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="measured calls per path")
    parser.add_argument("--warmup", type=int, default=300, help="calls before counting")
    parser.add_argument(
        "--connections",
        type=int,
        default=1,
        help="connections sending at once (1: one call at a time)",
    )
    parser.add_argument("--numbers", type=int, default=100_000, help="block-list size")
    parser.add_argument("--subscribers", type=int, default=20_000, help="subscribers listed")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated: {PATHS}")
    parser.add_argument("--folder", type=Path, help="work folder (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    args.paths = [path for path in args.paths.split(",") if path]
    unknown = set(args.paths) - set(PATHS)
    if unknown:
        parser.error(f"unknown paths: {', '.join(sorted(unknown))}")
    return args


class Callgrind:
    """A server process under callgrind whose counters are zeroed and dumped on demand."""

    def __init__(self, server: servers.Server, folder: Path) -> None:
        self.server = server
        self.folder = folder

    def _pid(self) -> int:
        assert self.server.process is not None
        return self.server.process.pid

    def _control(self, *options: str) -> None:
        subprocess.run(
            ["callgrind_control", *options, str(self._pid())],
            check=True,
            capture_output=True,
            timeout=300,
        )

    def count(self, send: Any) -> int:
        """Instructions the server ran while ``send()`` ran (zeroed before, dumped after)."""
        self._control("--zero")
        send()
        before = set(self.folder.glob("callgrind.out.*"))
        self._control("--dump")
        dumps = sorted(set(self.folder.glob("callgrind.out.*")) - before)
        if not dumps:
            raise RuntimeError(f"callgrind_control --dump wrote no file in {self.folder}")
        found = _TOTALS.search(dumps[-1].read_bytes())
        if found is None:
            raise RuntimeError(f"no totals in {dumps[-1]}")
        return int(found.group(1))


def under_callgrind(command: list[str], folder: Path) -> list[str]:
    return [
        "valgrind", "--tool=callgrind", "--quiet",
        f"--callgrind-out-file={folder}/callgrind.out.%p",
        *command,
    ]  # fmt: skip


def send_all(port: int, path: str, bodies: Sequence[bytes], connections: int = 1) -> None:
    """POST each body, on ``connections`` keep-alive connections at once (the bodies
    dealt out between them); every answer must be a 200."""
    if connections > 1:
        with ThreadPoolExecutor(connections) as pool:
            parts = [bodies[i::connections] for i in range(connections)]
            for sent in [pool.submit(send_all, port, path, part) for part in parts]:
                sent.result()
        return
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        for body in bodies:
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = response.read()
            if response.status != 200:
                raise RuntimeError(f"{path}: HTTP {response.status}: {answer[:200]!r}")
    finally:
        conn.close()


def per_call(
    measured: Callgrind,
    port: int,
    path: str,
    bodies: Sequence[bytes],
    warmup: int,
    calls: int,
    connections: int = 1,
) -> float:
    """Instructions per call of ``calls`` bodies, after ``warmup`` others."""
    send_all(port, path, [bodies[i % len(bodies)] for i in range(warmup)], connections)
    chosen = [bodies[(warmup + i) % len(bodies)] for i in range(calls)]
    return measured.count(lambda: send_all(port, path, chosen, connections)) / calls


def called_user(body: bytes) -> str:
    """The user part of a bench body's ``To`` (bench/workload.py writes it)."""
    return str(orjson.loads(body)["To"][0]["user"])


def uncalled(bodies: Sequence[bytes], others: Sequence[bytes]) -> list[bytes]:
    """``bodies`` whose called subscriber no body of ``others`` calls: the ``entries``
    path's calls find the entries cache cold, whichever path the server served before."""
    called = {called_user(body) for body in others}
    return [body for body in bodies if called_user(body) not in called]


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    step = _step
    done = step(f"workload: {args.numbers:,} numbers, {args.subscribers:,} subscribers")
    workload = generate(Sizes(numbers=args.numbers, bodies=args.calls + args.warmup))
    files = write_files(workload, work / "data")
    per_path = args.calls + args.warmup
    subscriber_work = write_subscribers(
        work / "personal.csv",
        SubscriberSizes(
            subscribers=args.subscribers,
            entries=10,
            bodies=3 * per_path,
            called=args.subscribers,
        ),
    )
    subscriber_bodies = subscriber_work.bodies[:per_path]
    cold_bodies = uncalled(subscriber_work.bodies[per_path:], subscriber_bodies)
    pki = make_pki()
    anchors = pki.write(work / "pki")["trust_anchors"]
    signed, _ = stir.signed_bodies(workload, len(workload.bodies), pki.sp_key)
    done()
    redis_server = RedisProcess(work / "redis").start()
    results: dict[str, Any] = {
        "calls": args.calls, "warmup": args.warmup, "connections": args.connections, "paths": {}
    }  # fmt: skip
    try:
        port = free_port()
        config = bench_config(files, redis_server.url, port, 1)
        config = subscriber_config(fraud_config(config), subscriber_work.path)
        config = stir.stir_config(config, anchors)
        # Under valgrind a call runs some fifty times slower: the longest deadline, so
        # that calls queued behind others are not answered by on_error instead.
        config["handler"] = {**config.get("handler", {}), "deadline_ms": MAX_DEADLINE_MS}
        # And the longest max age: the default 5 s would age the hot path's entries out
        # within a few hundred calls, where a busy DID keeps its entry (renewed ahead).
        config["cache"] = {**config.get("cache", {}), "subscriber_max_age_ms": MAX_AGE_MS}
        config_path = write_config(work / "callgrind.yaml", config)
        done = step("loader: full sync of every list")
        subprocess.run(
            [sys.executable, "-m", "loader", "--config", str(config_path), "sync"],
            check=True,
            capture_output=True,
            timeout=600,
        )
        client = redis.Redis(port=redis_server.port)
        client.set(keys.stir_cert(stir.X5U), pki.chain_pem, ex=86_400)
        client.close()
        done()
        bodies = {
            "baseline": workload.bodies,
            "local": workload.bodies,
            "rate": workload.bodies,
            "fraud": workload.bodies,
            "subscribers": subscriber_bodies,
            "entries": cold_bodies,
            "entries-hot": [
                subscriber_bodies[i % HOT_SUBSCRIBERS] for i in range(len(subscriber_bodies))
            ],
            "stir": signed,
        }
        wanted = [path for path in PATHS if path in args.paths]
        for kind in ("baseline", "service"):
            paths = [p for p in wanted if (p == "baseline") == (kind == "baseline")]
            if not paths:
                continue
            folder = work / f"cg-{kind}"
            folder.mkdir(exist_ok=True)
            server_port = free_port()
            if kind == "baseline":
                command = [sys.executable, "-m", "bench.baseline", "--port", str(server_port)]
                ready = "/healthz"
            else:
                command = [sys.executable, "-m", "service", "--config", str(config_path)]
                command += ["--port", str(server_port), "--workers", "1"]
                ready = "/readyz"
            server = servers.Server(
                kind,
                command=under_callgrind(command, folder),
                port=server_port,
                log=folder / "server.log",
                ready_path=ready,
            )
            done = step(f"{kind}: starting under callgrind")
            server.start(timeout_s=START_TIMEOUT_S)
            done()
            try:
                measured = Callgrind(server, folder)
                for path in paths:
                    done = step(f"{path}: {args.warmup} + {args.calls:,} calls")
                    url_path = f"/tg/{GROUPS[path]}"
                    figure = per_call(
                        measured,
                        server_port,
                        url_path,
                        bodies[path],
                        args.warmup,
                        args.calls,
                        args.connections,
                    )
                    results["paths"][path] = figure
                    done()
                    print(f"   {path:<12} {figure / 1000:8.1f} k instructions per call", flush=True)
            finally:
                server.stop()
    finally:
        redis_server.stop()
    return results


def _step(what: str) -> Any:
    print(f"-- {what}", flush=True)
    started = time.monotonic()

    def done() -> None:
        print(f"   done in {time.monotonic() - started:.1f} s", flush=True)

    return done


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    work = args.folder or Path(tempfile.mkdtemp(prefix="callscreen-callgrind-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = run(args, work)
    finally:
        if args.folder is None:
            shutil.rmtree(work, ignore_errors=True)
    base = results["paths"].get("baseline")
    how = "one call at a time" if args.connections == 1 else f"{args.connections} connections"
    print(f"\nCPU instructions per call (callgrind, {how})")
    for path, figure in results["paths"].items():
        ratio = f"  {figure / base:5.2f}x baseline" if base else ""
        print(f"  {path:<12} {figure / 1000:8.1f} k{ratio}")
    if args.json is not None:
        args.json.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
