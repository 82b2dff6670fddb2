"""The admin API under ``/v1``: list the lists, check, add and remove entries.

Bearer tokens are named, each with a role (:mod:`service.operator.tokens`), from
``admin.tokens_env`` and ``admin.tokens_file``; none configured means ``403`` ("admin API
disabled"), no header ``401``, a wrong token or one without the role a route needs
``403`` (naming the role); compared in constant time and never logged. ``POST
/v1/explain`` needs a ``read`` token while tokens are configured. Writes go through
:meth:`core.store.ListStore.change`, are answered after Redis acknowledged them (``503``
otherwise) and recorded in the audit trail (:mod:`service.operator.records`); they do
not restore trust in a list Redis lost. Routes and bodies: ``/v1/openapi.json`` and
docs/api.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel
from redis.exceptions import RedisError

from core import overlay
from core.config import ListKind
from core.connect import redact
from core.entries import BadEntry, canonical, new_entry
from core.keys import LIST_NAME_RE
from service.appkeys import AUTH, CACHE, CONFIG, METRICS, STORE
from service.edge.errors import json_error, json_errors
from service.operator import models as api
from service.operator.export import stream_export
from service.operator.offload import OFFLOAD, Offloader, Refusal, entries
from service.operator.openapi import openapi_document
from service.operator.records import audit_change
from service.operator.tokens import REQUEST_TOKEN, AdminTokens, Role, missing_role, required

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: The admin tokens (none: the admin API is disabled); reloadable in place.
ADMIN_TOKENS = web.AppKey("admin_tokens", AdminTokens)
#: The OpenAPI document, serialised once.
OPENAPI = web.AppKey("openapi", bytes)
_BEARER_CHALLENGE = 'Bearer realm="callscreen-admin"'
_JSON = "application/json"


def add_admin_routes(app: web.Application) -> None:
    """Register the admin routes and ``/v1/openapi.json``; read the tokens."""
    config = app[CONFIG]
    app[ADMIN_TOKENS] = AdminTokens(config)
    kinds = {name: spec.kind for name, spec in config.lists.items()}
    app[OPENAPI] = orjson.dumps(openapi_document(kinds, config.trunk_groups))
    app[OFFLOAD] = Offloader()

    async def offload_ctx(app: web.Application) -> AsyncIterator[None]:
        # In the background: the process starts serving meanwhile.
        offload = app[OFFLOAD]
        wanted = offload.start_early and bool(app[ADMIN_TOKENS].tokens)
        starting = asyncio.create_task(offload.start()) if wanted else None
        yield
        if starting is not None:
            with contextlib.suppress(Exception):  # a failed start: the first bulk retries
                await starting
        await app[OFFLOAD].close()

    app.cleanup_ctx.append(offload_ctx)
    if not app[ADMIN_TOKENS].tokens:
        logger.info("admin API disabled: %s is not set", config.admin.tokens_env)
    router = app.router
    router.add_get("/v1/openapi.json", json_errors(openapi))
    router.add_get("/v1/lists", admin_only(list_lists))
    router.add_get("/v1/lists/{name}", admin_only(get_list))
    router.add_post("/v1/lists/{name}/entries", admin_only(bulk_change))
    router.add_get("/v1/lists/{name}/entries", admin_only(export_entries))
    router.add_get("/v1/lists/{name}/entries/{entry}", admin_only(check_entry))
    router.add_put("/v1/lists/{name}/entries/{entry}", admin_only(add_entry))
    router.add_delete("/v1/lists/{name}/entries/{entry}", admin_only(remove_entry))


# --- authentication --------------------------------------------------------------------
def admin_refusal(request: web.Request, need: Role | None = None) -> web.Response | None:
    """The 401/403 answer when ``request`` carries no admin token with the role it needs
    (``need``, or by method and list: :func:`service.operator.tokens.required`), else
    None, with the token kept on the request for the audit trail."""
    app = request.app
    tokens = app.get(ADMIN_TOKENS)
    metrics = app[METRICS]
    if tokens is None or not tokens.tokens:
        metrics.error("forbidden")
        env = app[CONFIG].admin.tokens_env
        return json_error(403, f"admin API disabled: set {env}")
    scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        metrics.error("unauthorized")
        return json_error(
            401,
            "admin token required: send 'Authorization: Bearer <token>'",
            {"WWW-Authenticate": _BEARER_CHALLENGE},
        )
    token = tokens.find(credential)
    if token is None:
        metrics.error("forbidden")
        return json_error(403, "invalid admin token")
    wanted, list_name = required(request) if need is None else (need, None)
    if not token.may(wanted, list_name):
        metrics.error("forbidden")
        return json_error(403, missing_role(token, wanted, list_name))
    request[REQUEST_TOKEN] = token
    return None


def explain_refusal(request: web.Request) -> web.Response | None:
    """Who may explain: admin tokens when configured, else the screening endpoints' auth."""
    tokens = request.app.get(ADMIN_TOKENS)
    if tokens is not None and tokens.tokens:
        return admin_refusal(request, "read")
    return request.app[AUTH].refuse(request)


