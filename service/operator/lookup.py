"""Operator read routes behind the admin tokens: who am I, the audit, history, look-up.

``GET /v1/whoami``, ``/v1/audit``, ``/v1/history`` (one number's calls),
``/v1/history/recent`` and ``/v1/lookup?number=`` (the lists that hold a number, the
decision a call from it would get on each trunk group, its recent calls and the audit
of its entries). Each needs a token of any role (``read`` and up); parameters are in
docs/api.md and the OpenAPI document.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web

from core.numbers import normalise
from core.subscribers import SubscriberStore
from service.appkeys import CONFIG, REDIS, SCREENER, STORE
from service.operator.admin import AdminError, admin_only
from service.operator.records import audit_log
from service.operator.tokens import RANK, token_of
from service.screening.history import CallHistory

#: Most records one request answers.
MAX_LIMIT = 1000


def add_lookup_routes(app: web.Application) -> None:
    app.router.add_get("/v1/whoami", admin_only(whoami))
    app.router.add_get("/v1/audit", admin_only(audit))
    app.router.add_get("/v1/history", admin_only(history))
    app.router.add_get("/v1/history/recent", admin_only(recent))
    app.router.add_get("/v1/lookup", admin_only(lookup))


def _json(body: Any) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def _limit(request: web.Request, default: int = 100) -> int:
    text = request.query.get("limit", str(default))
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
        raise AdminError(400, f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(text)


def _number(request: web.Request, raw: str | None = None) -> str:
    raw = request.query.get("number", "") if raw is None else raw
    number = normalise(raw[:64], request.app[CONFIG].caller.default_country) if raw else None
    if number is None:
        raise AdminError(400, f"not a phone number: {raw[:64]!r}")
    return number


def _time_s(request: web.Request, name: str, default: float) -> float:
    text = request.query.get(name, "").strip()
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise AdminError(400, f"{name} must be Unix seconds or an ISO 8601 time") from None


def _history(request: web.Request) -> CallHistory:
    found = request.app[SCREENER].history
    if found is None:
        raise AdminError(404, "call history is off (history.enabled)")
    return found


async def whoami(request: web.Request) -> web.Response:
    """``GET /v1/whoami``: the token's name and role, and the lists it may change."""
    token = token_of(request)
    assert token is not None  # admin_only let it in
    lists = list(request.app[CONFIG].lists)
    editable = [n for n in lists if token.may("editor", n)] if RANK[token.role] >= 1 else []
    return _json(
        {"name": token.name, "role": token.role, "scope": list(token.scope), "editable": editable}
    )


async def audit(request: web.Request) -> web.Response:
    """``GET /v1/audit``: audit records, newest first (``entry`` in any number format)."""
    entries: frozenset[str] = frozenset()
    raw = request.query.get("entry", "").strip()
    if raw:
        country = request.app[CONFIG].caller.default_country
        entries = frozenset(e for e in (raw[:200], normalise(raw[:64], country)) if e)
    records = await audit_log(request.app).query(
        list_name=request.query.get("list") or None,
        entries=entries,
        action=request.query.get("action") or None,
        limit=_limit(request),
    )
    return _json({"records": records})


async def history(request: web.Request) -> web.Response:
    """``GET /v1/history``: one number's recorded calls in a time range, newest first."""
    calls = _history(request)
    number = _number(request)
    now = time.time()
    since = _time_s(request, "since", now - request.app[CONFIG].history.retention_s)
    until = _time_s(request, "until", now + 60)
    found = await calls.calls(number, since, until, _limit(request))
    return _json({"number": number, "since": since, "until": until, "calls": found})


async def recent(request: web.Request) -> web.Response:
    """``GET /v1/history/recent``: the newest recorded calls, and their count by rule."""
    decision = request.query.get("decision") or None
    if decision not in (None, "reject", "allow"):
        raise AdminError(400, "decision must be reject or allow")
    found = await _history(request).recent(_limit(request), decision)
    by_rule: dict[str, int] = {}
    for call in found:
        by_rule[call.get("rule") or "-"] = by_rule.get(call.get("rule") or "-", 0) + 1
    return _json({"calls": found, "by_rule": by_rule})


async def _decisions(request: web.Request, number: str) -> list[dict[str, Any]]:
    """The decision a call from ``number`` would get under each trunk group (explain)."""
    screener = request.app[SCREENER]
    body = {"From": [{"user": number}], "Call-ID": ["console-lookup"]}
    call = screener.parser.parse(body)
    groups: list[str | None] = [None, *request.app[CONFIG].trunk_groups]
    found = []
    for group in groups:
        chosen = screener.policy_for(group)
        assert chosen is not None
        decision = await screener.decide(chosen[1], call, count=False)
        outcome = decision.outcome
        found.append(
            {
                "trunk_group": group,
                "policy": chosen[1].name,
                "decision": outcome.action,
                "answer": list(outcome.operands) if outcome.operands else [],
                "rule": outcome.rule,
                "list": outcome.list,
                "matched": decision.matched,
                "on_error": decision.fallback,
            }
        )
    return found


async def lookup(request: web.Request) -> web.Response:
    """``GET /v1/lookup``: the lists holding a number, its decisions, calls and audit."""
    number = _number(request)
    config = request.app[CONFIG]
    store = request.app[STORE]
    subscribers = SubscriberStore(request.app[REDIS])
    lists: list[dict[str, Any]] = []
    for name, spec in config.lists.items():
        if spec.kind == "numbers":
            listed = await store.contains(name, "numbers", number)
            lists.append({"list": name, "kind": spec.kind, "listed": listed})
        elif spec.kind == "subscribers":
            _, entries = await subscribers.read(name, number)
            held = entries.as_dict()
            listed = bool(held["block"] or held["allow"])
            lists.append({"list": name, "kind": spec.kind, "listed": listed, **held})
    history = request.app[SCREENER].history
    calls = await history.calls(number, 0, time.time() + 60, 20) if history is not None else None
    records = await audit_log(request.app).query(entries=frozenset([number]), limit=20)
    return _json(
        {
            "number": number,
            "lists": lists,
            "decisions": await _decisions(request, number),
            "calls": calls,
            "audit": records,
        }
    )
