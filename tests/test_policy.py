"""Policies over HTTP against a real Redis: each rule kind, order, modes, trunk groups, explain."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from core.config import Config
from tests.helpers import REJECT, body_from, load_list

Client = Any


def policy_config(rules: list[dict[str, Any]], **policy: Any) -> dict[str, Any]:
    return {
        "lists": {
            "block": {"kind": "numbers"},
            "allow": {"kind": "numbers"},
            "premium": {"kind": "prefixes"},
            "spam-names": {"kind": "names"},
            "dids": {"kind": "numbers"},
        },
        "policies": {"default": {"rules": rules, **policy}},
    }


@pytest.fixture
async def lists(redis: Redis) -> None:
    await load_list(redis, "block", "numbers", ["5162065613", "+1 516 206 5614"])
    await load_list(redis, "allow", "numbers", ["15162065614", "15162065699"])
    await load_list(redis, "premium", "prefixes", ["1900", "+44 870"])
    await load_list(
        redis, "spam-names", "names", ["Spam Likely", "contains:warranty", r"re:^v\d{6,}$"]
    )
    await load_list(redis, "dids", "numbers", ["19512623062"])


async def answer(client: Client, body: dict[str, Any], path: str = "/") -> Any:
    response = await client.post(path, json=body)
    assert response.status == 200
    return await response.json()


@pytest.mark.usefixtures("lists")
async def test_each_rule_kind(
    make_config: Callable[..., Config], make_client: Callable[..., Any], redis: Redis
) -> None:
    cases: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = [
        ({"match": "caller_in_list", "list": "block"}, body_from("5162065613"), body_from("5162065600")),
        ({"match": "caller_prefix_in_list", "list": "premium"}, body_from("19005550100"), body_from("19515550100")),
        ({"match": "caller_prefix_in_list", "list": "premium"}, body_from("+448701234567"), body_from("+448711234567")),
        ({"match": "caller_name_matches_list", "list": "spam-names"}, body_from(name="SPAM LIKELY"), body_from(name="Spam")),
        ({"match": "caller_name_matches_list", "list": "spam-names"}, body_from(name="Car Warranty Dept"), body_from(name="John")),
        ({"match": "caller_name_matches_list", "list": "spam-names"}, body_from(name="V1234567"), body_from(name="V12")),
        ({"match": "called_in_list", "list": "dids"}, body_from("5162065600"), body_from("5162065600", To=[{"user": "12125550000"}])),
        ({"match": "anonymous"}, body_from("anonymous"), body_from("5162065600")),
        ({"match": "anonymous"}, body_from("5162065600", Privacy=["id"]), body_from("5162065600", Privacy=["none"])),
        ({"match": "invalid_number"}, body_from("5550123"), body_from("5162065600")),
        ({"match": "invalid_number"}, body_from("10162065600"), body_from("19512623062")),
        (
            {"match": "attestation_failed"},
            body_from("5162065600", From=[{"user": "15162065600", "uri_parameters": {"verstat": "TN-Validation-Failed"}}]),
            body_from("5162065600", From=[{"user": "15162065600", "uri_parameters": {"verstat": "TN-Validation-Passed"}}]),
        ),
    ]  # fmt: skip
    for condition, hit, miss in cases:
        rule = {"name": "r", "operands": ["decline", "tag"], **condition}
        client = await make_client(make_config(policy_config([rule])), redis_client=redis)
        expected = [{"action": "reject", "operands": ["decline", "tag"]}]
        assert await answer(client, hit) == expected, condition
        assert await answer(client, miss) == [], condition


@pytest.mark.usefixtures("lists")
async def test_first_match_wins(
    make_config: Callable[..., Config], make_client: Callable[..., Any], redis: Redis
) -> None:
    rules: list[dict[str, Any]] = [
        {"name": "vip", "match": "caller_in_list", "list": "allow", "action": "allow"},
        {
            "name": "block",
            "match": "caller_in_list",
            "list": "block",
            "operands": ["busy-here", "b"],
        },
        {"name": "anon", "match": "anonymous", "operands": ["unwanted", "a"]},
    ]
    client = await make_client(make_config(policy_config(rules)), redis_client=redis)
    # 15162065614 is on both lists: the earlier allow rule decides.
    assert await answer(client, body_from("15162065614")) == []
    assert await answer(client, body_from("15162065613")) == [
        {"action": "reject", "operands": ["busy-here", "b"]}
    ]
    assert await answer(client, body_from("anonymous")) == [
        {"action": "reject", "operands": ["unwanted", "a"]}
    ]


@pytest.mark.usefixtures("lists")
async def test_allow_list_mode(
    make_config: Callable[..., Config], make_client: Callable[..., Any], redis: Redis
) -> None:
    rules = [{"name": "known", "match": "caller_in_list", "list": "allow", "action": "allow"}]
    config = policy_config(rules, default="reject", default_operands=["decline", "not-listed"])
    client = await make_client(make_config(config), redis_client=redis)
    assert await answer(client, body_from("15162065699")) == []
    assert await answer(client, body_from("15162065600")) == [
        {"action": "reject", "operands": ["decline", "not-listed"]}
    ]


@pytest.mark.usefixtures("lists")
async def test_dry_run_counts_but_lets_the_call_go_on(
    make_config: Callable[..., Config], make_client: Callable[..., Any], redis: Redis
) -> None:
    rules: list[dict[str, Any]] = [
        {"name": "trial", "match": "caller_prefix_in_list", "list": "premium", "dry_run": True},
        {"name": "block", "match": "caller_in_list", "list": "block"},
    ]
    client = await make_client(make_config(policy_config(rules)), redis_client=redis)
    assert await answer(client, body_from("19005550100")) == []
    assert await answer(client, body_from("15162065613")) == REJECT
    metrics = await (await client.get("/metrics")).text()
    assert (
        'callscreen_decisions_total{decision="reject",dry_run="true",rule="trial",trunk_group="_root"} 1.0'
        in metrics
    )
    explained = await (await client.post("/v1/explain", json=body_from("19005550100"))).json()
    assert explained["decision"] == "allow"
    assert explained["dry_run_matches"] == [{"rule": "trial", "list": "premium", "matched": "1900"}]


@pytest.mark.usefixtures("lists")
async def test_trunk_groups_route_to_their_policy(
    make_config: Callable[..., Config], make_client: Callable[..., Any], redis: Redis
) -> None:
    config = policy_config([])
    config["policies"]["strict"] = {
        "rules": [{"name": "block", "match": "caller_in_list", "list": "block"}]
    }
    config["trunk_groups"] = {"sales": {"policy": "strict"}, "lab": {"policy": "default"}}
    client = await make_client(make_config(config), redis_client=redis)
    blocked = body_from("15162065613")
    assert await answer(client, blocked, "/tg/sales") == REJECT
    assert await answer(client, blocked, "/tg/lab") == []
    assert await answer(client, blocked, "/") == []

    response = await client.post("/tg/nope", json=blocked)
    assert response.status == 404
    assert await response.json() == {"error": "unknown trunk group 'nope'"}
    metrics = await (await client.get("/metrics")).text()
    assert 'callscreen_errors_total{kind="unknown_trunk_group"} 1.0' in metrics


@pytest.mark.usefixtures("lists")
async def test_explain_shows_the_decision_and_the_parsed_caller(
    make_config: Callable[..., Config], make_client: Callable[..., Any], redis: Redis
) -> None:
    rules = [{"name": "block", "match": "caller_in_list", "list": "block"}]
    client = await make_client(make_config(policy_config(rules)), redis_client=redis)
    body = body_from("+1 (516) 206-5613", name="Robo")
    response = await client.post("/v1/explain", json=body)
    assert response.status == 200
    explained = await response.json()
    assert explained["decision"] == "reject"
    assert explained["answer"] == REJECT
    assert (explained["rule"], explained["list"], explained["matched"]) == (
        "block",
        "block",
        "15162065613",
    )
    assert explained["caller"] == {
        "number": "15162065613",
        "source": "from",
        "user": "+1 (516) 206-5613",
        "name": "Robo",
        "anonymous": False,
        "invalid_number": False,
        "verstat": None,
    }
    assert explained["called"] == "19512623062"
    allowed = await (await client.post("/v1/explain", json=body_from("15162065600"))).json()
    assert (allowed["decision"], allowed["rule"], allowed["list"]) == ("allow", "default", None)
    missing = await client.post("/v1/explain/tg/nope", json=body)
    assert missing.status == 404
    # explain counts nothing
    metrics = await (await client.get("/metrics")).text()
    assert 'rule="block",trunk_group="_root"} 0.0' in metrics