def admin_only(handler: Handler) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        refusal = admin_refusal(request)
        if refusal is not None:
            return refusal
        try:
            return await handler(request)
        except AdminError as exc:
            return _json(exc.body, exc.status)
        except RedisError as exc:
            logger.warning("admin %s %s: Redis error: %r", request.method, request.path, exc)
            return json_error(503, f"Redis unavailable, nothing was changed: {exc}")

    guarded.__name__ = handler.__name__
    guarded.__doc__ = handler.__doc__
    return json_errors(guarded)  # aiohttp's HTTP errors (413, ...) as JSON


class AdminError(Exception):
    """An admin request that cannot be served; carries the status and the JSON body."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = api.Error(error=message, **extra)


# --- helpers ----------------------------------------------------------------------------
def _json(body: BaseModel, status: int = 200) -> web.Response:
    return web.Response(status=status, body=api.answer(body), content_type=_JSON)


def list_kind(request: web.Request) -> tuple[str, ListKind]:
    """The configured list a route names, and its kind; AdminError 400/404 otherwise."""
    name = request.match_info["name"]
    if not LIST_NAME_RE.fullmatch(name):
        raise AdminError(400, f"invalid list name {name[:80]!r}: use 1-64 of a-z, 0-9, '_', '-'")
    spec = request.app[CONFIG].lists.get(name)
    if spec is None:
        configured = ", ".join(request.app[CONFIG].lists) or "none"
        raise AdminError(404, f"unknown list {name!r}; configured lists: {configured}")
    return name, spec.kind


def _canonical(request: web.Request, kind: ListKind, raw: str, *, adding: bool = False) -> str:
    """The entry as stored; an added number must also be dialable (or the list allow it)."""
    config = request.app[CONFIG]
    country = config.caller.default_country
    try:
        if adding:
            short_codes = config.lists[request.match_info["name"]].allow_short_codes
            return new_entry(kind, raw, country, allow_short_codes=short_codes)
        return canonical(kind, raw, country)
    except BadEntry as exc:
        raise AdminError(400, f"bad entry for a {kind} list: {exc}", entry=raw[:200]) from None


async def _list_info(request: web.Request, name: str) -> api.ListInfo:
    config = request.app[CONFIG]
    spec = config.lists[name]
    meta = await request.app[STORE].meta(name)
    stored = None
    if meta is not None:
        # A loader older than the redaction stored its source as given.
        source = redact(meta.source) if meta.source else meta.source
        stored = api.ListMeta.model_validate({**meta.as_dict(), "source": source})
    cache = request.app[CACHE]
    copy = cache.lists.get(name)
    loaded = None
    if copy is not None:
        state = cache.loaded[name]
        loaded = api.LoadedCopy(entries=copy.size, gen=state.gen, version=state.version)
    info = api.ListInfo(
        name=name,
        kind=spec.kind,
        description=spec.description,
        source=redact(spec.source) if spec.source else None,
        interval_s=spec.interval_s,
        meta=stored,
        loaded=loaded,
    )
    if spec.source is not None and spec.kind != "subscribers":
        adds, dels = await overlay.counts(request.app[STORE].redis, name)
        info.overlay = api.OverlayCounts(adds=adds, dels=dels)
    return info


async def read_body(request: web.Request) -> bytes:
    """An admin request's body: 413 over ``admin.max_body_bytes``."""
    limit = request.app[CONFIG].admin.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise AdminError(413, f"request body over {limit} bytes")
    data = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        data += chunk
        if len(data) > limit:
            raise AdminError(413, f"request body over {limit} bytes")
    return bytes(data)


# --- routes -----------------------------------------------------------------------------
async def openapi(request: web.Request) -> web.Response:
    """``GET /v1/openapi.json``: the OpenAPI 3 description of every route."""
    return web.Response(body=request.app[OPENAPI], content_type=_JSON)


async def list_lists(request: web.Request) -> web.Response:
    """``GET /v1/lists``: every configured list with its metadata."""
    names = list(request.app[CONFIG].lists)
    return _json(api.Lists(lists=[await _list_info(request, name) for name in names]))


async def get_list(request: web.Request) -> web.Response:
    """``GET /v1/lists/{name}``: one list with its metadata."""
    name, _ = list_kind(request)
    return _json(await _list_info(request, name))


async def export_entries(request: web.Request) -> web.StreamResponse:
    """``GET /v1/lists/{name}/entries``: the whole list as CSV, streamed."""
    name, kind = list_kind(request)
    return await stream_export(request, name, kind)


