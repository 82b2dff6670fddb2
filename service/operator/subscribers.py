"""Admin API for one subscriber of a ``subscribers`` list (see docs/subscribers.md).

``GET``/``PUT``/``DELETE`` of one subscriber's entries and ``POST
/v1/lists/{name}/subscribers`` for many (:func:`bulk_change`), behind the admin bearer
token (:func:`service.operator.admin.admin_only`). Entries are numbers or ``1900*``
prefixes; block and allow are separate sides (``?side=``, default ``block``, on PUT
and DELETE), and every answer says ``"lost": true`` when Redis lost the
subscriber's bucket. Each write is a compare-and-set in Redis
(:class:`core.subscribers.SubscriberStore`) answered after Redis acknowledged it; calls
read subscribers from Redis, so the next call sees the change. On a list with a source,
writes are also kept in its admin overlay (:mod:`core.subscriber_overlay`, optional
``ttl_s``), so syncs keep them; the answers list the subscriber's overlay.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web

from core import subscriber_overlay
from core.subscribers import (
    BadSubscriberEntry,
    SubscriberStore,
    canonical_entry,
    canonical_side,
    canonical_subscriber,
    entry_of,
)
from service.appkeys import CONFIG, REDIS
from service.operator import models as api
from service.operator.admin import AdminError, admin_only, list_kind, read_body, ttl_s_of
from service.operator.offload import OFFLOAD, Refusal, subscriber_changes
from service.operator.records import audit_change

logger = logging.getLogger(__name__)


def add_subscriber_routes(app: web.Application) -> None:
    app.router.add_post("/v1/lists/{name}/subscribers", admin_only(bulk_change))
    base = "/v1/lists/{name}/subscribers/{subscriber}"
    app.router.add_get(base, admin_only(get_subscriber))
    app.router.add_put(base + "/entries/{entry}", admin_only(put_entry))
    app.router.add_delete(base + "/entries/{entry}", admin_only(delete_entry))


def _json(body: Any) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def _subscribers_list(request: web.Request) -> str:
    """The subscribers list a request names; AdminError 400/404 otherwise."""
    name, kind = list_kind(request)
    if kind != "subscribers":
        raise AdminError(400, f"list {name!r} is a {kind} list, not a subscribers list")
    return name


def _target(request: web.Request) -> tuple[str, str]:
    """The subscribers list and the canonical subscriber of a request."""
    name = _subscribers_list(request)
    country = request.app[CONFIG].caller.default_country
    try:
        return name, canonical_subscriber(request.match_info["subscriber"], country)
    except BadSubscriberEntry as exc:
        raise AdminError(400, str(exc)) from None


def _entry(request: web.Request) -> str:
    try:
        return canonical_entry(
            request.match_info["entry"], request.app[CONFIG].caller.default_country
        )
    except BadSubscriberEntry as exc:
        raise AdminError(400, str(exc)) from None


async def _answer(request: web.Request, name: str, subscriber: str) -> web.Response:
    """The subscriber's entries; on a list with a source, its admin overlay too."""
    redis = request.app[REDIS]
    gen, entries, lost = await SubscriberStore(redis).read_marked(name, subscriber)
    body = {"list": name, "subscriber": subscriber, "gen": gen, **entries.as_dict(), "lost": lost}
    if _sourced(request, name):
        body["overlay"] = [
            {
                "entry": entry,
                "side": side,
                "change": "add" if kept.add else "remove",
                "expires_at": kept.expires_at,
            }
            for kept in await subscriber_overlay.of_subscriber(redis, name, subscriber)
            for entry, side in [entry_of(kept.code)]
        ]
    return _json(body)


def _sourced(request: web.Request, name: str) -> bool:
    """Whether the list has a source: admin writes then go to its overlay too."""
    return request.app[CONFIG].lists[name].source is not None


