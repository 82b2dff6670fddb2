"""Screening POSTs taken without the router answer exactly as the router would.

Two services on the same config and Redis: one on aiohttp's plain runner (every request
through the router), one on the service's runner (service/edge/dispatch.py). Each request is
sent byte for byte to both, over a raw socket so odd request targets reach the server
as written, and the answers must be the same; the service's runner must also have
taken the plain screening calls directly, and left the odd ones to the router.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from core.config import Config
from service.app import create_app
from service.edge.dispatch import KNOWN_PATHS, ScreeningDispatch
from tests.helpers import REJECT, ServiceTestServer, body_from, load_list

#: The machinery under test exists only with aiohttp's internals (aiohttp_adapter.py).
pytestmark = pytest.mark.internals

SECRET = "Dispatch-Handler-Secret-0123456789"
BLOCKED = "15162065613"
ALLOWED = "15165550123"

CONFIG: dict[str, Any] = {
    "lists": {"blocklist": {"kind": "numbers"}},
    "policies": {
        "default": {
            "rules": [{"name": "blocklist", "match": "caller_in_list", "list": "blocklist"}]
        }
    },
    "trunk_groups": {
        "main": {"policy": "default"},
        "secure": {"policy": "default", "auth": {"secret_env": "TEST_DISPATCH_SECRET"}},
    },
}

Answer = tuple[int, str, bytes]


async def send(port: int, head: str, body: bytes = b"") -> Answer:
    """One request on a fresh connection: status, content type and body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode("latin-1") + b"\r\n" + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    while raw.startswith(b"HTTP/1.1 100"):  # an interim 100 Continue
        raw = raw.split(b"\r\n\r\n", 1)[1]
    head_part, _, payload = raw.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return status, headers.get("Content-Type", ""), payload


def post(target: str, body: bytes, *extra: str) -> tuple[str, bytes]:
    lines = [
        f"POST {target} HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *extra,
    ]
    return "\r\n".join(lines) + "\r\n", body


BLOCKED_BODY = orjson.dumps(body_from(BLOCKED))
ALLOWED_BODY = orjson.dumps(body_from(ALLOWED))

#: Requests the service's runner answers without the router.
DIRECT = {
    "root, blocked": post("/", BLOCKED_BODY),
    "root, allowed": post("/", ALLOWED_BODY),
    "trunk group": post("/tg/main", BLOCKED_BODY),
    "trunk group, query": post("/tg/main?x=1&key=none", BLOCKED_BODY),
    "unknown trunk group": post("/tg/nosuch", BLOCKED_BODY),
    "secret missing": post("/tg/secure", BLOCKED_BODY),
    "secret in path": post(f"/k/{SECRET}/tg/secure", BLOCKED_BODY),
    "wrong secret in path": post("/k/not-it/tg/secure", BLOCKED_BODY),
    "secret in path, root": post(f"/k/{SECRET}", ALLOWED_BODY),
    "secret in query": post(f"/tg/secure?key={SECRET}", BLOCKED_BODY),
    "bad JSON": post("/tg/main", b'{"From": '),
    "not an object": post("/", b"[1, 2]"),
}

#: Requests left to the router (``Application._handle``).
ROUTED = {
    "percent-escape": post("/tg/ma%69n", BLOCKED_BODY),
    "escaped slash": post("/tg/main%2Fx", BLOCKED_BODY),
    "braces": post("/tg/%7Bmain%7D", BLOCKED_BODY),
    "literal braces": post("/tg/{main}", BLOCKED_BODY),
    "Expect: 100-continue": post("/tg/main", BLOCKED_BODY, "Expect: 100-continue"),
    "trailing slash": post("/tg/main/", BLOCKED_BODY),
    "empty trunk group": post("/tg/", BLOCKED_BODY),
    "double slash": post("//tg/main", BLOCKED_BODY),
    "empty segment": post("/tg//main", BLOCKED_BODY),
    "deeper path": post("/tg/main/extra", BLOCKED_BODY),
    "absolute-form target": post("http://127.0.0.1/tg/main", BLOCKED_BODY),
    "GET on a screening path": ("GET /tg/main HTTP/1.1\r\nHost: x\r\nConnection: close\r\n", b""),
    "POST to a probe": post("/healthz", BLOCKED_BODY),
    "POST to an unknown path": post("/nothing/here", BLOCKED_BODY),
}


@pytest.fixture
async def servers(
    redis: Redis, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[TestServer, TestServer, list[str]]]:
    """(routed, direct, paths the direct one's router saw) on the same config and Redis."""
    monkeypatch.setenv("TEST_DISPATCH_SECRET", SECRET)
    await load_list(redis, "blocklist", "numbers", [BLOCKED])
    config = make_config(CONFIG)
    routed = TestServer(create_app(config, redis=redis, registry=CollectorRegistry()))
    direct = ServiceTestServer(create_app(config, redis=redis, registry=CollectorRegistry()))
    await routed.start_server(access_log=None)
    await direct.start_server(access_log=None)
    assert direct.runner is not None and direct.runner.server is not None
    dispatch = direct.runner.server.request_handler
    assert isinstance(dispatch, ScreeningDispatch)
    seen: list[str] = []
    router = dispatch.fallback

    def counted(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        seen.append(request.raw_path)
        return router(request)

    dispatch.fallback = counted
    yield routed, direct, seen
    await direct.close()
    await routed.close()


@pytest.mark.parametrize("case", [*DIRECT, *ROUTED])
async def test_the_answer_is_the_routers(
    servers: tuple[TestServer, TestServer, list[str]], case: str
) -> None:
    routed, direct, seen = servers
    head, body = DIRECT.get(case) or ROUTED[case]
    assert routed.port is not None and direct.port is not None
    want = await send(routed.port, head, body)
    got = await send(direct.port, head, body)
    assert got == want
    assert (seen == []) == (case in DIRECT), f"{case}: router saw {seen}"


async def test_direct_calls_are_screened(
    servers: tuple[TestServer, TestServer, list[str]],
) -> None:
    """The answers compared above are real decisions, not two identical errors."""
    _, direct, seen = servers
    assert direct.port is not None
    for target in ("/", "/tg/main", f"/k/{SECRET}/tg/secure"):
        status, kind, payload = await send(direct.port, *post(target, BLOCKED_BODY))
        assert (status, kind, orjson.loads(payload)) == (200, "application/json", REJECT)
        status, _, payload = await send(direct.port, *post(target, ALLOWED_BODY))
        assert (status, orjson.loads(payload)) == (200, [])
    status, _, payload = await send(direct.port, *post("/tg/secure", BLOCKED_BODY))
    assert (status, orjson.loads(payload)["error"].split(":")[0]) == (401, "unauthorized")
    assert seen == []


async def test_paths_past_the_remembered_ones_are_still_matched(
    servers: tuple[TestServer, TestServer, list[str]],
) -> None:
    """Made-up paths fill the memory of matched paths; real calls are answered as before."""
    _, direct, seen = servers
    assert direct.port is not None and direct.runner is not None
    dispatch = direct.runner.server.request_handler  # type: ignore[union-attr]
    assert isinstance(dispatch, ScreeningDispatch)
    for i in range(KNOWN_PATHS + 5):
        dispatch.look_up(f"/tg/made-up-{i}")
    assert len(dispatch.known) == KNOWN_PATHS and "/tg/main" not in dispatch.known
    for _ in range(2):
        status, _, payload = await send(direct.port, *post("/tg/main", BLOCKED_BODY))
        assert (status, orjson.loads(payload)) == (200, REJECT)
    assert "/tg/main" not in dispatch.known and seen == []
