"""The OpenAPI document at /v1/openapi.json matches the app's routes, and the answers match it.

The schemathesis test runs its command line, in a subprocess, against a live test server
with a new random seed each run (printed, and named in the failure, to replay one): every
operation is called with generated valid and invalid inputs, then in stateful sequences
(add an entry, read it, delete it, read it again...). Every check runs: each answer must
be documented (status, content type, headers, body schema) and never a 5xx, a deleted
entry must be gone (404) and an added one there, a request the document calls invalid
must be refused and a valid one accepted. Two checks are off for some operations only,
where the document cannot say what the service does (:data:`SETTINGS`):

- invalid requests refused, off for screening and explain: those take any JSON object
  and screen what they understand (a header of an odd shape counts as missing, the
  caller as unknown), since CarrierX must get an answer, not a 400; the document shows
  the SIP header shape CarrierX sends;
- valid requests accepted, off for the entry and subscriber routes: whether an entry or
  a subscriber is valid depends on the list's kind and, for numbers, on the numbering
  plan, which a schema cannot say, so many a well-formed string is answered 400.

And one accommodation: writes name an entry by its canonical spelling (:func:`before_call`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pytest
import schemathesis
from aiohttp import web
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from core.config import Config
from core.entries import BadEntry, canonical
from core.store import ListMeta
from service.app import create_app
from service.operator import models as api_models
from tests.helpers import load_list

TOKEN = "tok-0123456789abcdef"
#: Test cases per operation and phase: about 15 s on two busy cores.
EXAMPLES = 50
#: Every check runs, but these two where the document cannot say what they need (see the
#: module docstring); :func:`before_call` is loaded from here.
SETTINGS = (
    f'hooks = "{__name__}"\n'
    + """
[[operations]]
include-tag = "screening"
checks.negative_data_rejection.enabled = false

[[operations]]
include-path-regex = "^/v1/lists/[{]name[}]/(entries|subscribers)"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-path-regex = "^/v1/(history|lookup)"
checks.positive_data_acceptance.enabled = false
"""
)
ENTRY_PATH = "/v1/lists/{name}/entries/{entry}"
CONFIG: dict[str, Any] = {
    "lists": {
        "blocklist": {"kind": "numbers"},
        "premium": {"kind": "prefixes"},
        "cnam": {"kind": "names"},
        "personal": {"kind": "subscribers"},
    },
    "policies": {
        "default": {
            "rules": [{"name": "blocklist", "match": "caller_in_list", "list": "blocklist"}]
        }
    },
    "trunk_groups": {"main": {"policy": "default"}},
}


@schemathesis.hook
def before_call(ctx: Any, case: Any, **kwargs: Any) -> None:
    """In the schemathesis process: ``PUT`` and ``DELETE`` name an entry by its canonical form.

    Two spellings of an entry are one resource to the service (``ABC`` and ``abc`` on a
    names list), which schemathesis cannot know: deleting ``abc``, adding ``ABC`` back
    and reading ``abc`` would look to it like a deleted resource still there. Reads keep
    whatever spelling was generated.
    """
    params = case.path_parameters or {}  # percent-encoded by now
    kind = CONFIG["lists"].get(params.get("name"), {}).get("kind")
    if case.method in ("PUT", "DELETE") and case.operation.path == ENTRY_PATH and kind:
        with contextlib.suppress(BadEntry):
            entry = canonical(kind, unquote(params["entry"]))
            case.path_parameters = {**params, "entry": quote(entry, safe="")}


def routes(app: web.Application) -> set[tuple[str, str]]:
    found = set()
    for resource in app.router.resources():
        for route in resource:
            # aiohttp adds HEAD to every GET; "*" is the 404/405 catch-all (service/edge/errors.py)
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
    # The deployment's names are in it, each list where its kind is taken.
    paths = document["paths"]

    def names(path: str, method: str = "get") -> list[str]:
        enum: list[str] = paths[path][method]["parameters"][0]["schema"]["enum"]
        return enum

    assert names("/v1/lists/{name}") == ["blocklist", "cnam", "personal", "premium"]
    assert names("/v1/lists/{name}/entries/{entry}") == ["blocklist", "cnam", "premium"]
    assert names("/v1/lists/{name}/subscribers/{subscriber}") == ["personal"]
    tg = document["paths"]["/tg/{trunk_group}"]["post"]["parameters"][0]["schema"]["enum"]
    assert tg == ["main"]
    # Every model it names is in it.
    schemas = document["components"]["schemas"]
    refs = {ref.rsplit("/", 1)[1] for ref in _refs(document)}
    assert refs <= set(schemas), refs - set(schemas)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [node["$ref"]] if "$ref" in node else [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_the_documented_list_meta_is_what_the_store_reads() -> None:
    """A field the store adds to ``ListMeta`` must be documented (and answered) too."""
    stored = {f.name for f in dataclasses.fields(ListMeta)} - {"name", "kind"}
    assert set(api_models.ListMeta.model_fields) == stored


async def test_schemathesis_finds_every_answer_documented(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
) -> None:
    monkeypatch.setenv("CALLSCREEN_ADMIN_TOKENS", TOKEN)
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    client = await make_client(make_config(CONFIG), redis_client=redis)
    url = str(client.make_url("/v1/openapi.json"))
    seed = random.randrange(2**32)
    print(f"schemathesis --seed {seed}")  # shown with the test's output, pass or fail
    settings = tmp_path / "schemathesis.toml"
    settings.write_text(SETTINGS)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from schemathesis.cli import schemathesis; schemathesis()",
        "--config-file",
        str(settings),
        "run",
        url,
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--max-examples",
        str(EXAMPLES),
        "--seed",
        str(seed),
        "--generation-database",
        "none",
        "--no-color",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=Path(__file__).parents[1],  # where it imports this module from, for its hook
    )
    # The export route reads every bucket of a subscribers list (16,384 keys) per call:
    # the slowest route here, on two shared cores.
    out, _ = await asyncio.wait_for(process.communicate(), timeout=110)
    report = out.decode()
    print(report)
    assert process.returncode == 0, f"schemathesis --seed {seed} failed:\n{report}"
    assert "29 selected / 29 total" in report
