"""Admin API for one subscriber of a ``subscribers`` list (see docs/subscribers.md).

- ``GET /v1/lists/{name}/subscribers/{subscriber}``: its block and allow entries;
- ``PUT /v1/lists/{name}/subscribers/{subscriber}/entries/{entry}?side=block|allow``:
  put an entry on a side (``block`` by default; an entry on the other side moves);
- ``DELETE`` on the same path: remove the entry (whatever its side).

Entries are numbers or prefixes with a trailing ``*`` (``1900*``, URL-encoded ``%2A``
works too). Authentication is the admin API's bearer token (:func:`service.admin.admin_only`).
Each write is an atomic read-modify-write of the subscriber's field in Redis (a Lua
compare-and-set, :class:`core.subscribers.SubscriberStore`), answered after Redis
acknowledged it. The service reads subscribers from Redis on every call that needs
them, so the very next call sees the change. A full sync of a list with a ``source``
replaces such changes, as for every list. The OpenAPI document (service/openapi.py)
describes these routes too.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web

from core.subscribers import (
    BadSubscriberEntry,
    Side,
    SubscriberStore,
    canonical_entry,
    canonical_side,
    canonical_subscriber,
)
from service.admin import AdminError, admin_only, list_kind
from service.appkeys import CONFIG, REDIS

logger = logging.getLogger(__name__)


def add_subscriber_routes(app: web.Application) -> None:
    base = "/v1/lists/{name}/subscribers/{subscriber}"
    app.router.add_get(base, admin_only(get_subscriber))
    app.router.add_put(base + "/entries/{entry}", admin_only(put_entry))
    app.router.add_delete(base + "/entries/{entry}", admin_only(delete_entry))


def _json(body: Any) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def _target(request: web.Request) -> tuple[str, str]:
    """The subscribers list and the canonical subscriber of a request."""
    name, kind = list_kind(request)
    if kind != "subscribers":
        raise AdminError(400, f"list {name!r} is a {kind} list, not a subscribers list")
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
    gen, entries = await SubscriberStore(request.app[REDIS]).read(name, subscriber)
    return _json({"list": name, "subscriber": subscriber, "gen": gen, **entries.as_dict()})


async def get_subscriber(request: web.Request) -> web.Response:
    """``GET /v1/lists/{name}/subscribers/{subscriber}``: its entries (asks Redis)."""
    name, subscriber = _target(request)
    return await _answer(request, name, subscriber)


async def _change(request: web.Request, side: Side | None) -> web.Response:
    name, subscriber = _target(request)
    entry = _entry(request)
    try:
        gen = await SubscriberStore(request.app[REDIS]).change(name, subscriber, entry, side)
    except BadSubscriberEntry as exc:
        raise AdminError(409, str(exc)) from None
    what = f"put {entry!r} on {side}" if side else f"removed {entry!r}"
    logger.info("admin: list %s subscriber %s: %s (gen %d)", name, subscriber, what, gen)
    return await _answer(request, name, subscriber)


async def put_entry(request: web.Request) -> web.Response:
    """``PUT .../entries/{entry}?side=block|allow``: add (or move) one entry."""
    try:
        side = canonical_side(request.query.get("side", "block"))
    except BadSubscriberEntry as exc:
        raise AdminError(400, str(exc)) from None
    return await _change(request, side)


async def delete_entry(request: web.Request) -> web.Response:
    """``DELETE .../entries/{entry}``: remove one entry from the subscriber."""
    return await _change(request, None)
