"""Bad input (docs/failure.md): clear 4xx JSON errors, and no body that yields a 500."""

from __future__ import annotations

import asyncio
import http.client
import threading
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.config import Config
from devtools.redis_server import RedisProcess, free_port
from service.app import create_app
from service.appkeys import AUTH
from service.edge.auth import HandlerAuth
from tests.helpers import EXAMPLE_BODY, REJECT, wait_for

Client = Any


async def test_error_answers(
    make_config: Callable[..., Config], make_client: Callable[..., Any]
) -> None:
    client: Client = await make_client(make_config())
    cases = [
        (b"{not json", 400, "not valid UTF-8 JSON"),
        (b'{"From": [{"user": "\xff\xfe"}]}', 400, "not valid UTF-8 JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b'"text"', 400, "must be a JSON object"),
        (b"", 400, "not valid UTF-8 JSON"),
        (b"{" + b" " * 70_000 + b"}", 413, "over 65536 bytes"),
    ]
    for body, status, message in cases:
        response = await client.post("/", data=body, headers={"Content-Type": "application/json"})
        assert response.status == status, body[:20]
        assert response.content_type == "application/json"
        assert message in (await response.json())["error"]
    wrong_method = await client.get("/")
    assert wrong_method.status == 405
    assert wrong_method.headers["Allow"] == "POST"
    assert "not allowed" in (await wrong_method.json())["error"]
    nowhere = await client.post("/no/such/path", json={})
    assert nowhere.status == 404 and "error" in await nowhere.json()


async def test_chunked_body_over_the_limit_is_413(
    make_config: Callable[..., Config], make_client: Callable[..., Any]
) -> None:
    client: Client = await make_client(make_config())

    async def chunks() -> Any:
        for _ in range(100):
            yield b"x" * 1024

    response = await client.post("/", data=chunks())
    assert response.status == 413
    assert (await response.json()) == {"error": "request body over 65536 bytes"}


async def client_error(client: Client, body: bytes) -> Any:
    response = await client.post("/", data=body, headers={"Content-Type": "application/json"})
    return await response.json()


async def test_a_body_that_comes_after_its_headers_is_read_whole(
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A body whose second half is sent once the handler has started (a slow link; most
    bodies come with their headers) gets the answer the same body gets in one piece, and
    so do a bad one and one over the size limit."""
    client: Client = await make_client(make_config())
    # The handler's first step is the auth check: noted, it says the handler has started
    # (and takes the body, with no await between, before the second half is read).
    auth: HandlerAuth = client.app[AUTH]
    refuse = auth.refuse
    entered: list[str] = []

    def noting(request: web.Request) -> web.Response | None:
        entered.append(request.path)
        return refuse(request)

    monkeypatch.setattr(auth, "refuse", noting)
    body = orjson.dumps(EXAMPLE_BODY)
    whole = await client.post("/", data=body, headers={"Content-Type": "application/json"})
    assert whole.status == 200
    answer = await whole.json()

    async def in_two_parts(payload: bytes) -> tuple[int, Any]:
        reader, writer = await asyncio.open_connection(client.host, client.port)
        head = (
            f"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        ).encode()
        half = len(payload) // 2
        before = len(entered)
        writer.write(head + payload[:half])
        await writer.drain()

        async def started() -> bool:
            return len(entered) > before

        await wait_for(started, what="the handler to start on the first half")
        writer.write(payload[half:])
        await writer.drain()
        answer = await reader.read()
        writer.close()
        status = int(answer.split(b" ", 2)[1])
        return status, orjson.loads(answer.split(b"\r\n\r\n", 1)[1])

    assert await in_two_parts(body) == (200, answer)
    assert await in_two_parts(b"{not json") == (400, await client_error(client, b"{not json"))
    status, error = await in_two_parts(b"{" + b" " * 70_000 + b"}")
    assert (status, error) == (413, {"error": "request body over 65536 bytes"})


@pytest.fixture(scope="module")
def threaded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """The service in a thread of its own, so sync hypothesis tests can call it over HTTP."""
    redis = RedisProcess(tmp_path_factory.mktemp("fuzz-redis")).start()
    from core.config import parse_config
    from tests.conftest import SEED_CONFIG

    config = parse_config({**SEED_CONFIG, "redis": {"url": redis.url}})
    port = free_port()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    runner = web.AppRunner(create_app(config), access_log=None)

    async def serve() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(serve()), loop.run_forever()))
    thread.start()
    assert started.wait(20)
    yield "127.0.0.1", port
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(20)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(20)
    loop.close()
    redis.stop()


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=50)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=16), inner, max_size=4)
    ),
    max_leaves=10,
)
header = st.sampled_from(
    ["From", "To", "P-Asserted-Identity", "Remote-Party-ID", "Privacy", "Call-ID"]
)


def mutated_example(draw_header: str, value: Any) -> bytes:
    body = dict(EXAMPLE_BODY)
    body[draw_header] = value
    return orjson.dumps(body)


bodies = (
    st.binary(max_size=300)
    | json_values.map(orjson.dumps)
    | st.dictionaries(header | st.text(max_size=10), json_values, max_size=6).map(orjson.dumps)
    | st.builds(mutated_example, header, json_values)
    | st.builds(
        mutated_example,
        header,
        st.lists(
            st.dictionaries(
                st.sampled_from(["user", "raw", "name", "header_parameters", "uri_parameters"]),
                json_values,
            ),
            max_size=3,
        ),
    )
)


@settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=bodies, path=st.sampled_from(["/", "/tg/main", "/v1/explain"]))
def test_no_body_gives_a_500(threaded_server: tuple[str, int], body: bytes, path: str) -> None:
    connection = http.client.HTTPConnection(*threaded_server, timeout=10)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = orjson.loads(response.read())
    finally:
        connection.close()
    assert response.status in (200, 400), (response.status, payload)
    if response.status == 400:
        assert isinstance(payload["error"], str)
    elif path != "/v1/explain":
        assert payload in ([], REJECT)
