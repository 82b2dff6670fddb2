"""The admin API: tokens, listing lists, single and bulk changes, errors, 1 s visibility."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core import keys
from core.config import Config
from core.store import STAGE_OVER, ListStore
from service.appkeys import CACHE
from tests.helpers import REJECT, body_from, load_list, wait_for

TOKEN = "tok-0123456789abcdef"
OTHER_TOKEN = "second-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ADMIN_CONFIG: dict[str, Any] = {
    "lists": {
        "blocklist": {"kind": "numbers", "description": "robocallers"},
        "premium": {"kind": "prefixes"},
        "cnam": {"kind": "names"},
    },
    "policies": {
        "default": {
            "rules": [
                {"name": "blocklist", "match": "caller_in_list", "list": "blocklist"},
                {"name": "premium", "match": "caller_prefix_in_list", "list": "premium"},
            ]
        }
    },
}
Client = TestClient[Any, Any]


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLSCREEN_ADMIN_TOKENS", f"{TOKEN}, {OTHER_TOKEN}")


@pytest.fixture
async def admin(
    tokens: None, redis: Redis, make_config: Callable[..., Config], make_client: Callable[..., Any]
) -> Client:
    client: Client = await make_client(make_config(ADMIN_CONFIG), redis_client=redis)
    return client


async def errors_counted(client: Client, kind: str) -> float:
    text = await (await client.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith(f'callscreen_errors_total{{kind="{kind}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no errors_total for {kind}")


async def test_tokens_missing_wrong_and_rotated(admin: Client) -> None:
    response = await admin.get("/v1/lists")
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in (await response.json())["error"]
    basic = await admin.get("/v1/lists", headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert basic.status == 401
    wrong = await admin.get("/v1/lists", headers={"Authorization": "Bearer nope"})
    assert wrong.status == 403
    assert await wrong.json() == {"error": "invalid admin token"}
    for token in (TOKEN, OTHER_TOKEN):  # either of the configured tokens
        ok = await admin.get("/v1/lists", headers={"Authorization": f"bearer {token}"})
        assert ok.status == 200
    assert await errors_counted(admin, "unauthorized") == 2
    assert await errors_counted(admin, "forbidden") == 1


async def test_without_tokens_the_admin_api_is_off_and_explain_is_open(
    monkeypatch: pytest.MonkeyPatch,
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
) -> None:
    monkeypatch.delenv("CALLSCREEN_ADMIN_TOKENS", raising=False)
    client: Client = await make_client(make_config(ADMIN_CONFIG), redis_client=redis)
    response = await client.get("/v1/lists", headers=AUTH)
    assert response.status == 403
    assert await response.json() == {"error": "admin API disabled: set CALLSCREEN_ADMIN_TOKENS"}
    assert (await client.post("/v1/explain", json=body_from("15162065613"))).status == 200
    assert (await client.get("/v1/openapi.json")).status == 200


async def test_explain_needs_the_admin_token_once_tokens_are_configured(admin: Client) -> None:
    body = body_from("15162065613")
    assert (await admin.post("/v1/explain", json=body)).status == 401
    assert (
        await admin.post("/v1/explain", json=body, headers={"Authorization": "Bearer x"})
    ).status == 403
    response = await admin.post("/v1/explain", json=body, headers=AUTH)
    assert response.status == 200
    assert (await response.json())["decision"] == "allow"
    assert (await admin.get("/v1/openapi.json")).status == 200  # the document needs no token


async def test_lists_are_listed_with_their_metadata(admin: Client, redis: Redis) -> None:
    await load_list(redis, "blocklist", "numbers", ["5162065613", "5162065614"])
    await ListStore(redis).change("blocklist", "numbers", add=["15162065699"])

    async def loaded() -> bool:
        body = await (await admin.get("/v1/lists/blocklist", headers=AUTH)).json()
        return bool(body["loaded"] and body["loaded"]["entries"] == 3)

    await wait_for(loaded)
    response = await admin.get("/v1/lists", headers=AUTH)
    assert response.status == 200
    lists = {item["name"]: item for item in (await response.json())["lists"]}
    assert list(lists) == ["blocklist", "premium", "cnam"]
    blocklist = lists["blocklist"]
    assert (blocklist["kind"], blocklist["description"]) == ("numbers", "robocallers")
    meta = blocklist["meta"]
    assert (meta["size"], meta["pending_adds"], meta["source"]) == (2, 1, "test")
    assert meta["checksum"].startswith("sha256:") and meta["version"] == 2
    assert meta["synced_at"] > 0 and meta["accepted_at"] == 0  # never `loader accept`ed
    assert blocklist["loaded"]["entries"] == 3
    assert lists["premium"]["meta"] is None  # never written


async def test_unknown_list_bad_name_and_bad_entry_are_clear_json_errors(admin: Client) -> None:
    unknown = await admin.get("/v1/lists/nope", headers=AUTH)
    assert unknown.status == 404
    assert await unknown.json() == {
        "error": "unknown list 'nope'; configured lists: blocklist, premium, cnam"
    }
    bad_name = await admin.put("/v1/lists/Block%20List/entries/15162065613", headers=AUTH)
    assert bad_name.status == 400 and "invalid list name" in (await bad_name.json())["error"]
    bad_entry = await admin.put("/v1/lists/blocklist/entries/not-a-number", headers=AUTH)
    assert bad_entry.status == 400
    assert await bad_entry.json() == {
        "error": "bad entry for a numbers list: not a telephone number: 'not-a-number'",
        "entry": "not-a-number",
    }
    assert (await admin.post("/v1/lists/blocklist/entries", data=b"{", headers=AUTH)).status == 400


async def test_single_entries_are_canonicalised_checked_added_and_removed(
    admin: Client, redis: Redis
) -> None:
    url = "/v1/lists/blocklist/entries/"
    check = await admin.get(url + "+1%20(516)%20206-5613", headers=AUTH)
    assert check.status == 404  # not there, like any resource that is not
    assert await check.json() == {
        "list": "blocklist", "entry": "15162065613", "listed": False, "error": "not on the list"
    }  # fmt: skip
    added = await admin.put(url + "5162065613", headers=AUTH)
    assert added.status == 200
    body = await added.json()
    assert (body["entry"], body["listed"]) == ("15162065613", True) and body["version"] >= 1
    # Acknowledged means in Redis already.
    assert await ListStore(redis).contains("blocklist", "numbers", "15162065613")
    listed = await admin.get(url + "15162065613", headers=AUTH)
    assert listed.status == 200
    assert await listed.json() == {"list": "blocklist", "entry": "15162065613", "listed": True}
    removed = await admin.delete(url + "tel:+15162065613", headers=AUTH)
    assert removed.status == 200 and (await removed.json())["listed"] is False
    assert not await ListStore(redis).contains("blocklist", "numbers", "15162065613")
    gone = await admin.get(url + "15162065613", headers=AUTH)
    assert gone.status == 404 and (await gone.json())["listed"] is False
    again = await admin.delete(url + "15162065613", headers=AUTH)  # idempotent
    assert again.status == 200 and (await again.json())["listed"] is False
    name = await admin.put("/v1/lists/cnam/entries/Contains:Warranty", headers=AUTH)
    assert (await name.json())["entry"] == "contains:warranty"


async def test_bulk_changes_are_all_or_nothing(admin: Client, redis: Redis) -> None:
    url = "/v1/lists/blocklist/entries"
    bad = await admin.post(
        url,
        json={"add": ["5162065613", "junk", 5], "remove": ["15162065614", "tel:"]},
        headers=AUTH,
    )
    assert bad.status == 400
    body = await bad.json()
    assert body["error"] == "3 bad entries; nothing was changed"
    assert [(b["field"], b["index"]) for b in body["bad_entries"]] == [
        ("add", 1),
        ("add", 2),
        ("remove", 1),
    ]
    store = ListStore(redis)
    assert await store.meta("blocklist") is None  # nothing written at all
    both = await admin.post(
        url, json={"add": ["5162065613"], "remove": ["15162065613"]}, headers=AUTH
    )
    assert both.status == 400 and (await both.json())["entries"] == ["15162065613"]
    assert (await admin.post(url, json={"add": []}, headers=AUTH)).status == 400
    assert (await admin.post(url, json={"drop": []}, headers=AUTH)).status == 400
    ok = await admin.post(
        url,
        json={"add": ["5162065613", "+1 516 206 5614"], "remove": ["15162065699"]},
        headers=AUTH,
    )
    assert ok.status == 200
    assert await ok.json() == {"list": "blocklist", "added": 2, "removed": 1, "version": 1}
    assert await store.contains("blocklist", "numbers", "15162065614")


async def test_a_bulk_body_of_the_wrong_shape_is_told_what_is_wrong(admin: Client) -> None:
    url = "/v1/lists/blocklist/entries"
    shape = 'the body must be an object with "add" and/or "remove" arrays'
    nothing = 'nothing to change: give "add" and/or "remove" entries'
    refusals = {
        b"{": "request body is not valid JSON: ",
        b"[]": shape,
        b'{"drop": []}': shape,
        b'{"add": "15162065613", "drop": []}': shape,
        b'{"add": "15162065613"}': '"add" must be an array of strings',
        b'{"remove": null}': '"remove" must be an array of strings',
        b"{}": nothing,
        b'{"add": [], "remove": []}': nothing,
    }
    for body, error in refusals.items():
        response = await admin.post(url, data=body, headers=AUTH)
        assert response.status == 400, body
        assert (await response.json())["error"].startswith(error), body
    # Items that are not strings are bad entries, reported by index like the others.
    odd = await admin.post(url, json={"remove": [None, 15162065613]}, headers=AUTH)
    assert odd.status == 400
    assert await odd.json() == {
        "error": "2 bad entries; nothing was changed",
        "bad_entries": [
            {"field": "remove", "index": 0, "error": "not a string"},
            {"field": "remove", "index": 1, "error": "not a string"},
        ],
    }


async def test_too_large_a_bulk_change_is_refused(
    tokens: None,
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
) -> None:
    config = make_config({**ADMIN_CONFIG, "admin": {"max_bulk_entries": 2, "max_body_bytes": 200}})
    client: Client = await make_client(config, redis_client=redis)
    url = "/v1/lists/blocklist/entries"
    many = await client.post(url, json={"add": ["5162065613"] * 3}, headers=AUTH)
    assert many.status == 413 and "at most 2" in (await many.json())["error"]
    big = await client.post(url, json={"add": ["5162065613" * 30]}, headers=AUTH)
    assert big.status == 413


async def test_an_admin_change_reaches_every_instance_within_a_second(
    tokens: None,
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
) -> None:
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    config = make_config(ADMIN_CONFIG)
    first: Client = await make_client(config, redis_client=redis)
    second: Client = await make_client(config)  # its own Redis connection

    async def answers(caller: str) -> list[Any]:
        return [
            await (await client.post("/", json=body_from(caller))).json()
            for client in (first, second)
        ]

    assert await answers("15162065699") == [[], []]
    response = await first.put("/v1/lists/blocklist/entries/15162065699", headers=AUTH)
    assert response.status == 200

    async def rejected() -> bool:
        return await answers("15162065699") == [REJECT, REJECT]

    await wait_for(rejected, timeout_s=1.0)
    response = await second.delete("/v1/lists/blocklist/entries/15162065699", headers=AUTH)
    assert response.status == 200

    async def allowed() -> bool:
        return await answers("15162065699") == [[], []]

    await wait_for(allowed, timeout_s=1.0)
    # A prefix added in bulk works the same way.
    await first.post("/v1/lists/premium/entries", json={"add": ["1900"]}, headers=AUTH)

    async def prefix_rejected() -> bool:
        return await answers("19005550123") == [REJECT, REJECT]

    await wait_for(prefix_rejected, timeout_s=1.0)


async def test_a_write_redis_did_not_take_is_not_acknowledged(
    tokens: None, make_config: Callable[..., Config], make_client: Callable[..., Any]
) -> None:
    config = make_config({**ADMIN_CONFIG, "redis": {"url": "redis://127.0.0.1:1/0"}})
    client: Client = await make_client(config)
    response = await client.put("/v1/lists/blocklist/entries/15162065613", headers=AUTH)
    assert response.status == 503
    assert "nothing was changed" in (await response.json())["error"]


async def test_a_large_bulk_change_lands_at_once_and_reloads_without_the_base(
    admin: Client, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over STAGE_OVER entries the write is staged in chunks, then applied in one step."""
    await load_list(redis, "premium", "prefixes", ["1900", "1976"])
    store = ListStore(redis)
    await store.change("premium", "prefixes", remove=["1900"])
    url = "/v1/lists/premium"

    async def loaded_entries(count: int) -> bool:
        body = await (await admin.get(url, headers=AUTH)).json()
        return bool(body["loaded"] and body["loaded"]["entries"] == count)

    await wait_for(lambda: loaded_entries(1))
    base_reads: list[str] = []
    assert admin.app is not None
    cache_store: ListStore = admin.app[CACHE].store
    read_base = cache_store.set_base

    async def counted_set_base(name: str, gen: int) -> frozenset[str]:
        base_reads.append(name)
        return await read_base(name, gen)

    monkeypatch.setattr(cache_store, "set_base", counted_set_base)
    version = (await store.meta("premium")).version  # type: ignore[union-attr]
    added = ["1900", *(f"44{i:06d}" for i in range(STAGE_OVER + 500))]
    response = await admin.post(
        f"{url}/entries", json={"add": added, "remove": ["1976", "1555"]}, headers=AUTH
    )
    assert response.status == 200
    assert await response.json() == {
        "list": "premium", "added": len(added), "removed": 2, "version": version + 1
    }  # fmt: skip
    assert await store.contains("premium", "prefixes", "1900")  # out of dels again
    assert not await store.contains("premium", "prefixes", "1976")
    assert await redis.scard(keys.dels("premium")) == 2
    assert [k async for k in redis.scan_iter(match="*staged*")] == []
    await wait_for(lambda: loaded_entries(len(added)))
    assert base_reads == []  # the same base: only the deltas were read again
    assert await (await admin.post("/", json=body_from("15162065600"))).json() == []
    assert await (await admin.post("/", json=body_from("+44000042123"))).json() == REJECT
