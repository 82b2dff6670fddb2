"""Numbers lists shared by the workers of a host through one mapped file (service/screening/shared_lists.py).

In-process tests run list caches against the session's real Redis, two caches standing
for two workers; the others run ``python -m service`` with real workers. The folder is
put under the test's own ``tmp_path`` (``cache.share_dir``), never the host's /dev/shm.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import resource
import signal
import stat
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from bench.memory import mapped_files
from core.config import CacheSettings
from core.store import ListStore
from devtools.redis_server import RedisProcess
from service.screening import shared_lists
from service.screening.cache import ListCache
from service.screening.lists import NumberList
from service.screening.shared_lists import (
    HEADER_BYTES,
    SUFFIX,
    SharedBases,
    UnsafeFolder,
    make_folder,
    map_file,
    remove_folder,
    sweep,
)
from tests.helpers import REJECT, ServiceTestServer, body_from, load_list, wait_for
from tests.procs import ServiceProcess

LISTED = "15162065613"
UNLISTED = "15162065600"
#: Put on the list by the second sync, which drops LISTED.
NEW = "15162065688"
#: Enough numbers that the index has more groups than buckets.
FILLER = [f"1212{n:07d}" for n in range(0, 60_000, 3)]


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    made, owner = make_folder(tmp_path)
    yield made
    remove_folder(made, owner)


def cache_on(redis: Redis, folder: Path | None) -> ListCache:
    """A worker's list cache, sharing through ``folder`` (None: private copies)."""
    shared = SharedBases(folder) if folder is not None else None
    return ListCache(ListStore(redis), {"blocklist": "numbers"}, CacheSettings(), shared=shared)


def blocklist(cache: ListCache) -> NumberList:
    found = cache.lists["blocklist"]
    assert isinstance(found, NumberList)
    return found


def data_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(SUFFIX))


def answers_right(numbers: NumberList, listed: list[str], unlisted: list[str]) -> bool:
    return all(int(n) in numbers for n in listed) and not any(int(n) in numbers for n in unlisted)


async def test_two_workers_load_at_once_and_one_builds_the_file(
    redis: Redis, folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await load_list(redis, "blocklist", "numbers", [LISTED, *FILLER])
    first, second = cache_on(redis, folder), cache_on(redis, folder)
    with caplog.at_level(logging.INFO, logger="service.screening.cache"):
        await asyncio.gather(first.load_all(), second.load_all())

    how = [r.getMessage() for r in caplog.records if "in use" in r.getMessage()]
    assert len(how) == 2
    assert sum("shared file built" in m for m in how) == 1
    assert sum("shared file mapped" in m for m in how) == 1
    assert len(data_files(folder)) == 1
    for cache in (first, second):
        numbers = blocklist(cache)
        assert isinstance(numbers.flat, memoryview)  # the mapping, not a private array
        assert numbers.size == len(FILLER) + 1
        assert answers_right(numbers, [LISTED, *FILLER[::97]], [UNLISTED, "12120000001"])
    assert mapped_files(os.getpid(), folder) == set(data_files(folder))


async def test_a_new_base_replaces_the_file_and_the_old_copy_stays_readable(
    redis: Redis, folder: Path
) -> None:
    await load_list(redis, "blocklist", "numbers", [LISTED, *FILLER])
    cache = cache_on(redis, folder)
    await cache.load_all()
    old = blocklist(cache)
    [old_file] = data_files(folder)

    await load_list(redis, "blocklist", "numbers", [NEW, *FILLER])
    await cache.load_all()
    new = blocklist(cache)
    [new_file] = data_files(folder)
    assert new_file != old_file  # the old one was unlinked once replaced
    assert answers_right(new, [NEW], [LISTED])
    # A call still holding the old list answers from it: an unlinked file stays mapped.
    assert answers_right(old, [LISTED], [NEW])

    # Admin changes on top of the base stay in the process; the file does not change.
    await ListStore(redis).change("blocklist", "numbers", add=[UNLISTED])
    await cache.load_all()
    assert int(UNLISTED) in blocklist(cache)
    assert data_files(folder) == [new_file]


def truncate(path: Path) -> bytes:
    return path.read_bytes()[:-4]


def flip_a_number(path: Path) -> bytes:
    """The data changed under an intact header: LISTED or another number becomes another."""
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + 8 * 5] ^= 0x01
    return bytes(data)


def other_gen(path: Path) -> bytes:
    """A whole, consistent file, but of another generation than the one asked for."""
    data = path.read_bytes()
    fields = list(shared_lists._HEADER.unpack_from(data))
    fields[5] += 1  # gen
    header = shared_lists._HEADER.pack(*fields)
    header += shared_lists._CRC.pack(zlib.crc32(header))
    return header + data[len(header) :]


