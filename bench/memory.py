"""``python -m bench.memory``: worker memory with numbers lists shared or private, and swaps.

    python -m bench.memory [--numbers 10000000] [--workers 4] [--folder DIR] [--keep]
                           [--json FILE] [--modes private,shared]

Steps: generate two block lists of ``--numbers`` numbers that differ by a tenth (so a
full sync between them is a real swap, within the loader's removal guard); start a
private redis-server and load the first with the real loader. Then, for each mode
(``cache.share_lists`` false, then true) and worker count (1, then ``--workers``):
start ``python -m service``, wait until every worker logged the list's base in use,
read each process's memory, run a full sync of the other list, wait until every worker
uses the new base, read the memory again, check answers, stop the service.

Memory per process, from ``/proc/PID/smaps_rollup``: RSS (counts each mapped page of the
shared file in full, in every worker), PSS (each page divided by the processes mapping
it) and USS (private pages only). The host's memory for the service is the sum of PSS
over its processes, with the shared files counted once at their size instead of their
mapped share (plus files no worker maps any more). "Per extra worker" is how much that
grows from 1 worker to N, divided by N - 1, with an idle service (an empty list)
measured the same way for the interpreter's own share.

Swap latency, two figures. Per worker, the time from the sync's commit
(``meta.synced_at``, stamped just before its MULTI/EXEC) to the worker's "in use" log
line (JSON, millisecond stamps). And the longest event-loop stall while a new base is
put in use, measured in this process with the service's own :class:`ListCache` and a
probe task that sleeps 1 ms at a time: as the worker that builds the shared file, as
one that maps it, and with a private copy, for a first load and for a swap.

Everything started is stopped at the end, and the work folder removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis

from bench import machine, storage
from bench.servers import Server
from bench.servers import service as service_server
from bench.workload import random_numbers, write_config, write_numbers
from core import keys
from core.config import CacheSettings
from core.connect import connect
from core.store import ListStore
from devtools.redis_server import RedisProcess, free_port

LIST = "block"
MIB = 2**20
IN_USE = re.compile(r"list '" + LIST + r"': gen (\d+) in use, (\d+) numbers \((.*), ([\d.]+) s\)")
#: Pause between a worker's "in use" line and reading memory: the line is written just
#: before the old base is let go and freed memory handed back (a few ms).
SETTLE_S = 1.0
STARTED = re.compile(r"worker \d+ started \(pid (\d+)\)")


# --- reading memory -----------------------------------------------------------------


def smaps_rollup(pid: int) -> dict[str, int]:
    """``/proc/PID/smaps_rollup`` in bytes (Rss, Pss, Private_Clean, ...)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[key] = int(parts[0]) * 1024
    return fields


def _mapping_path(header: str) -> str | None:
    parts = header.split(maxsplit=5)
    return parts[5] if len(parts) == 6 else None


def mapped_files(pid: int, folder: Path) -> set[str]:
    """Names of the files in ``folder`` that process ``pid`` maps ("x (deleted)" if unlinked)."""
    prefix = str(folder) + os.sep
    names = set()
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            path = _mapping_path(line)
            if path is not None and path.startswith(prefix):
                names.add(path[len(prefix) :])
    return names


def folder_pss(pid: int, folder: Path) -> dict[str, int]:
    """PSS of each file of ``folder`` that ``pid`` maps, by name, from ``/proc/PID/smaps``."""
    prefix = str(folder) + os.sep
    found: dict[str, int] = {}
    current: str | None = None
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                path = _mapping_path(line)
                current = path[len(prefix) :] if path and path.startswith(prefix) else None
            elif current is not None and line.startswith("Pss:"):
                found[current] = found.get(current, 0) + int(line.split()[1]) * 1024
    return found


@dataclass
class ProcessMemory:
    pid: int
    role: str
    rss: int
    pss: int
    uss: int
    #: PSS of the shared files this process maps.
    shared_file_pss: int
    #: How the worker obtained the base in use ("shared file built", "private copy", ...).
    how: str = ""


@dataclass
class Snapshot:
    processes: list[ProcessMemory]
    #: Bytes of the shared folder's files (each counted once).
    folder_bytes: int
    #: The service's memory on the host: see the module docstring.
    host_bytes: int

    def workers(self) -> list[ProcessMemory]:
        return [p for p in self.processes if p.role == "worker"]