def _overlay_ttl_s(request: web.Request, name: str, ttl_s: float | None) -> bool:
    """Whether writes to ``name`` keep an overlay; AdminError 400 for a ttl_s without one."""
    sourced = _sourced(request, name)
    if ttl_s is not None and not sourced:
        raise AdminError(400, "ttl_s is for lists with a source (the admin overlay)")
    return sourced


async def get_subscriber(request: web.Request) -> web.Response:
    """``GET /v1/lists/{name}/subscribers/{subscriber}``: its entries (asks Redis)."""
    name, subscriber = _target(request)
    return await _answer(request, name, subscriber)


async def _change(request: web.Request, *, remove: bool) -> web.Response:
    name, subscriber = _target(request)
    entry = _entry(request)
    try:
        side = canonical_side(request.query.get("side", "block"))
    except BadSubscriberEntry as exc:
        raise AdminError(400, str(exc)) from None
    ttl_s = ttl_s_of(request.query.get("ttl_s"))
    sourced = _overlay_ttl_s(request, name, ttl_s)
    store = SubscriberStore(request.app[REDIS])
    try:
        gen = await store.change(
            name, subscriber, entry, side, remove=remove, overlay=sourced, ttl_s=ttl_s
        )
    except BadSubscriberEntry as exc:
        raise AdminError(409, str(exc)) from None
    what = f"removed {entry!r} from {side}" if remove else f"put {entry!r} on {side}"
    logger.info("admin: list %s subscriber %s: %s (gen %d)", name, subscriber, what, gen)
    action = "subscriber_remove" if remove else f"subscriber_{side}"
    fields = {"subscriber": subscriber, "entry": entry}
    await audit_change(request, action, name, gen, version_step=0, **fields)
    return await _answer(request, name, subscriber)


async def put_entry(request: web.Request) -> web.Response:
    """``PUT .../entries/{entry}?side=block|allow``: put one entry on a side."""
    return await _change(request, remove=False)


async def delete_entry(request: web.Request) -> web.Response:
    """``DELETE .../entries/{entry}?side=block|allow``: take one entry off a side."""
    return await _change(request, remove=True)


async def bulk_change(request: web.Request) -> web.Response:
    """``POST /v1/lists/{name}/subscribers``: many subscribers' changes, checked whole first.

    The guards of :func:`service.operator.admin.bulk_change`, in its order: body size
    (``413``), shape (``400``), item count over ``admin.max_bulk_entries`` (``413``), then
    every item (any bad one, or a pair added and removed or added on both sides, refuses
    the whole change with its field and index). A subscriber taken past 100 entries is
    ``409`` with nothing written. Writes are atomic per bucket, not across buckets.
    Everything before the write runs in the helper process
    (:func:`service.operator.offload.prepare_subscribers`), off the calls' event loop.
    """
    name = _subscribers_list(request)
    body = await read_body(request)
    config = request.app[CONFIG]
    prepared = await request.app[OFFLOAD].prepare_subscribers(
        body, config.caller.default_country, config.admin.max_bulk_entries
    )
    if isinstance(prepared, Refusal):
        raise AdminError(prepared.status, prepared.message, **prepared.extra)
    sourced = _overlay_ttl_s(request, name, prepared.ttl_s)
    changes = await subscriber_changes(prepared.lines)
    added, removed = prepared.added, prepared.removed
    store = SubscriberStore(request.app[REDIS])
    try:
        gen = await store.bulk_change(name, changes, overlay=sourced, ttl_s=prepared.ttl_s)
    except BadSubscriberEntry as exc:
        raise AdminError(409, str(exc)) from None
    logger.info(
        "admin: list %s: %d subscribers +%d -%d (gen %d)", name, len(changes), added, removed, gen
    )
    counts = {"added": added, "removed": removed}
    await audit_change(request, "subscriber_bulk", name, gen, version_step=0, **counts)
    result = api.SubscriberBulkResult(
        list=name, gen=gen, added=added, removed=removed, subscribers=len(changes)
    )
    return web.Response(body=api.answer(result), content_type="application/json")
