"""HTTP handlers: the CarrierX screening endpoint and the health probes.

The screening handler reads like its pipeline: trunk group -> body -> JSON -> call ->
decision -> answer. Bad requests get 4xx JSON errors (docs/failure.md); anything that goes
wrong after the body was understood is answered by ``on_error``, never a 5xx.
"""

from __future__ import annotations

import logging
import time

import orjson
from aiohttp import web

from core.keys import SUBSCRIBER_BUCKETS
from core.logs import REQUEST_ID
from service.appkeys import AUTH, INTERNALS, SCREENER
from service.edge.answers import screening_response
from service.edge.body import BadRequest, arrived_body, decode, policy_of, refuse, too_large
from service.edge.errors import client_gone, internal_error
from service.screening.cache import LIST_LOST, LIST_NOT_LOADED
from service.screening.policy import NeedsRates
from service.screening.screen import Screener

logger = logging.getLogger(__name__)

_JSON = "application/json"


async def screen(request: web.Request) -> web.StreamResponse:
    """``POST /`` and ``POST /tg/{trunk_group}``: the CarrierX external handler.

    Every call passes here, so it does no more than the pipeline needs; a decision that
    needs no Redis round trip (no ``call_rate`` rule reached) is made without awaiting.
    ``handler.deadline_ms`` runs from the request's arrival: when its first bytes were
    read from the socket, as stamped by the connection with aiohttp's internals
    (``GuardedHandler.arrived``), else from here (public mode has no earlier time). The
    Redis wait gets what is left of it (none left: ``on_error``), and an answer sent
    later anyway is counted (``callscreen_late_answers_total``).
    """
    started = getattr(request.protocol, "arrived", None) or time.perf_counter()
    app = request.app
    screener = app[SCREENER]
    try:
        if (refusal := app[AUTH].refuse(request)) is not None:
            return refusal
        group, policy = policy_of(screener, request)
        try:  # read_body(), inlined: one coroutine less on every call
            raw = arrived_body(request)
            if raw is None:
                raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_large(request) from None
        body = decode(raw)
    except BadRequest as exc:
        return refuse(screener, exc)
    except ConnectionError:  # the client hung up, or was cut off, before its body arrived
        return client_gone(request)
    except Exception:  # a bug before the call is understood: a plain 500, never a pass
        return internal_error(request)
    try:
        call = screener.parser.parse(body)
        REQUEST_ID.set(call.call_id)  # this request's task only: tags its log lines
        decision = screener.decide_locally(policy, call)
        if isinstance(decision, NeedsRates):  # a remote rule: one Redis round trip
            decision = await screener.decide_remote(
                policy, call, decision, trunk_group=group, arrived=started
            )
        screener.record(group, call, decision)
        answer = decision.outcome.answer
    except Exception:
        # A bug must not turn into a 5xx that CarrierX would act on: answer by on_error.
        logger.exception("screening failed; answering by on_error")
        screener.metrics.fallback("internal")
        answer = screener.on_error.outcome.answer
    took_s = time.perf_counter() - started
    screener.metrics.request_seconds.observe(took_s)
    if took_s > screener.deadline_s:
        screener.metrics.late_answers.inc()
    return screening_response(request, answer, app[INTERNALS].enabled)


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers HTTP."""
    return web.Response(body=b'{"status":"ok"}', content_type=_JSON)


async def readyz_brief(request: web.Request) -> web.Response:
    """``/readyz`` on the handler port beside an operator listener: ready or not, no more.

    The details (list names and sizes, Redis errors) are the operator listener's
    (:func:`readyz`): the handler port may face CarrierX or the internet.
    """
    ready = not _not_ready(request.app[SCREENER])
    return web.Response(
        status=200 if ready else 503,
        body=b'{"ready":true}' if ready else b'{"ready":false}',
        content_type=_JSON,
    )


async def readyz(request: web.Request) -> web.Response:
    """Ready: Redis confirmed the lists recently and every list a policy uses is trusted.

    503 names each list that is not: not confirmed by Redis within ``cache.max_stale_ms``
    (its Redis, or the Cluster node holding its ``meta``, unreachable); not loaded yet;
    never synced (it has a ``source`` and no sync stamped it: the loader has not run); or
    lost (Redis lost its data: it is trusted again after a full sync or ``python -m loader
    accept``; see :mod:`service.screening.cache`). A list kept only through the admin API
    may be empty. ``degraded`` names the Redis Cluster nodes failing right now (a partial
    outage: their keys' calls are answered by ``on_error``) without making it unready.
    """
    screener = request.app[SCREENER]
    reasons = _not_ready(screener)
    cache = screener.cache
    lists = {}
    for name, obj in sorted(cache.lists.items()):
        state = cache.loaded[name]
        lists[name] = {"entries": obj.size, "gen": state.gen, "version": state.version}
    # A Cluster node failing: the calls whose keys it holds are answered by on_error
    # while the others are answered as usual, so the instance stays ready for them.
    down = screener.store.dispatcher.down
    degraded = [f"Redis node {name} failing" for name in down]
    # Buckets Redis lost affect only the calls reading them (they answer by on_error
    # until a sync heals them): degraded, not unready.
    lost = screener.lost_bucket_report()
    degraded += [
        f"list {name}: {int(seen['buckets_seen_lost'])} of {SUBSCRIBER_BUCKETS} buckets of "
        f"generation {int(seen['gen'])} found lost by calls ({seen['share']:.1%})"
        for name, seen in lost.items()
    ]
    body = {
        "ready": not reasons,
        "reasons": reasons,
        "degraded": degraded,
        "lost_buckets": lost,
        "lists": lists,
    }
    return web.Response(
        status=200 if not reasons else 503, body=orjson.dumps(body), content_type=_JSON
    )


def _not_ready(screener: Screener) -> list[str]:
    """Why the service is not ready (empty: it is)."""
    cache = screener.cache
    needed = frozenset().union(*(p.lists for p in screener.policies.values()))
    reasons = []
    stale = [name for name in cache.stale() if name in needed]
    if stale:
        errors = sorted({cache.errors.get(n) or cache.last_error or "no poll yet" for n in stale})
        reasons.append(f"Redis not reachable for lists {', '.join(stale)}: {'; '.join(errors)}")
    distrusted = {name: cache.distrusted[name] for name in needed if name in cache.distrusted}
    missing = [name for name in cache.missing(needed) if name not in distrusted]
    if missing:
        reasons.append(f"lists not loaded: {', '.join(missing)}")
    never = sorted(n for n, why in distrusted.items() if why.reason == LIST_NOT_LOADED)
    if never:
        reasons.append(f"lists never synced from their source: {', '.join(never)}")
    reasons += [why.detail for _, why in sorted(distrusted.items()) if why.reason == LIST_LOST]
    return reasons