def snapshot(pids: dict[int, str], folder: Path | None, how: dict[int, str]) -> Snapshot:
    processes = []
    linked: dict[str, int] = {}
    if folder is not None and folder.exists():
        linked = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    host = sum(linked.values())
    for pid, role in pids.items():
        rollup = smaps_rollup(pid)
        files = folder_pss(pid, folder) if folder is not None else {}
        # Linked files are counted once above at their size; an unlinked one still mapped
        # is counted through its mappers' PSS.
        counted_apart = sum(v for k, v in files.items() if k in linked)
        host += rollup["Pss"] - counted_apart
        processes.append(
            ProcessMemory(
                pid=pid,
                role=role,
                rss=rollup["Rss"],
                pss=rollup["Pss"],
                uss=rollup["Private_Clean"] + rollup["Private_Dirty"],
                shared_file_pss=sum(files.values()),
                how=how.get(pid, ""),
            )
        )
    return Snapshot(processes, sum(linked.values()), host)


# --- the service --------------------------------------------------------------------


def _log_records(log: Path) -> list[dict[str, Any]]:
    records = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            record = orjson.loads(line)
            if isinstance(record, dict) and "message" in record:
                records.append(record)
    return records


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _wait(what: str, check: Callable[[], bool], timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Run:
    """One service run: memory after the first load and after a swap."""

    mode: str
    workers: int
    loaded: Snapshot
    swapped: Snapshot | None = None
    #: Seconds from the swap's commit to each worker's "in use" line, by pid.
    swap_latency_s: dict[int, float] = field(default_factory=dict)
    answers_ok: bool = True


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.redis_server = RedisProcess(work / "redis")
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])
        )
        self.configs: dict[str, Path] = {}
        self.listed: dict[str, int] = {}
        self.unlisted = 0
        self.current = ""
        self._share_parent: Path | None = None

    def prepare(self) -> None:
        rng = np.random.default_rng(11)
        count = self.args.numbers
        pool = random_numbers(rng, count + count // 10 + 1000)
        first = pool[:count].copy()
        second = np.concatenate([pool[: count - count // 10], pool[count : count + count // 10]])
        # Numbers only one list holds, and one on neither, to check which list answers.
        self.listed = {"a": int(pool[count - 1]), "b": int(pool[count])}
        self.unlisted = int(pool[-1])
        data = self.work / "data"
        data.mkdir(parents=True, exist_ok=True)
        self.redis_server.start()
        for name, numbers in (("a", first), ("b", second)):
            rng.shuffle(numbers)
            csv = data / f"block-{name}.csv"
            write_numbers(csv, numbers)
            self.configs[name] = write_config(
                self.work / f"loader-{name}.yaml",
                {
                    "redis": {"url": self.redis_server.url},
                    "lists": {LIST: {"kind": "numbers", "source": str(csv), "column": "number"}},
                },
            )
        self.sync("a")

    def sync(self, name: str) -> float:
        """Full sync of list ``name`` (``a`` or ``b``); the commit's epoch time."""
        log = self.work / "loader.log"
        storage.loader_sync(self.configs[name], LIST, self.env, log)
        self.current = name
        return float(self._meta("synced_at"))

    def _meta(self, field: str) -> str:
        client = redis.Redis(port=self.redis_server.port, decode_responses=True)
        try:
            return str(client.hget(keys.meta(LIST), field) or 0)
        finally:
            client.close()

    def service_config(self, share: bool, empty: bool, port: int) -> Path:
        lists: dict[str, Any] = {LIST: {"kind": "numbers"}}
        if empty:
            lists = {"idle": {"kind": "numbers"}}
        config = {
            "redis": {"url": self.redis_server.url},
            "server": {"host": "127.0.0.1", "port": port, "admin_port": None, "log_format": "json"},
            "cache": {"share_lists": share, "share_dir": str(self.share_parent)},
            "lists": lists,
            "policies": {
                "default": {
                    "rules": [
                        {"name": "block", "match": "caller_in_list", "list": next(iter(lists))},
                    ]
                }
            },
        }
        return write_config(self.work / f"service-{share}-{empty}.yaml", config)

    @property
    def share_parent(self) -> Path:
        """A folder of the bench's own, so the service's is the only one in it."""
        if self._share_parent is None:
            self._share_parent = Path(
                tempfile.mkdtemp(prefix="callscreen-bench-", dir=self.args.share_dir)
            )
        return self._share_parent

    def close(self) -> None:
        self.redis_server.stop()
        if self._share_parent is not None:
            shutil.rmtree(self._share_parent, ignore_errors=True)

    def run(self, share: bool, workers: int, *, empty: bool = False) -> Run:
        mode = ("shared" if share else "private") + (" (empty list)" if empty else "")
        port = free_port()
        log = self.work / f"service-{mode.replace(' ', '-')}-{workers}.log"
        server = service_server(
            self.service_config(share, empty, port), port, workers, log, self.env
        )
        print(f"-- {mode}, {workers} worker(s) ...", flush=True)
        with server:
            assert server.process is not None
            pids = self._pids(server, log, workers)
            folder = self._folder() if share else None
            if empty:
                time.sleep(SETTLE_S)
                loaded = snapshot(pids, folder, {})
                return Run(mode, workers, loaded)
            gen = self._gen()
            how = self._wait_in_use(log, pids, gen, since=0.0)
            time.sleep(SETTLE_S)
            loaded = snapshot(pids, folder, {p: h for p, (h, _) in how.items()})
            self._print(loaded, "loaded")
            other = "b" if self.current == "a" else "a"
            committed = self.sync(other)
            how = self._wait_in_use(log, pids, gen + 1, since=committed - 1)
            time.sleep(SETTLE_S)
            swapped = snapshot(pids, folder, {p: h for p, (h, _) in how.items()})
            self._print(swapped, "after the swap")
            latency = {pid: at - committed for pid, (_, at) in how.items()}
            print(
                "   commit -> in use: " + ", ".join(f"{v * 1000:.0f} ms" for v in latency.values()),
                flush=True,
            )
            ok = self._answers(server.url)
        return Run(mode, workers, loaded, swapped, latency, ok)

    def _pids(self, server: Server, log: Path, workers: int) -> dict[int, str]:
        assert server.process is not None
        if workers == 1:
            return {server.process.pid: "worker"}

        def started() -> list[int]:
            return [
                int(m.group(1)) for r in _log_records(log) if (m := STARTED.search(r["message"]))
            ]

        def listening() -> bool:
            return sum(" listening on http" in r["message"] for r in _log_records(log)) >= workers

        _wait("the workers to listen", listening)
        return {server.process.pid: "supervisor", **dict.fromkeys(started(), "worker")}

    def _folder(self) -> Path | None:
        found = list(self.share_parent.glob("callscreen-lists-*"))
        return found[0] if len(found) == 1 else None

    def _gen(self) -> int:
        return int(self._meta("gen"))

    def _wait_in_use(
        self, log: Path, pids: dict[int, str], gen: int, since: float
    ) -> dict[int, tuple[str, float]]:
        """Per worker pid: how it obtained ``gen`` and when its "in use" line was written."""
        workers = [p for p, role in pids.items() if role == "worker"]
        found: dict[int, tuple[str, float]] = {}

        def all_in_use() -> bool:
            for record in _log_records(log):
                match = IN_USE.search(record["message"])
                if match and int(match.group(1)) == gen and record["pid"] in workers:
                    at = _epoch(record["time"])
                    if at >= since:
                        found[record["pid"]] = (match.group(3).split(":")[0], at)
            return len(found) == len(workers)

        _wait(f"every worker to use gen {gen}", all_in_use)
        return found

    def _answers(self, url: str) -> bool:
        ok = True
        old = "a" if self.current == "b" else "b"
        expected = {self.listed[self.current]: True, self.listed[old]: False, self.unlisted: False}
        for number, rejected in expected.items():
            for _ in range(8):
                body = orjson.dumps({"From": [{"user": str(number)}]})
                request = urllib.request.Request(
                    url + "/",
                    data=body,
                    headers={"Content-Type": "application/json", "Connection": "close"},
                )
                with urllib.request.urlopen(request, timeout=5) as response:
                    answer = orjson.loads(response.read())
                ok = ok and (answer != []) == rejected
        if not ok:
            print("!! wrong answers after the swap", flush=True)
        return ok

    @staticmethod
    def _print(shot: Snapshot, when: str) -> None:
        print(
            f"   {when}: host {shot.host_bytes / MIB:.0f} MiB "
            f"(shared files {shot.folder_bytes / MIB:.0f} MiB)",
            flush=True,
        )
        for p in shot.processes:
            print(
                f"     {p.role:10} pid {p.pid}: RSS {p.rss / MIB:6.1f}  PSS {p.pss / MIB:6.1f}  "
                f"USS {p.uss / MIB:6.1f} MiB  {p.how}",
                flush=True,
            )


# --- event-loop stalls --------------------------------------------------------------


async def _stall_during(work: Awaitable[None]) -> tuple[float, float]:
    """(longest event-loop stall, duration) while ``work`` runs, in seconds."""
    done = asyncio.Event()
    worst = 0.0

    async def probe() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last - 0.001)
            last = now

    task = asyncio.create_task(probe())
    started = time.perf_counter()
    await asyncio.sleep(0.01)  # the probe is running
    try:
        await work
    finally:
        elapsed = time.perf_counter() - started
        done.set()
        await task
    return worst, elapsed


async def measure_stalls(bench: Bench) -> dict[str, dict[str, float]]:
    """Each role loads the list, then a sync swaps it; the longest stall of each."""
    from service.screening.cache import ListCache
    from service.screening.shared_lists import (
        SharedBases,
        configure_allocator,
        make_folder,
        remove_folder,
    )

    configure_allocator()  # as each service process does at start
    client = connect(bench.redis_server.url)
    folder, owner = make_folder(bench.share_parent)
    store = ListStore(client)
    settings = CacheSettings()
    roles = {
        "shared, builds the file": SharedBases(folder),
        "shared, maps the file": SharedBases(folder),
        "private copy": None,
    }
    caches = {
        role: ListCache(store, {LIST: "numbers"}, settings, sourced=[LIST], shared=shared)
        for role, shared in roles.items()
    }
    results: dict[str, dict[str, float]] = {}
    try:
        for step in ("first load", "swap"):
            if step == "swap":
                other = "b" if bench.current == "a" else "a"
                await asyncio.to_thread(bench.sync, other)
            for role, cache in caches.items():
                stall, took = await _stall_during(cache.load_all())
                assert LIST in cache.lists, f"{role}: not loaded"
                results[f"{step}: {role}"] = {"stall_ms": stall * 1000, "seconds": took}
                print(
                    f"   {step}, {role}: longest stall {stall * 1000:.1f} ms, load {took:.2f} s",
                    flush=True,
                )
    finally:
        for cache in caches.values():
            await cache.close()
        for shared in roles.values():
            if shared is not None:
                shared.close()
        remove_folder(folder, owner)
        await client.aclose()
    return results


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


# --- main ---------------------------------------------------------------------------


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--numbers", type=int, default=10_000_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--modes", default="private,shared", help="private, shared or both")
    parser.add_argument(
        "--share-dir",
        default="/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir(),
        help="where the runs' cache.share_dir folder is made",
    )
    parser.add_argument("--skip-stalls", action="store_true")
    parser.add_argument("--folder", type=Path, help="work folder (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser.parse_args(argv)


def _workers_bytes(shot: Snapshot) -> int:
    """The host's memory for the service without its supervisor (a fixed cost of N > 1)."""
    return shot.host_bytes - sum(p.pss for p in shot.processes if p.role == "supervisor")


def _summary(runs: list[Run]) -> dict[str, float]:
    """MiB per worker beyond the first, and the part of it the list accounts for."""
    by = {(r.mode, r.workers): r for r in runs}
    workers = max(r.workers for r in runs)
    out: dict[str, float] = {}
    if workers < 2:
        return out
    idle_one, idle_many = (
        by.get(("private (empty list)", 1)),
        by.get(("private (empty list)", workers)),
    )
    idle = None
    if idle_one is not None and idle_many is not None:
        idle = (_workers_bytes(idle_many.loaded) - _workers_bytes(idle_one.loaded)) / (workers - 1)
        out["idle service: MiB per extra worker"] = idle / MIB
    for mode in ("private", "shared"):
        one, many = by.get((mode, 1)), by.get((mode, workers))
        if one is None or many is None:
            continue
        for when in ("loaded", "swapped"):
            a, b = getattr(one, when), getattr(many, when)
            if a is None or b is None:
                continue
            extra = (_workers_bytes(b) - _workers_bytes(a)) / (workers - 1)
            out[f"{mode}, {when}: MiB per extra worker"] = extra / MIB
            if idle is not None:
                out[f"{mode}, {when}: list MiB per extra worker"] = (extra - idle) / MIB
        if many.swap_latency_s:
            out[f"{mode}: commit to last worker in use, ms"] = (
                max(many.swap_latency_s.values()) * 1000
            )
    return out


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    work = args.folder or Path(tempfile.mkdtemp(prefix="callscreen-bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, work)
    results: dict[str, Any] = {
        "machine": machine.describe(),
        "args": vars(args) | {"folder": str(work), "json": str(args.json)},
        "started": time.strftime("%Y-%m-%d %H:%M"),
    }
    runs: list[Run] = []
    try:
        print(f"-- {args.numbers:,} numbers: generating, loading ...", flush=True)
        bench.prepare()
        for workers in sorted({1, args.workers}):
            runs.append(bench.run(share=False, workers=workers, empty=True))
            bench._print(runs[-1].loaded, "idle")
        for mode in args.modes.split(","):
            for workers in sorted({1, args.workers}):
                runs.append(bench.run(share=mode == "shared", workers=workers))
        if not args.skip_stalls:
            print("-- event-loop stalls, in this process", flush=True)
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                results["stalls"] = runner.run(measure_stalls(bench))
    finally:
        bench.close()
        if not args.keep and args.folder is None:
            shutil.rmtree(work, ignore_errors=True)
    results["runs"] = [asdict(r) for r in runs]
    results["summary"] = _summary(runs)
    for key, value in results["summary"].items():
        print(f"   {key}: {value:.1f}")
    if args.json:
        args.json.write_bytes(
            orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
        )
    return 0 if all(r.answers_ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
