"""HTTP handlers: the CarrierX screening endpoint, explain, and health probes.

The screening handler reads like its pipeline: trunk group -> body -> JSON -> call ->
decision -> answer. Bad requests get 4xx JSON errors (docs/failure.md); anything that goes
wrong after the body was understood is answered by ``on_error``, never a 5xx.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from aiohttp import web

from core.logs import REQUEST_ID
from service.admin import explain_refusal
from service.answers import screening_response
from service.appkeys import AUTH, SCREENER
from service.cache import LIST_LOST, LIST_NOT_LOADED
from service.errors import client_gone, internal_error, json_error
from service.policy import CompiledPolicy, Evaluation
from service.screen import Screener

logger = logging.getLogger(__name__)

_JSON = "application/json"


class BadRequest(Exception):
    """A request the service cannot screen; carries the HTTP status and message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


async def _read_body(request: web.Request) -> dict[str, Any]:
    """The decoded JSON object; aiohttp enforces ``server.max_body_bytes`` while reading."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(request) from None
    return _decode(raw)


def _too_large(request: web.Request) -> BadRequest:
    return BadRequest(413, "too_large", f"request body over {request.client_max_size} bytes")


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(400, "bad_json", f"request body is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(400, "not_object", "request body must be a JSON object of SIP headers")
    return body


def _policy(screener: Screener, request: web.Request) -> tuple[str, CompiledPolicy]:
    trunk_group = request.match_info.get("trunk_group")
    found = screener.policy_for(trunk_group)
    if found is None:
        logger.warning(
            "request for unknown trunk group %r", trunk_group[:64] if trunk_group else ""
        )
        raise BadRequest(404, "unknown_trunk_group", f"unknown trunk group {trunk_group!r}")
    return found


def _refuse(screener: Screener, exc: BadRequest) -> web.Response:
    screener.metrics.error(exc.kind)
    return json_error(exc.status, exc.message)


async def screen(request: web.Request) -> web.StreamResponse:
    """``POST /`` and ``POST /tg/{trunk_group}``: the CarrierX external handler.

    Every call passes here, so it does no more than the pipeline needs; a decision that
    needs no Redis round trip (no ``call_rate`` rule reached) is made without awaiting.
    """
    started = time.perf_counter()
    app = request.app
    screener = app[SCREENER]
    try:
        if (refusal := app[AUTH].refuse(request)) is not None:
            return refusal
        group, policy = _policy(screener, request)
        try:  # _read_body(), inlined: one coroutine less on every call
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(request) from None
        body = _decode(raw)
    except BadRequest as exc:
        return _refuse(screener, exc)
    except ConnectionError:  # the client hung up, or was cut off, before its body arrived
        return client_gone(request)
    except Exception:  # a bug before the call is understood: a plain 500, never a pass
        return internal_error(request)
    try:
        call = screener.parser.parse(body)
        REQUEST_ID.set(call.call_id)  # this request's task only: tags its log lines
        decision = screener.decide_locally(policy, call) or await screener.decide(policy, call)
        screener.record(group, call, decision)
        answer = decision.outcome.answer
    except Exception:
        # A bug must not turn into a 5xx that CarrierX would act on: answer by on_error.
        logger.exception("screening failed; answering by on_error")
        screener.metrics.fallback("internal")
        answer = screener.on_error.outcome.answer
    screener.metrics.request_seconds.observe(time.perf_counter() - started)
    return screening_response(request, answer)


def _explanation(group: str, policy: CompiledPolicy, evaluation: Evaluation, call: Any) -> bytes:
    outcome = evaluation.outcome
    return orjson.dumps(
        {
            "decision": outcome.action,
            "answer": orjson.Fragment(outcome.answer),
            "trunk_group": None if group.startswith("_") else group,
            "policy": policy.name,
            "rule": outcome.rule,
            "list": outcome.list,
            "matched": evaluation.matched,
            "on_error": evaluation.fallback,
            "dry_run_matches": [
                {"rule": dry.rule, "list": dry.list, "matched": matched}
                for dry, matched in evaluation.dry_runs
            ],
            "caller": {
                "number": call.caller,
                "source": call.caller_source,
                "user": call.caller_user,
                "name": call.caller_name or None,
                "anonymous": call.anonymous,
                "invalid_number": call.invalid_number,
                "verstat": call.verstat,
            },
            "called": call.called,
            "call_id": call.call_id,
        }
    )


async def explain(request: web.Request) -> web.Response:
    """``POST /v1/explain[/tg/{trunk_group}]``: why this call would be blocked or allowed.

    Nothing is counted: explain leaves metrics and call-rate counters alone.
    """
    if (refusal := explain_refusal(request)) is not None:  # admin token when configured
        return refusal
    screener = request.app[SCREENER]
    try:
        group, policy = _policy(screener, request)
        body = await _read_body(request)
    except BadRequest as exc:
        return _refuse(screener, exc)
    call = screener.parser.parse(body)
    decision = await screener.decide(policy, call, count=False)
    return web.Response(body=_explanation(group, policy, decision, call), content_type=_JSON)


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers HTTP."""
    return web.Response(body=b'{"status":"ok"}', content_type=_JSON)


async def readyz(request: web.Request) -> web.Response:
    """Ready: Redis confirmed the lists recently and every list a policy uses is trusted.

    503 names each list that is not: not loaded yet; never synced (it has a ``source``
    and no sync stamped it: the loader has not run); or lost (Redis lost its data: it is
    trusted again after a full sync or ``python -m loader accept``; see
    :mod:`service.cache`). A list kept only through the admin API may be empty.
    """
    screener = request.app[SCREENER]
    cache = screener.cache
    needed = frozenset().union(*(p.lists for p in screener.policies.values()))
    reasons = []
    if not cache.usable():
        reasons.append(f"Redis not reachable: {cache.last_error or 'no successful poll yet'}")
    distrusted = {name: cache.distrusted[name] for name in needed if name in cache.distrusted}
    missing = [name for name in cache.missing(needed) if name not in distrusted]
    if missing:
        reasons.append(f"lists not loaded: {', '.join(missing)}")
    never = sorted(n for n, why in distrusted.items() if why.reason == LIST_NOT_LOADED)
    if never:
        reasons.append(f"lists never synced from their source: {', '.join(never)}")
    reasons += [why.detail for _, why in sorted(distrusted.items()) if why.reason == LIST_LOST]
    lists = {}
    for name, obj in sorted(cache.lists.items()):
        state = cache.loaded[name]
        lists[name] = {"entries": obj.size, "gen": state.gen, "version": state.version}
    body = {"ready": not reasons, "reasons": reasons, "lists": lists}
    return web.Response(
        status=200 if not reasons else 503, body=orjson.dumps(body), content_type=_JSON
    )
