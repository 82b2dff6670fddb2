"""Handler authentication: shared secret, HTTP Basic, source-IP allow list, per trunk group."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import encode_basic_auth
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from core.build import start_build
from core.config import Config, ConfigError, load_config
from service.app import create_app
from service.edge.auth import HandlerAuth
from service.metrics import Metrics
from tests.helpers import REJECT, ServiceTestServer, body_from

SECRET = "s3cret-Handler-Key-0123456789"
WRONG_SAME_LENGTH = "s3cret-Handler-Key-0123456780"
PASSWORD = "Basic-Pass-42"
BLOCKED = "15162065613"
Client = TestClient[Any, Any]
Start = Callable[..., Awaitable[Client]]


def auth_config(auth: dict[str, Any] | None = None, **groups: dict[str, Any]) -> dict[str, Any]:
    trunk_groups: dict[str, Any] = {"main": {"policy": "default"}}
    for name, group_auth in groups.items():
        trunk_groups[name] = {"policy": "default", "auth": group_auth}
    return {
        "lists": {"blocklist": {"kind": "numbers"}},
        "policies": {
            "default": {
                "rules": [{"name": "blocklist", "match": "caller_in_list", "list": "blocklist"}]
            }
        },
        "trunk_groups": trunk_groups,
        "auth": auth or {},
    }


@pytest.fixture
async def start(
    redis: Redis,
    make_config: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Start]:
    """Serve a config the way ``python -m service`` does (no access log) on a real port."""
    monkeypatch.setenv("TEST_HANDLER_SECRET", SECRET)
    monkeypatch.setenv("TEST_BASIC_PASSWORD", PASSWORD)
    # Explain answers to admin tokens when they are set; these tests are about the other.
    monkeypatch.delenv("CALLSCREEN_ADMIN_TOKENS", raising=False)
    builder = await start_build(redis, "blocklist", "numbers")
    await builder.add([BLOCKED])
    await builder.finish()
    await builder.commit({"source": "test"})
    clients: list[Client] = []

    async def make(data: dict[str, Any]) -> Client:
        app = create_app(make_config(data), redis=redis, registry=CollectorRegistry())
        server = ServiceTestServer(app)
        await server.start_server(access_log=None)
        client: Client = TestClient(server)
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def post(client: Client, path: str, **kwargs: Any) -> tuple[int, Any]:
    response = await client.post(path, json=body_from(BLOCKED), **kwargs)
    return response.status, await response.json()


async def errors(client: Client, kind: str) -> float:
    text = await (await client.get("/metrics")).text()
    line = f'callscreen_errors_total{{kind="{kind}"}} '
    return float(next(ln for ln in text.splitlines() if ln.startswith(line)).split()[-1])


async def test_auth_is_off_by_default(start: Start) -> None:
    client = await start(auth_config())
    assert await post(client, "/tg/main") == (200, REJECT)
    assert await post(client, "/") == (200, REJECT)
    # The secret path form answers too, whatever the segment, when no secret is set.
    assert await post(client, "/k/anything/tg/main") == (200, REJECT)


async def test_shared_secret_in_path_or_query(start: Start) -> None:
    client = await start(auth_config({"secret_env": "TEST_HANDLER_SECRET"}))
    assert await post(client, f"/k/{SECRET}/tg/main") == (200, REJECT)
    assert await post(client, f"/k/{SECRET}") == (200, REJECT)
    assert await post(client, f"/tg/main?key={SECRET}") == (200, REJECT)

    for path in (
        "/tg/main",
        "/",
        f"/k/{WRONG_SAME_LENGTH}/tg/main",
        f"/tg/main?key={WRONG_SAME_LENGTH}",
        f"/k/{SECRET[:-1]}/tg/main",
        f"/k/{WRONG_SAME_LENGTH}/tg/main?key={SECRET}",  # the path secret is the one judged
    ):
        status, body = await post(client, path)
        assert status == 401, path
        assert body == {"error": "unauthorized: missing or wrong credentials"}
    assert await errors(client, "unauthorized") == 6


async def test_rotation_accepts_each_listed_secret(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_HANDLER_SECRET", f"new-secret-1, {SECRET}")
    client = await start(auth_config({"secret_env": "TEST_HANDLER_SECRET"}))
    assert (await post(client, "/k/new-secret-1/tg/main"))[0] == 200
    assert (await post(client, f"/k/{SECRET}/tg/main"))[0] == 200
    assert (await post(client, "/k/new-secret-2/tg/main"))[0] == 401


async def test_basic_credentials(start: Start) -> None:
    client = await start(
        auth_config({"basic_user": "carrierx", "basic_password_env": "TEST_BASIC_PASSWORD"})
    )
    good = {"Authorization": encode_basic_auth("carrierx", PASSWORD)}
    assert await post(client, "/tg/main", headers=good) == (200, REJECT)
    # CarrierX is given the credentials inside the handler URL.
    url = client.make_url("/tg/main").with_user("carrierx").with_password(PASSWORD)
    response = await client.session.post(url, json=body_from(BLOCKED))
    assert (response.status, await response.json()) == (200, REJECT)

    wrong = PASSWORD[:-1] + "3"
    headers: list[dict[str, str]] = [
        {"Authorization": encode_basic_auth("carrierx", wrong)},
        {"Authorization": encode_basic_auth("carrierX", PASSWORD)},
        {"Authorization": "Basic not-base64!"},
        {"Authorization": f"Bearer {PASSWORD}"},
        {},
    ]
    for sent in headers:
        response = await client.post("/tg/main", json=body_from(BLOCKED), headers=sent)
        assert response.status == 401, sent
        assert response.headers["WWW-Authenticate"].startswith('Basic realm="callscreen"')
        assert (await response.json())["error"].startswith("unauthorized")
    # A shared secret is no use where only Basic is configured.
    assert (await post(client, f"/tg/main?key={PASSWORD}"))[0] == 401


async def test_source_address_allow_list(start: Start) -> None:
    closed = await start(auth_config({"allow_cidrs": ["10.0.0.0/8", "2001:db8::/32"]}))
    status, body = await post(closed, "/tg/main")
    assert status == 403
    assert body == {"error": "forbidden: source address 127.0.0.1 not allowed"}
    assert await errors(closed, "forbidden") == 1
    # X-Forwarded-For from a peer that is not a trusted proxy proves nothing.
    assert (await post(closed, "/tg/main", headers={"X-Forwarded-For": "10.1.2.3"}))[0] == 403

    open_ = await start(auth_config({"allow_cidrs": ["127.0.0.0/8"]}))
    assert await post(open_, "/tg/main") == (200, REJECT)


async def test_forwarded_for_is_trusted_only_from_configured_proxies(start: Start) -> None:
    client = await start(
        auth_config(
            {"allow_cidrs": ["203.0.113.0/24"], "trusted_proxies": ["127.0.0.1", "10.0.0.0/8"]}
        )
    )
    cases = {
        "203.0.113.7": 200,
        "198.51.100.1": 403,
        # The caller wrote the left-most hop itself; the right-most untrusted one counts.
        "203.0.113.7, 198.51.100.1": 403,
        "198.51.100.1, 203.0.113.7": 200,
        # A chain of trusted proxies is walked through to the caller.
        "203.0.113.9, 10.4.5.6": 200,
        "203.0.113.9:5060, 10.4.5.6": 200,
        "garbage, 203.0.113.9": 200,
        "203.0.113.9, garbage": 403,
    }
    for forwarded, expected in cases.items():
        status, _ = await post(client, "/tg/main", headers={"X-Forwarded-For": forwarded})
        assert status == expected, forwarded
    # No header at all: the trusted proxy itself is the caller, and not allowed.
    assert (await post(client, "/tg/main"))[0] == 403


async def test_allow_list_and_secret_both_apply(start: Start) -> None:
    client = await start(
        auth_config({"secret_env": "TEST_HANDLER_SECRET", "allow_cidrs": ["127.0.0.1/32"]})
    )
    assert (await post(client, f"/k/{SECRET}/tg/main"))[0] == 200
    assert (await post(client, "/tg/main"))[0] == 401
    other = await start(
        auth_config({"secret_env": "TEST_HANDLER_SECRET", "allow_cidrs": ["10.0.0.0/8"]})
    )
    assert (await post(other, f"/k/{SECRET}/tg/main"))[0] == 403


async def test_trunk_group_auth_replaces_the_global_block(start: Start) -> None:
    # Open globally, one trunk group locked.
    client = await start(auth_config(secure={"secret_env": "TEST_HANDLER_SECRET"}))
    assert (await post(client, "/tg/main"))[0] == 200
    assert (await post(client, "/tg/secure"))[0] == 401
    assert (await post(client, f"/k/{SECRET}/tg/secure"))[0] == 200

    # Locked globally, one trunk group opened with an empty block.
    client = await start(auth_config({"secret_env": "TEST_HANDLER_SECRET"}, public={}))
    assert (await post(client, "/tg/public"))[0] == 200
    assert (await post(client, "/tg/main"))[0] == 401
    # Unknown trunk groups are behind the global block: no probing for names.
    assert (await post(client, "/tg/nosuch"))[0] == 401
    status, body = await post(client, f"/k/{SECRET}/tg/nosuch")
    assert status == 404
    assert "nosuch" in body["error"]


async def test_explain_is_behind_the_same_auth(start: Start) -> None:
    client = await start(auth_config({"secret_env": "TEST_HANDLER_SECRET"}))
    assert (await post(client, "/v1/explain/tg/main"))[0] == 401
    status, body = await post(client, f"/v1/explain/tg/main?key={SECRET}")
    assert status == 200
    assert body["rule"] == "blocklist"
    # Health and readiness probes stay open for the orchestrator.
    assert (await client.get("/healthz")).status == 200


async def test_secret_never_reaches_logs_metrics_or_error_bodies(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    client = await start(auth_config({"secret_env": "TEST_HANDLER_SECRET"}))
    caplog.set_level(logging.DEBUG)
    bodies = []
    for path in (
        f"/k/{WRONG_SAME_LENGTH}/tg/main",
        f"/tg/main?key={WRONG_SAME_LENGTH}",
        f"/k/{SECRET}/tg/nosuch",  # logged as an unknown trunk group
        f"/k/{SECRET}/tg/main/extra",  # no such endpoint
        f"/k/{SECRET}/tg/main?key={SECRET}",
    ):
        response = await client.post(path, data=b"{not json")
        bodies.append(await response.text())
    for path in (f"/k/{SECRET}/tg/main", f"/tg/main?key={SECRET}", "/tg/main"):
        await client.post(path, json=body_from(BLOCKED))
    metrics = await (await client.get("/metrics")).text()
    assert "unknown trunk group 'nosuch'" in caplog.text  # the log did capture the requests
    for leaked in (SECRET, WRONG_SAME_LENGTH):
        assert leaked not in caplog.text
        assert leaked not in metrics
    assert not any(WRONG_SAME_LENGTH in body for body in bodies)
    assert "/k/***/tg/main/extra" in bodies[3]


def test_unset_secret_variable_stops_start_up(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TEST_UNSET_SECRET", raising=False)
    config = make_config(auth_config(secure={"secret_env": "TEST_UNSET_SECRET"}))
    with pytest.raises(ConfigError) as caught:
        create_app(config, registry=CollectorRegistry())
    assert str(caught.value) == (
        "config: trunk_groups.secure.auth.secret_env: "
        "environment variable TEST_UNSET_SECRET is not set or empty"
    )


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ({"basic_user": "carrierx"}, "auth: Value error, give both basic_user and"),
        ({"allow_cidrs": ["10.0.0.1/8"]}, "auth.allow_cidrs[0]: value is not a valid IPv4"),
        ({"secret_env": "not a name"}, "auth.secret_env: String should match pattern"),
        ({"secret": "inline"}, "auth.secret: Extra inputs are not permitted"),
    ],
)
def test_bad_auth_settings_are_named(
    make_config: Callable[..., Config], auth: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config(auth_config(auth))
    assert message in str(caught.value)


def test_production_example_turns_handler_auth_on(monkeypatch: pytest.MonkeyPatch) -> None:
    example = Path(__file__).resolve().parent.parent / "deploy" / "config.production.yaml"
    monkeypatch.delenv("CALLSCREEN_REDIS_URL", raising=False)
    config = load_config(example)
    assert config.auth.enabled
    monkeypatch.setenv("CALLSCREEN_HANDLER_SECRET", SECRET)
    monkeypatch.setenv("CALLSCREEN_HANDLER_PASSWORD", PASSWORD)
    auth = HandlerAuth(config, Metrics(config, CollectorRegistry()))
    assert auth.enabled
    assert auth.default.secrets and auth.default.basic
