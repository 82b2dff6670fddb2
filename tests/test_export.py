"""Export and restore: every list kind streams out as CSV (admin route and
``loader export``) and comes back whole through the normal guarded sync."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from core.config import Config
from core.store import ListStore
from devtools.redis_server import RedisProcess
from loader.sync import SyncOptions, sync_list
from service.appkeys import CACHE
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "tok-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Client = TestClient[Any, Any]
QUIET = SyncOptions(progress="off")
NUMBERS = ["5162065613", "5162065614", "+44 20 7946 0018", "611"]
PREFIXES = ["1900", "44870", "1976"]
NAMES = ["Spam Caller", "contains:warranty", "re:^v[0-9]{6,}$", "exact:#1 Deals", 'say "hi", ok']
SUBSCRIBERS = (
    "subscriber,entry,side\n19512623062,1900*,block\n19512623062,5162065613,allow\n"
    "+44 20 7946 0018,15162065699,block\n"
)
LISTS: dict[str, Any] = {
    "blocklist": {"kind": "numbers", "source": "numbers.txt", "allow_short_codes": True},
    "premium": {"kind": "prefixes", "source": "prefixes.txt"},
    "cnam": {"kind": "names", "source": "names.txt"},
    "personal": {"kind": "subscribers", "source": "personal.csv"},
    "manual": {"kind": "numbers"},  # admin API only
}


def write_sources(folder: Path) -> None:
    (folder / "numbers.txt").write_text("\n".join(NUMBERS) + "\n")
    (folder / "prefixes.txt").write_text("\n".join(PREFIXES) + "\n")
    names = "".join(f'"{n.replace(chr(34), chr(34) * 2)}"\n' for n in NAMES)
    (folder / "names.txt").write_text(names)
    (folder / "personal.csv").write_text(SUBSCRIBERS)


@pytest.fixture
def config(make_config: Callable[..., Config], tmp_path: Path) -> Config:
    write_sources(tmp_path)
    data = {"lists": {**LISTS, "cnam": {**LISTS["cnam"], "format": "csv"}}}
    return make_config(data, base_dir=tmp_path)


@pytest.fixture
async def admin(
    monkeypatch: pytest.MonkeyPatch, redis: Redis, config: Config, make_client: Any
) -> Client:
    monkeypatch.setenv("CALLSCREEN_ADMIN_TOKENS", TOKEN)
    client: Client = await make_client(config, redis_client=redis)
    return client


async def export(admin: Client, name: str) -> str:
    response = await admin.get(f"/v1/lists/{name}/entries", headers=AUTH)
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert response.headers.get("Transfer-Encoding") == "chunked"
    return await response.text()


def body(text: str) -> list[str]:
    """The rows, without the comment lines (the end line names gen and version; the
    admin overlay's notes are not restored as such)."""
    lines = text.splitlines()
    assert lines[-1].startswith("# end of export: ")
    return [line for line in lines if not line.startswith("# ")]


async def test_every_kind_round_trips_through_a_sync(
    redis: Redis, admin: Client, config: Config, tmp_path: Path
) -> None:
    for name in ("blocklist", "premium", "cnam", "personal"):
        assert (await sync_list(redis, config, name, QUIET)).outcome == "success"
    # single-entry changes are part of the list too
    for path in ("blocklist/entries/5162065699", "manual/entries/5162065600"):
        assert (await admin.put(f"/v1/lists/{path}", headers=AUTH)).status == 200
    gone = await admin.delete("/v1/lists/blocklist/entries/5162065614", headers=AUTH)
    assert gone.status == 200
    before = {name: await export(admin, name) for name in LISTS}
    assert body(before["blocklist"])[0] == "number"
    assert sorted(body(before["blocklist"])[1:]) == [
        "+15162065613",
        "+15162065699",
        "+442079460018",
        "+611",
    ]
    assert before["blocklist"].splitlines()[-1].startswith("# end of export: 4 entries")
    assert sorted(body(before["premium"])[1:]) == ["1900", "1976", "44870"]
    assert sorted(body(before["personal"])[1:]) == [
        "+19512623062,+15162065613,allow",
        "+19512623062,1900*,block",
        "+442079460018,+15162065699,block",
    ]
    assert "exact:#1 deals" in body(before["cnam"])

    files: dict[str, Path] = {}
    for name, text in before.items():
        files[name] = tmp_path / f"backup-{name}.csv"
        files[name].write_text(text)
    await redis.flushall()
    for name, backup in files.items():
        options = SyncOptions(progress="off", source=str(backup))
        report = await sync_list(redis, config, name, options)
        assert (report.outcome, report.rows_rejected) == ("success", 0), name
    after = {name: await export(admin, name) for name in LISTS}
    for name in LISTS:
        assert sorted(body(after[name])) == sorted(body(before[name])), name
    assert await ListStore(redis).contains("manual", "numbers", "15162065600")


async def test_the_export_of_a_large_list_streams_in_pieces(
    redis: Redis, admin: Client, config: Config, tmp_path: Path
) -> None:
    numbers = [f"1516{i:07d}" for i in range(200_000)]
    (tmp_path / "numbers.txt").write_text("\n".join(numbers) + "\n")
    await sync_list(redis, config, "blocklist", QUIET)
    cache = admin.app[CACHE]

    async def loaded() -> bool:  # the service's own reload of the list is not the export
        state = cache.loaded.get("blocklist")
        return state is not None and state.gen == 1

    await wait_for(loaded, timeout_s=10)
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:  # the service shares this event loop: calls would wait
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    response = await admin.get("/v1/lists/blocklist/entries", headers=AUTH)
    pieces = 0
    size = 0
    async for chunk in response.content.iter_any():
        pieces += 1
        size += len(chunk)
    done.set()
    await ticking
    assert pieces > 10  # not one body built whole
    # Slices of ~2 ms; generous for two cores shared by several test runs.
    assert max(gaps) < 0.05, f"event loop held {max(gaps) * 1000:.0f} ms"
    print(f"export of 200k: longest loop hold {max(gaps) * 1000:.1f} ms")
    assert size == sum(len(n) + 2 for n in numbers) + len("number\n") + len(
        "# end of export: 200000 entries of blocklist gen 1 version 1\n"
    )


async def test_export_needs_a_token_and_a_known_list(admin: Client) -> None:
    assert (await admin.get("/v1/lists/blocklist/entries")).status == 401
    assert (await admin.get("/v1/lists/nope/entries", headers=AUTH)).status == 404


def test_loader_export_and_restore_from_the_command_line(
    tmp_path: Path, redis_server: RedisProcess
) -> None:
    write_sources(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"redis": {"url": redis_server.url}, "lists": LISTS}))

    def loader(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "loader", "--config", str(config), "--progress", "off"]
        return subprocess.run(
            [*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
        )

    assert loader("sync", "--list", "blocklist").returncode == 0
    out = tmp_path / "backup.csv"
    done = loader("export", "--list", "blocklist", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "exported 4 entries" in done.stderr
    printed = loader("export", "--list", "blocklist")
    assert printed.stdout == out.read_text()
    SyncRedis.from_url(redis_server.url).flushall()
    restored = loader("sync", "--list", "blocklist", "--from", str(out))
    assert restored.returncode == 0, restored.stderr
    again = loader("export", "--list", "blocklist")
    assert body(again.stdout) == body(out.read_text())
    # a restore goes through the guards like any sync: "manual" keeps no short codes
    refused = loader("sync", "--list", "manual", "--from", str(out))
    assert refused.returncode == 1 and "not a dialable number: '+611'" in refused.stderr
    empty = tmp_path / "empty.csv"
    empty.write_text("number\n")
    refused = loader("sync", "--list", "blocklist", "--from", str(empty))
    assert refused.returncode == 1 and "no valid entries" in refused.stderr
