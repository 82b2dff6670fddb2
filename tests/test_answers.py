"""The screening answer's bytes are aiohttp's own for the same response.

A small app answers the same body two ways, ``web.Response`` and
:class:`service.edge.answers.ScreeningAnswer`; raw requests of each HTTP version and
keep-alive choice go to both, and the bytes must match (the ``Date`` value aside).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from service.edge.answers import CONTENT_TYPE, ScreeningAnswer, screening_response
from tests.helpers import wait_for

#: The machinery under test exists only with aiohttp's internals (aiohttp_adapter.py).
pytestmark = pytest.mark.internals

BODY = b'[{"action":"reject","operands":["unavailable","aniblock"]}]'
DATE = re.compile(rb"\r\nDate: [^\r]*\r\n")


async def plain(request: web.Request) -> web.StreamResponse:
    await request.read()
    return web.Response(body=BODY, content_type=CONTENT_TYPE)


async def whole(request: web.Request) -> web.StreamResponse:
    await request.read()
    return screening_response(request, BODY)


async def closing(request: web.Request) -> web.StreamResponse:
    await request.read()
    response = screening_response(request, BODY)
    response.force_close()  # as the connection guard does when it recycles a connection
    return response


async def plain_closing(request: web.Request) -> web.StreamResponse:
    response = await plain(request)
    response.force_close()
    return response


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    app = web.Application()
    app.router.add_post("/plain", plain)
    app.router.add_post("/whole", whole)
    app.router.add_post("/plain-closing", plain_closing)
    app.router.add_post("/closing", closing)
    test_server = TestServer(app)
    await test_server.start_server()
    yield test_server
    await test_server.close()


async def exchange(port: int, request: bytes, answers: int = 1) -> bytes:
    """Send ``request`` (one or more pipelined); read until ``answers`` bodies or EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        got = b""
        while got.count(BODY) < answers:
            chunk = await asyncio.wait_for(reader.read(65536), timeout=5)
            if not chunk:
                break
            got += chunk
        return got
    finally:
        writer.close()


def request(path: str, version: str, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/{version}", "Host: x", "Content-Length: 2", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + b"{}"


VARIANTS = {
    "1.1 keep-alive": ("1.1",),
    "1.1 Connection: close": ("1.1", "Connection: close"),
    "1.0": ("1.0",),
    "1.0 Connection: keep-alive": ("1.0", "Connection: keep-alive"),
}


@pytest.mark.parametrize("variant", VARIANTS)
async def test_the_bytes_are_aiohttps(server: TestServer, variant: str) -> None:
    assert server.port is not None
    version, *headers = VARIANTS[variant]
    want = await exchange(server.port, request("/plain", version, *headers))
    got = await exchange(server.port, request("/whole", version, *headers))
    assert want.startswith(f"HTTP/{version} 200 OK\r\n".encode()) and want.endswith(BODY)
    assert DATE.sub(b"\r\nDate: -\r\n", got) == DATE.sub(b"\r\nDate: -\r\n", want)


async def test_a_closing_answer_says_so_and_closes(server: TestServer) -> None:
    assert server.port is not None
    want = await exchange(server.port, request("/plain-closing", "1.1"))
    got = await exchange(server.port, request("/closing", "1.1"), answers=2)
    assert b"\r\nConnection: close\r\n" in got
    assert DATE.sub(b"-", got) == DATE.sub(b"-", want)


async def test_pipelined_calls_are_answered_in_order(server: TestServer) -> None:
    assert server.port is not None
    got = await exchange(server.port, request("/whole", "1.1") * 3, answers=3)
    assert got.count(b"HTTP/1.1 200 OK\r\n") == 3 and got.count(BODY) == 3


async def test_the_access_log_sees_status_and_size(caplog: pytest.LogCaptureFixture) -> None:
    app = web.Application()
    app.router.add_post("/whole", whole)
    test_server = TestServer(app)
    await test_server.start_server(access_log_format="%s %b")
    try:
        assert test_server.port is not None
        with caplog.at_level(logging.INFO, logger="aiohttp.access"):
            await exchange(test_server.port, request("/whole", "1.1"))

            async def logged() -> bool:  # written just after the answer is sent
                return bool(caplog.records)

            await wait_for(logged)
    finally:
        await test_server.close()
    assert [r.getMessage() for r in caplog.records] == [f"200 {len(BODY)}"]


def test_an_app_with_response_signals_gets_a_plain_response() -> None:
    """A signal handler could change headers the whole answer does not keep."""
    from aiohttp.test_utils import make_mocked_request

    async def stamp(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Stamp"] = "1"

    app = web.Application()
    request = make_mocked_request("POST", "/", app=app)
    assert isinstance(screening_response(request, BODY), ScreeningAnswer)
    app.on_response_prepare.append(stamp)
    fallback = screening_response(request, BODY)
    assert not isinstance(fallback, ScreeningAnswer) and fallback.status == 200
