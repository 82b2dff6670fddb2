"""The OpenAPI document at /v1/openapi.json matches the app's routes, and the answers match it.

The second check runs schemathesis (its command line, in a subprocess) against a live
test server: every operation is called with generated valid and invalid inputs, and
each answer must be documented (status, content type, headers, body schema) and never
a 5xx. Two of its checks are left out on purpose:

- ``negative_data_rejection``: the screening endpoints accept any JSON object (odd
  shapes inside mean "caller unknown", SPEC §6), which is wider than the documented
  SIP header shape;
- ``positive_data_acceptance``: whether an entry is valid depends on the list's kind
  (number, prefix, CNAM), which a path-parameter schema cannot say.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from core.config import Config
from service.app import create_app
from tests.helpers import load_list

TOKEN = "tok-0123456789abcdef"
CONFIG: dict[str, Any] = {
    "lists": {
        "blocklist": {"kind": "numbers"},
        "premium": {"kind": "prefixes"},
        "cnam": {"kind": "names"},
    },
    "policies": {
        "default": {
            "rules": [{"name": "blocklist", "match": "caller_in_list", "list": "blocklist"}]
        }
    },
    "trunk_groups": {"main": {"policy": "default"}},
}


def routes(app: web.Application) -> set[tuple[str, str]]:
    found = set()
    for resource in app.router.resources():
        for route in resource:
            # aiohttp adds HEAD to every GET; "*" is the 404/405 catch-all (service/errors.py)
            if route.method not in ("HEAD", "*"):
                found.add((route.method.lower(), resource.canonical))
    return found


async def test_every_route_is_documented_and_every_documented_route_exists(
    monkeypatch: pytest.MonkeyPatch,
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
) -> None:
    monkeypatch.setenv("CALLSCREEN_ADMIN_TOKENS", TOKEN)
    config = make_config(CONFIG)
    app = create_app(config, registry=CollectorRegistry())
    client = await make_client(config, redis_client=redis)
    document = await (await client.get("/v1/openapi.json")).json()
    assert document["openapi"].startswith("3.")
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert documented == routes(app)
    # The deployment's names are in it.
    lists = document["paths"]["/v1/lists/{name}"]["get"]["parameters"][0]["schema"]["enum"]
    assert lists == ["blocklist", "cnam", "premium"]
    tg = document["paths"]["/tg/{trunk_group}"]["post"]["parameters"][0]["schema"]["enum"]
    assert tg == ["main"]


async def test_schemathesis_finds_every_answer_documented(
    monkeypatch: pytest.MonkeyPatch,
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
) -> None:
    monkeypatch.setenv("CALLSCREEN_ADMIN_TOKENS", TOKEN)
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    client = await make_client(make_config(CONFIG), redis_client=redis)
    url = str(client.make_url("/v1/openapi.json"))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from schemathesis.cli import schemathesis; schemathesis()",
        "run",
        url,
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--checks",
        "all",
        "--exclude-checks",
        "negative_data_rejection,positive_data_acceptance",
        "--max-examples",
        "10",
        "--seed",
        "20240501",
        "--generation-database",
        "none",
        "--no-color",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=100)
    report = out.decode()
    assert process.returncode == 0, report
    assert "15 selected / 15 total" in report