async def check_entry(request: web.Request) -> web.Response:
    """``GET /v1/lists/{name}/entries/{entry}``: is the entry on the list (asks Redis)?

    An entry not on the list is ``404``, like any resource that is not there (one just
    deleted included), with ``"listed": false`` for clients that read that.
    """
    name, kind = list_kind(request)
    entry = _canonical(request, kind, request.match_info["entry"])
    store = request.app[STORE]
    if not await store.contains(name, kind, entry):
        not_listed = api.NotListed(list=name, entry=entry, listed=False, error="not on the list")
        await _show_overlay(request, name, entry, not_listed)
        return _json(not_listed, 404)
    listed = api.EntryState(list=name, entry=entry, listed=True)
    await _show_overlay(request, name, entry, listed)
    return _json(listed)


async def _show_overlay(request: web.Request, name: str, entry: str, state: api.EntryState) -> None:
    """On a list with a source, say whether the admin overlay holds the entry."""
    if request.app[CONFIG].lists[name].source is not None:
        side, expires_at = await overlay.state_of(request.app[STORE].redis, name, entry)
        state.overlay, state.expires_at = side, expires_at


async def add_entry(request: web.Request) -> web.Response:
    """``PUT /v1/lists/{name}/entries/{entry}[?ttl_s=]``: add one entry (idempotent)."""
    return await _write_one(request, adding=True)


async def remove_entry(request: web.Request) -> web.Response:
    """``DELETE /v1/lists/{name}/entries/{entry}[?ttl_s=]``: remove one entry (idempotent)."""
    return await _write_one(request, adding=False)


async def _write_one(request: web.Request, *, adding: bool) -> web.Response:
    """One admin write; on a list with a source it is kept in the overlay (core/overlay.py)."""
    name, kind = list_kind(request)
    entry = _canonical(request, kind, request.match_info["entry"], adding=adding)
    ttl_s = ttl_s_of(request.query.get("ttl_s"))
    sourced = request.app[CONFIG].lists[name].source is not None
    if ttl_s is not None and not sourced:
        raise AdminError(400, "ttl_s is for lists with a source (the admin overlay)")
    change = {"add": [entry]} if adding else {"remove": [entry]}
    store = request.app[STORE]
    version = await store.change(name, kind, **change, overlay=sourced, ttl_s=ttl_s)
    logger.info(
        "admin: %s %r %s list %s (version %d%s)",
        "added" if adding else "removed",
        entry,
        "to" if adding else "from",
        name,
        version,
        ", overlay" if sourced else "",
    )
    await audit_change(request, "add" if adding else "remove", name, version, entry=entry)
    state = api.EntryState(list=name, entry=entry, listed=adding, version=version)
    if sourced:
        side, expires_at = await overlay.state_of(store.redis, name, entry)
        state.overlay, state.expires_at = side, expires_at
    return _json(state)


def ttl_s_of(raw: str | None) -> float | None:
    """The ``?ttl_s=`` of an admin write (None when absent); AdminError 400 if bad."""
    if raw is None:
        return None
    try:
        ttl_s = float(raw)
    except ValueError:
        ttl_s = -1.0
    if not 0 < ttl_s <= api.MAX_OVERLAY_TTL_S:  # NaN fails too
        raise AdminError(
            400, f"ttl_s must be a number of seconds, 0 < ttl_s <= {api.MAX_OVERLAY_TTL_S}"
        )
    return ttl_s


async def bulk_change(request: web.Request) -> web.Response:
    """``POST /v1/lists/{name}/entries``: ``{"add": [...], "remove": [...]}``, all or nothing.

    :class:`api.BulkChange` checks the body's shape. Then the entries are counted: over
    ``admin.max_bulk_entries`` is ``413`` before any is looked at. Then every entry is
    checked; if any is bad, nothing is written and the answer lists each bad entry with
    its field and index. An entry may not be both added and removed. The change lands in
    one atomic step (:meth:`ListStore.change`). Everything before the write runs in a
    helper process (:mod:`service.operator.offload`): on the event loop, a 100 k-entry
    body would hold every call this process answers for tens of milliseconds.
    """
    name, kind = list_kind(request)
    body = await read_body(request)
    config = request.app[CONFIG]
    spec = config.lists[name]
    prepared = await request.app[OFFLOAD].prepare(
        body,
        kind,
        config.caller.default_country,
        config.admin.max_bulk_entries,
        strict_add=not spec.allow_short_codes,
    )
    if isinstance(prepared, Refusal):
        raise AdminError(prepared.status, prepared.message, **prepared.extra)
    sourced = spec.source is not None
    if prepared.ttl_s is not None and not sourced:
        raise AdminError(400, "ttl_s is for lists with a source (the admin overlay)")
    adds, removes = await entries(prepared.add), await entries(prepared.remove)
    version = await request.app[STORE].change(
        name, kind, add=adds, remove=removes, overlay=sourced, ttl_s=prepared.ttl_s
    )
    logger.info("admin: list %s +%d -%d (version %d)", name, len(adds), len(removes), version)
    await audit_change(request, "bulk", name, version, added=len(adds), removed=len(removes))
    return _json(api.BulkResult(list=name, added=len(adds), removed=len(removes), version=version))
