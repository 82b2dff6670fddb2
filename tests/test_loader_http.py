"""URL sources against a real local HTTP server: ETag/304, retries, timeouts, gzip, the CLI."""

from __future__ import annotations

import asyncio
import gzip
import os
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from core.config import Config
from core.store import ListStore
from devtools.redis_server import RedisProcess
from loader.sync import SyncError, SyncOptions, SyncRefused, sync_list
from tests.helpers import REJECT, body_from, wait_for

ROOT = Path(__file__).resolve().parent.parent
QUIET = SyncOptions(progress="off")
SEED = b"number\n5162065613\n5162065614\n5162065615\n5162065616\n"


@dataclass
class Served:
    body: bytes
    etag: str = '"v1"'
    last_modified: str = ""
    content_type: str = "text/csv"
    gzip_encoded: bool = False
    #: Answer 503 this many times before serving.
    failures: int = 0
    status: int = 200
    delay_s: float = 0.0


@dataclass
class ListServer:
    files: dict[str, Served] = field(default_factory=dict)
    #: (path, If-None-Match, If-Modified-Since) of every request.
    seen: list[tuple[str, str, str]] = field(default_factory=list)
    server: TestServer | None = None

    def url(self, name: str) -> str:
        assert self.server is not None
        return str(self.server.make_url(f"/{name}"))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.seen.append(
            (
                name,
                request.headers.get("If-None-Match", ""),
                request.headers.get("If-Modified-Since", ""),
            )
        )
        served = self.files[name]
        if served.delay_s:
            await asyncio.sleep(served.delay_s)
        if served.failures:
            served.failures -= 1
            return web.Response(status=503, text="busy")
        if served.status != 200:
            return web.Response(status=served.status, text="no")
        headers = {"Content-Type": served.content_type}
        if served.etag:
            headers["ETag"] = served.etag
            if request.headers.get("If-None-Match") == served.etag:
                return web.Response(status=304, headers=headers)
        if served.last_modified:
            headers["Last-Modified"] = served.last_modified
            if request.headers.get("If-Modified-Since") == served.last_modified:
                return web.Response(status=304, headers=headers)
        body = served.body
        if served.gzip_encoded:
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)


@pytest.fixture
async def list_server() -> AsyncIterator[ListServer]:
    state = ListServer()
    app = web.Application()
    app.router.add_get("/{name}", state.handle)
    state.server = TestServer(app, host="127.0.0.1")
    await state.server.start_server()
    yield state
    await state.server.close()


def url_config(make_config: Callable[..., Config], url: str, **spec: Any) -> Config:
    lists = {"blocklist": {"kind": "numbers", "source": url, "retries": 2, **spec}}
    return make_config(
        {
            "lists": lists,
            "loader": {"retry_backoff_s": 0.01},
            "policies": {
                "default": {
                    "rules": [{"name": "bl", "match": "caller_in_list", "list": "blocklist"}]
                }
            },
        }
    )


async def test_an_unchanged_url_answers_304_and_the_list_is_not_rebuilt(
    redis: Redis, make_config: Callable[..., Config], list_server: ListServer
) -> None:
    list_server.files["list.csv"] = Served(SEED, last_modified="Wed, 01 May 2024 10:00:00 GMT")
    config = url_config(make_config, list_server.url("list.csv"))
    first = await sync_list(redis, config, "blocklist", QUIET)
    assert first.outcome == "success" and first.result is not None and first.result.size == 4
    store = ListStore(redis)
    meta = await store.meta("blocklist")
    assert meta is not None
    second = await sync_list(redis, config, "blocklist", QUIET)
    assert second.outcome == "unchanged" and second.not_modified
    assert list_server.seen[-1] == ("list.csv", '"v1"', "Wed, 01 May 2024 10:00:00 GMT")
    after = await store.meta("blocklist")
    assert after is not None and after.gen == meta.gen and after.synced_at >= meta.synced_at
    # A new version upstream (new ETag) is fetched and swapped in.
    list_server.files["list.csv"] = Served(SEED + b"5162065617\n", etag='"v2"')
    third = await sync_list(redis, config, "blocklist", QUIET)
    assert third.outcome == "success" and third.result is not None
    assert (third.result.added, third.result.removed) == (1, 0)
    assert await store.contains("blocklist", "numbers", "15162065617")
    # --force refetches without validators
    await sync_list(redis, config, "blocklist", SyncOptions(force=True, progress="off"))
    assert list_server.seen[-1] == ("list.csv", "", "")


async def test_server_errors_are_retried_and_then_the_sync_goes_through(
    redis: Redis, make_config: Callable[..., Config], list_server: ListServer
) -> None:
    list_server.files["list.csv"] = Served(SEED, failures=2)
    config = url_config(make_config, list_server.url("list.csv"), retries=2)
    report = await sync_list(redis, config, "blocklist", QUIET)
    assert report.outcome == "success"
    assert len(list_server.seen) == 3