@pytest.mark.parametrize("damage", [truncate, flip_a_number, other_gen])
async def test_a_bad_file_is_built_again_not_used(
    redis: Redis, folder: Path, damage: Any, caplog: pytest.LogCaptureFixture
) -> None:
    await load_list(redis, "blocklist", "numbers", [LISTED, *FILLER])
    await cache_on(redis, folder).load_all()
    [name] = data_files(folder)
    path = folder / name
    good = path.read_bytes()
    # Replaced, not written in place: a worker mapping the file would see in-place writes.
    bad = folder / "bad"
    bad.write_bytes(damage(path))
    bad.replace(path)

    later = cache_on(redis, folder)  # a worker started after the damage
    with caplog.at_level(logging.INFO):
        await later.load_all()
    assert any("is bad" in r.getMessage() for r in caplog.records)
    assert any("shared file built" in r.getMessage() for r in caplog.records)
    assert path.read_bytes() == good
    assert answers_right(blocklist(later), [LISTED, *FILLER], [UNLISTED])


async def test_a_file_that_cannot_be_written_leaves_a_private_copy(
    redis: Redis, folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As with a full /dev/shm: the kernel refuses the write (here: the file-size limit)."""
    await load_list(redis, "blocklist", "numbers", [LISTED, *FILLER])
    cache = cache_on(redis, folder)
    private: list[str] = []
    cache.on_private = private.append
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with caplog.at_level(logging.INFO):
            await cache.load_all()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert any("builds a private copy" in r.getMessage() for r in caplog.records)
    assert private == ["blocklist"]  # callscreen_list_private_copies_total counts it
    numbers = blocklist(cache)
    assert not isinstance(numbers.flat, memoryview)
    assert answers_right(numbers, [LISTED, *FILLER], [UNLISTED])
    assert sorted(os.listdir(folder)) == [".owner", "blocklist.lock"]  # no partial file left


def test_a_folder_others_may_write_to_is_refused(tmp_path: Path) -> None:
    made, owner = make_folder(tmp_path)
    try:
        assert stat.S_IMODE(made.stat().st_mode) == 0o700
        SharedBases(made).close()
        made.chmod(0o770)
        with pytest.raises(UnsafeFolder, match="others may enter"):
            SharedBases(made)
    finally:
        remove_folder(made, owner)
    with pytest.raises(UnsafeFolder):
        SharedBases(tmp_path / "missing")


async def test_a_worker_answers_from_its_own_copy_in_an_unsafe_folder(
    redis: Redis, tmp_path: Path, make_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from aiohttp.test_utils import TestClient
    from prometheus_client import CollectorRegistry

    from service.app import create_app

    await load_list(redis, "blocklist", "numbers", [LISTED])
    planted = tmp_path / "planted"
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)
    registry = CollectorRegistry()
    app = create_app(make_config(), registry=registry, lists_dir=planted)
    with caplog.at_level(logging.INFO):
        async with TestClient(ServiceTestServer(app)) as client:
            response = await client.post("/tg/main", json=body_from(LISTED))
            assert await response.json() == REJECT
            copies = registry.get_sample_value(
                "callscreen_list_private_copies_total", {"list": "blocklist"}
            )
            assert copies == 1
    assert any("not shared" in r.getMessage() for r in caplog.records)
    assert os.listdir(planted) == []


def test_folders_of_killed_services_are_swept(tmp_path: Path) -> None:
    live, live_owner = make_folder(tmp_path)
    dead, dead_owner = make_folder(tmp_path)
    (dead / "blocklist.1.0123456789abcdef.numbers").write_bytes(b"left behind")
    os.close(dead_owner)  # its service is gone: nobody holds the folder
    shared = SharedBases(live)  # a worker holds it too
    os.close(live_owner)
    try:
        newest, newest_owner = make_folder(tmp_path)
        assert not dead.exists()
        assert live.exists()  # still held by the worker
        remove_folder(newest, newest_owner)
    finally:
        shared.close()
    assert sweep(tmp_path) == [live]


# --- real service processes ---------------------------------------------------------


def worker_pids(service: ServiceProcess) -> list[int]:
    found = [re.search(r"started \(pid (\d+)\)", r["message"]) for r in service.log_records()]
    return [int(m.group(1)) for m in found if m]


def instance_folder(share: Path) -> Path:
    [folder] = [p for p in share.iterdir() if p.name.startswith("callscreen-lists-")]
    return folder


async def answers_everywhere(service: ServiceProcess, expected: dict[str, Any]) -> bool:
    """Each caller's answer on 8 fresh connections, which the kernel spreads over workers."""

    async def one(caller: str) -> Any:
        connector = aiohttp.TCPConnector(force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.post(f"{service.url}/tg/main", json=body_from(caller)) as response,
        ):
            return await response.json()

    callers = [c for c in expected for _ in range(8)]
    got = await asyncio.gather(*(one(c) for c in callers))
    return all(answer == expected[c] for c, answer in zip(callers, got, strict=True))


@pytest.fixture
def share(tmp_path: Path) -> Path:
    folder = tmp_path / "share"
    folder.mkdir()
    return folder


@pytest.fixture
def two_workers(
    tmp_path: Path, redis_server: RedisProcess, share: Path
) -> Iterator[ServiceProcess]:
    overrides = {"cache": {"refresh_ms": 100, "max_stale_ms": 2000, "share_dir": str(share)}}
    process = ServiceProcess(tmp_path / "service", redis_server.url, workers=2, overrides=overrides)
    yield process
    process.stop()


async def test_two_workers_answer_from_one_file_and_swap_it_on_a_sync(
    two_workers: ServiceProcess, redis: Redis, share: Path
) -> None:
    service = two_workers
    await load_list(redis, "blocklist", "numbers", [LISTED, *FILLER])
    service.start()
    await service.ready()
    folder = instance_folder(share)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    [first] = data_files(folder)
    pids = worker_pids(service)
    assert len(pids) == 2

    async def both_map(name: str) -> bool:
        return all(mapped_files(pid, folder) == {name} for pid in pids)

    await wait_for(lambda: both_map(first), timeout_s=10)
    in_use = [r for r in service.log_records() if " in use" in r["message"]]
    assert sorted(r["pid"] for r in in_use) == sorted(pids)
    assert sum("shared file built" in r["message"] for r in in_use) == 1
    assert await answers_everywhere(service, {LISTED: REJECT, UNLISTED: []})

    # A full sync: one worker builds the new file, both map it and drop the old one.
    await load_list(redis, "blocklist", "numbers", [NEW, *FILLER])

    async def swapped() -> bool:
        files = data_files(folder)
        return len(files) == 1 and files[0] != first and await both_map(files[0])

    await wait_for(swapped, timeout_s=20)
    assert await answers_everywhere(service, {NEW: REJECT, LISTED: [], UNLISTED: []})

    def built() -> int:
        return sum("shared file built" in r["message"] for r in service.log_records())

    async def both_built() -> bool:  # INFO lines are written every 0.1 s
        return built() >= 2

    await wait_for(both_built, timeout_s=5)
    assert built() == 2

    service.signal(signal.SIGTERM)
    assert await service.exited() == 0
    assert not folder.exists()


async def test_a_restarted_worker_rebuilds_a_corrupt_file(
    two_workers: ServiceProcess, redis: Redis, share: Path
) -> None:
    service = two_workers
    await load_list(redis, "blocklist", "numbers", [LISTED, *FILLER])
    service.start()
    await service.ready()
    folder = instance_folder(share)
    [name] = data_files(folder)
    path = folder / name
    good = path.read_bytes()
    bad = folder / "bad"
    bad.write_bytes(good[:HEADER_BYTES] + bytes(len(good) - HEADER_BYTES))  # numbers zeroed
    bad.replace(path)

    victim = worker_pids(service)[0]
    os.kill(victim, signal.SIGTERM)

    async def rebuilt() -> bool:
        records = service.log_records()
        return (
            any("is bad" in r["message"] for r in records)
            and sum("shared file built" in r["message"] for r in records) == 2
        )

    await wait_for(rebuilt, timeout_s=30)
    await service.ready(listeners=3)
    assert path.read_bytes() == good
    state = (await ListStore(redis).states(["blocklist"]))["blocklist"]
    assert map_file(path, "blocklist", state) is not None
    assert await answers_everywhere(service, {LISTED: REJECT, UNLISTED: []})


async def test_one_process_makes_and_removes_its_own_folder(
    tmp_path: Path, redis_server: RedisProcess, redis: Redis, share: Path
) -> None:
    await load_list(redis, "blocklist", "numbers", [LISTED])
    overrides = {"cache": {"refresh_ms": 100, "max_stale_ms": 2000, "share_dir": str(share)}}
    service = ServiceProcess(tmp_path / "one", redis_server.url, workers=1, overrides=overrides)
    try:
        service.start()
        await service.ready()
        folder = instance_folder(share)
        assert service.process is not None
        assert mapped_files(service.process.pid, folder) == set(data_files(folder))
        assert await answers_everywhere(service, {LISTED: REJECT, UNLISTED: []})
        service.signal(signal.SIGTERM)
        assert await service.exited() == 0
        assert os.listdir(share) == []
    finally:
        service.stop()


async def test_workers_of_a_killed_supervisor_remove_the_folder(
    two_workers: ServiceProcess, redis: Redis, share: Path
) -> None:
    await load_list(redis, "blocklist", "numbers", [LISTED])
    two_workers.start()
    await two_workers.ready()
    folder = instance_folder(share)
    two_workers.signal(signal.SIGKILL)
    await two_workers.exited()

    async def gone() -> bool:
        return not folder.exists()

    await wait_for(gone, timeout_s=15)
