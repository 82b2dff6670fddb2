"""aiohttp's internals sit behind one module, and the service falls back without them.

The service must keep answering when aiohttp changes: a version outside the known range
or a missing attribute switches it to aiohttp's public API (``auto``), or stops it from
starting (``on``); and no module but service/edge/aiohttp_adapter.py touches an aiohttp
private name, so an upgrade is checked in one place.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import subprocess
import sys
import tokenize
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from core.config import Config
from service.app import create_app
from service.appkeys import INTERNALS
from service.edge import aiohttp_adapter
from service.edge.aiohttp_adapter import (
    ENV,
    InternalsUnavailable,
    missing_internals,
    resolve,
)
from service.edge.answers import ScreeningAnswer
from service.edge.dispatch import ScreeningDispatch
from tests.helpers import REJECT, ServiceTestServer, body_from, load_list

ROOT = Path(__file__).resolve().parent.parent
ADAPTER = ROOT / "service" / "edge" / "aiohttp_adapter.py"

#: The aiohttp private names the service used before the adapter existed, and the
#: ones the adapter reads: none may appear as an attribute outside it. (Not
#: ``Application._handle``: loader/sources.py has a ``_handle`` of its own; the server's
#: ``request_handler`` that holds it is listed.)
AIOHTTP_PRIVATE = frozenset(
    {
        "_state", "_headers", "_payload_writer", "_eof_sent", "_req", "_body_length",
        "_keep_alive", "_match_info", "_make_server", "request_handler", "_messages",
        "_request_count", "_next_keepalive_close_time", "_keepalive_timeout",
        "_current_request", "_request_in_progress", "_connections", "_kwargs",
        "_prepare_hook", "_payload_parser", "_task_handler",
    }
)  # fmt: skip

CONFIG: dict[str, Any] = {
    "lists": {"blocklist": {"kind": "numbers"}},
    "policies": {
        "default": {
            "rules": [{"name": "blocklist", "match": "caller_in_list", "list": "blocklist"}]
        }
    },
    "trunk_groups": {"main": {"policy": "default"}},
}


def _attributes(path: Path) -> set[tuple[str, int]]:
    """Attribute names (``x.name``) in the code of ``path``, with their line numbers."""
    found = set()
    tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
    for before, token in itertools.pairwise(tokens):
        if before.string == "." and token.type == tokenize.NAME:
            found.add((token.string, token.start[0]))
    return found


def test_no_module_outside_the_adapter_touches_aiohttp_private_names() -> None:
    offenders = []
    for folder in ("service", "core", "loader"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ADAPTER:
                continue
            for name, line in sorted(_attributes(path)):
                if name in AIOHTTP_PRIVATE:
                    offenders.append(f"{path.relative_to(ROOT)}:{line}: .{name}")
    assert offenders == []
    # The scan does see them where they are.
    assert {"_match_info", "_messages", "_payload_writer"} <= {n for n, _ in _attributes(ADAPTER)}


@pytest.mark.parametrize(
    ("version", "known"),
    [("3.14.5", True), ("3.14.9", True), ("3.14.4", False), ("3.15.0", False), ("4.0.0a1", False)],
)
def test_the_version_range(version: str, known: bool) -> None:
    reason = missing_internals(version)
    if known:
        assert reason is None or "outside" not in reason
    else:
        assert reason is not None and f"aiohttp {version} is outside" in reason


def test_a_missing_attribute_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    class OlderRequestHandler:  # an aiohttp whose protocol lost two attributes
        __slots__ = ("_current_request", "_keepalive_timeout", "_request_count")

    monkeypatch.setattr(aiohttp_adapter, "RequestHandler", OlderRequestHandler)
    reason = missing_internals("3.14.5")
    assert reason is not None
    assert "RequestHandler._messages" in reason and "_next_keepalive_close_time" in reason
    assert "_request_count" not in reason


def test_auto_falls_back_and_says_why_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(aiohttp, "__version__", "3.99.0")
    monkeypatch.setattr(aiohttp_adapter, "_logged", set())
    with caplog.at_level(logging.INFO, logger=aiohttp_adapter.__name__):
        first = resolve("auto", {})
        again = resolve("auto", {})
    assert not first.enabled and not again.enabled
    assert "3.99.0" in first.reason
    said = [r for r in caplog.records if "public API" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO


def test_on_refuses_to_start_without_the_internals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiohttp, "__version__", "3.99.0")
    with pytest.raises(InternalsUnavailable, match=r"3\.99\.0"):
        resolve("on", {})


def test_the_environment_overrides_the_config() -> None:
    assert not resolve("on", {ENV: "off"}).enabled
    assert resolve("off", {ENV: "auto"}).enabled == (missing_internals() is None)
    with pytest.raises(ValueError, match=ENV):
        resolve("auto", {ENV: "sometimes"})


async def _answers_of(app: web.Application) -> tuple[object, web.StreamResponse, int, Any]:
    server = ServiceTestServer(app)
    await server.start_server(access_log=None)
    try:
        assert server.runner is not None
        handler = aiohttp_adapter.request_handler(server.runner)
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{server.port}/tg/main"
            async with session.post(url, json=body_from("15162065613")) as answer:
                return handler, answer, answer.status, await answer.json()  # type: ignore[return-value]
    finally:
        await server.close()


@pytest.mark.parametrize("why", ["version", "switched off"])
async def test_without_internals_the_service_answers_through_the_public_api(
    redis: Redis,
    make_config: Any,
    monkeypatch: pytest.MonkeyPatch,
    why: str,
) -> None:
    await load_list(redis, "blocklist", "numbers", ["15162065613"])
    data = dict(CONFIG)
    monkeypatch.delenv(ENV, raising=False)
    if why == "version":
        monkeypatch.setattr(aiohttp, "__version__", "3.99.0")
    else:
        data["server"] = {"aiohttp_internals": "off"}
    config: Config = make_config(data)
    app = create_app(config, redis=redis, registry=CollectorRegistry())
    assert not app[INTERNALS].enabled
    handler, _answer, status, body = await _answers_of(app)
    assert not isinstance(handler, ScreeningDispatch)  # aiohttp's router took the call
    assert status == 200 and body == REJECT


async def test_with_internals_the_fast_paths_are_in_use(
    redis: Redis, make_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    if missing_internals() is not None:
        pytest.skip(f"this aiohttp has no known internals: {missing_internals()}")
    monkeypatch.delenv(ENV, raising=False)
    await load_list(redis, "blocklist", "numbers", ["15162065613"])
    app = create_app(make_config(CONFIG), redis=redis, registry=CollectorRegistry())
    assert app[INTERNALS].enabled
    handler, _answer, status, body = await _answers_of(app)
    assert isinstance(handler, ScreeningDispatch)
    assert status == 200 and body == REJECT
    assert issubclass(ScreeningAnswer, aiohttp_adapter.WholeAnswer)


def test_the_service_refuses_to_start_when_on_and_the_internals_are_missing(
    tmp_path: Path,
) -> None:
    """``on`` with an aiohttp the adapter does not know: exit 2 with the reason, at once."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "server:\n  aiohttp_internals: 'on'\n  port: 0\n"
        "redis:\n  url: redis://127.0.0.1:1/0\n"
        "lists: {}\npolicies: {default: {rules: []}}\n"
        "trunk_groups: {main: {policy: default}}\n"
    )
    # A stand-in newer aiohttp: sitecustomize raises the version before the service runs.
    (tmp_path / "sitecustomize.py").write_text("import aiohttp\naiohttp.__version__ = '3.99.0'\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    env.pop(ENV, None)
    done = subprocess.run(
        [sys.executable, "-m", "service", "--config", str(config), "--workers", "1"],
        capture_output=True, text=True, timeout=60, env=env, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "3.99.0" in done.stderr and "aiohttp_internals is on" in done.stderr