async def test_a_failing_server_fails_the_sync_after_its_retries_and_keeps_the_list(
    redis: Redis, make_config: Callable[..., Config], list_server: ListServer
) -> None:
    list_server.files["list.csv"] = Served(SEED)
    config = url_config(make_config, list_server.url("list.csv"), retries=2)
    await sync_list(redis, config, "blocklist", QUIET)
    list_server.files["list.csv"] = Served(b"", etag='"v2"', failures=100)
    list_server.seen.clear()
    with pytest.raises(SyncError, match=r"source unreachable.*HTTP 503.*\(3 attempts\)"):
        await sync_list(redis, config, "blocklist", QUIET)
    assert len(list_server.seen) == 3
    assert await ListStore(redis).contains("blocklist", "numbers", "15162065613")


async def test_a_404_is_not_retried(
    redis: Redis, make_config: Callable[..., Config], list_server: ListServer
) -> None:
    list_server.files["list.csv"] = Served(SEED, status=404)
    config = url_config(make_config, list_server.url("list.csv"), retries=3)
    with pytest.raises(SyncError, match="HTTP 404"):
        await sync_list(redis, config, "blocklist", QUIET)
    assert len(list_server.seen) == 1


async def test_a_server_that_does_not_answer_times_out_and_keeps_the_list(
    redis: Redis, make_config: Callable[..., Config], list_server: ListServer
) -> None:
    list_server.files["list.csv"] = Served(SEED)
    config = url_config(make_config, list_server.url("list.csv"), retries=1, timeout_s=0.2)
    await sync_list(redis, config, "blocklist", QUIET)
    list_server.files["list.csv"] = Served(b"", etag='"v2"', delay_s=3)
    with pytest.raises(SyncError, match=r"no answer within 0.2 s \(2 attempts\)"):
        await sync_list(redis, config, "blocklist", QUIET)
    assert await ListStore(redis).contains("blocklist", "numbers", "15162065616")


async def test_gzip_by_content_encoding_and_gzip_files(
    redis: Redis, make_config: Callable[..., Config], list_server: ListServer
) -> None:
    store = ListStore(redis)
    list_server.files["encoded.csv"] = Served(SEED, gzip_encoded=True)
    config = url_config(make_config, list_server.url("encoded.csv"))
    report = await sync_list(redis, config, "blocklist", QUIET)
    assert report.result is not None and report.result.size == 4
    list_server.files["list.csv.gz"] = Served(
        gzip.compress(SEED + b"5162065699\n"), content_type="application/gzip"
    )
    config = url_config(make_config, list_server.url("list.csv.gz"))
    report = await sync_list(redis, config, "blocklist", QUIET)
    assert report.result is not None and report.result.size == 5
    assert await store.contains("blocklist", "numbers", "15162065699")


async def run_loader(config_file: Path, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loader",
        "--config",
        str(config_file),
        *args,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_point_a_list_at_a_url_dry_run_sync_and_the_handler_follows(
    redis: Redis,
    redis_server: RedisProcess,
    make_client: Callable[..., Any],
    make_config: Callable[..., Config],
    list_server: ListServer,
    tmp_path: Path,
) -> None:
    """The issue's "done when", through the real command line."""
    list_server.files["list.csv"] = Served(SEED + b"5162065617\n")
    data = {
        "redis": {"url": redis_server.url},
        "lists": {"blocklist": {"source": list_server.url("list.csv"), "column": "number"}},
        "policies": {
            "default": {"rules": [{"name": "bl", "match": "caller_in_list", "list": "blocklist"}]}
        },
    }
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(data))
    status, out, _ = await run_loader(config_file, "sync", "--dry-run")
    assert status == 0
    assert "blocklist: dry run, nothing written" in out
    assert "0 now -> 5 after the sync (+5 -0)" in out
    assert await redis.dbsize() == 0

    status, _, err = await run_loader(config_file, "sync")
    assert status == 0, err
    assert "synced blocklist: 5 entries" in err
    client = await make_client(make_config(data), redis_client=redis)
    response = await client.post("/", json=body_from("15162065617"))
    assert await response.json() == REJECT

    # Upstream now serves an empty list: refused, the old list still answers.
    list_server.files["list.csv"] = Served(b"number\n", etag='"empty"')
    status, _, err = await run_loader(config_file, "sync")
    assert status == 1
    assert "refused" in err and "has no valid entries" in err and "--force" in err
    assert await ListStore(redis).contains("blocklist", "numbers", "15162065617")

    async def still_rejected() -> bool:
        answer = await (await client.post("/", json=body_from("15162065617"))).json()
        return bool(answer == REJECT)

    await wait_for(still_rejected)


async def test_a_refused_sync_is_reported_as_refused(
    redis: Redis, make_config: Callable[..., Config], list_server: ListServer
) -> None:
    list_server.files["list.csv"] = Served(SEED)
    config = url_config(make_config, list_server.url("list.csv"), max_removal_share=0.2)
    await sync_list(redis, config, "blocklist", QUIET)
    list_server.files["list.csv"] = Served(b"number\n5162065613\n", etag='"v2"')
    with pytest.raises(SyncRefused, match="would remove 3 of 4"):
        await sync_list(redis, config, "blocklist", QUIET)
