"""The OpenAPI 3.1 description of the service, served at ``GET /v1/openapi.json``.

Built from a route table (:data:`ROUTES`) and the pydantic models of the bodies
(:mod:`service.operator.models`), whose JSON schemas become ``components/schemas``. Tests
check that every route of the app is in it and nothing else is, and schemathesis checks
the answers against it (tests/test_admin_openapi.py). The configured list and trunk group
names become ``enum`` values of the path parameters, so the document shows what this
deployment accepts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from core.config import ListKind
from service.operator import models as api

_JSON = "application/json"


@dataclass(frozen=True)
class Reply:
    """One documented answer: what it means and its body (any type pydantic describes)."""

    description: str
    body: Any = api.Error
    media: str = _JSON
    #: The answer carries ``WWW-Authenticate`` (401).
    challenge: bool = False


Auth = Literal["none", "handler", "explain", "admin"]


@dataclass(frozen=True)
class Route:
    """One operation; ``auth`` picks its security, and for admin routes adds their refusals."""

    method: str
    path: str
    tag: str
    summary: str
    replies: Mapping[int, Reply]
    request: type | None = None
    auth: Auth = "none"
    description: str | None = None
    #: The kinds of list ``{name}`` may be; the others answer 400.
    kinds: tuple[ListKind, ...] = get_args(ListKind)
    #: Parameters beyond :data:`_PATH_PARAMS`, or in place of one of the same name.
    params: tuple[dict[str, Any], ...] = ()


_SECURITY: dict[Auth, list[dict[str, list[str]]]] = {
    "handler": [{}, {"handlerBasic": []}],
    "explain": [{"adminToken": []}, {}, {"handlerBasic": []}],
    "admin": [{"adminToken": []}],
}
_SECURITY_SCHEMES = {
    "adminToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "A token from `admin.tokens_env` or `admin.tokens_file`; its role "
        "(read, editor of some lists, admin) decides what it may do.",
    },
    "handlerBasic": {
        "type": "http",
        "scheme": "basic",
        "description": "Handler Basic credentials, when configured.",
    },
}


def _param(
    name: str, description: str, schema: dict[str, Any], where: str = "path", **extra: Any
) -> dict[str, Any]:
    """A parameter: required in the path, optional in the query."""
    required = where == "path"
    return {
        "name": name,
        "in": where,
        "required": required,
        "description": description,
        "schema": schema,
        **extra,
    }


_STRING = {"type": "string"}
_NOT_EMPTY = {"type": "string", "minLength": 1}
#: The path parameters, by name; every ``{name}`` in a route's path is one of these.
_PATH_PARAMS = {
    param["name"]: param
    for param in (
        _param("name", "List name, as configured.", TypeAdapter(api.ListName).json_schema()),
        _param("entry", "A number (any common format), a prefix, or a CNAM entry "
               "(`contains:` / `re:` / exact), by the list's kind; URL-encoded.", _NOT_EMPTY,
               examples={"number": {"value": "15162065613"},
                         "name": {"value": "contains:warranty"}}),
        _param("trunk_group", "A key of `trunk_groups` in config.yaml.", _STRING),
        _param("secret", "The handler shared secret, when configured.", _STRING),
        _param("subscriber", "The subscriber (a called number), in any common format.",
               _NOT_EMPTY, examples={"number": {"value": "19512623062"}}),
    )
}  # fmt: skip
_KEY_QUERY = _param(
    "key", "The handler shared secret, when configured (instead of the path).", _STRING, "query"
)
_SUBSCRIBER_ENTRY = _param(
    "entry",
    "A number (any common format) or a prefix ending in `*` (`%2A`).",
    _NOT_EMPTY,
    examples={"number": {"value": "15162065613"}, "prefix": {"value": "1900*"}},
)
_SIDE = _param(
    "side",
    "The side to put the entry on (PUT) or take it off (DELETE); the other side is "
    "left alone: block and allow are separate.",
    {"enum": ["block", "allow"], "default": "block"},
    "query",
)

_TTL = _param(
    "ttl_s",
    "A list with a source: the admin overlay entry expires after this many seconds "
    "(it survives syncs until then); without it, it lasts until changed. `400` for a "
    "list without a source.",
    {"type": "number", "exclusiveMinimum": 0, "maximum": api.MAX_OVERLAY_TTL_S},
    "query",
)

_SCREEN_REPLIES = {
    200: Reply("`[]` lets the call continue; a reject action blocks it.", api.Actions),
    400: Reply("The body is not JSON, not UTF-8, or not an object."),
    401: Reply("Handler authentication is on and no credentials came.", challenge=True),
    403: Reply("Wrong credentials, or the source address is not allowed."),
    404: Reply("Unknown trunk group."),
    413: Reply("The body is over `server.max_body_bytes`."),
}
_EXPLAIN_REPLIES = {
    **_SCREEN_REPLIES,
    200: Reply(
        "The decision, the rule and list behind it, and the caller as parsed.", api.Explanation
    ),
}
_EXPLAIN_AUTH = (
    "Needs an admin token while admin tokens are configured; "
    "otherwise the screening endpoints' authentication applies."
)
#: Every admin route may answer these.
_ADMIN_REFUSALS = {
    401: Reply("No admin token: send `Authorization: Bearer <token>`.", challenge=True),
    403: Reply(
        "Wrong admin token, a token without the role this needs (the answer names it), "
        "or the admin API is disabled (no tokens set)."
    ),
    503: Reply("Redis did not answer; nothing was changed."),
}
_BAD_NAME = {400: Reply("Bad list name."), 404: Reply("Unknown list.")}
_BAD_ENTRY = {**_BAD_NAME, 400: Reply("Bad list name or entry.")}
_WRITTEN = Reply("Redis accepted the write.", api.EntryState)
_ENTRY_KINDS: tuple[ListKind, ...] = ("numbers", "prefixes", "names")
#: Schemas that bodies name by reference only (items checked one by one).
_REFERENCED: tuple[type, ...] = (api.SubscriberAdd, api.SubscriberRemove)
_REASON = _param(
    "reason", "Why: kept in the audit trail (at most 500 characters).", _STRING, "query"
)
_LIMIT = _param(
    "limit",
    "Most records answered.",
    {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
    "query",
)
_NUMBER = _param(
    "number",
    "A number, in any common format.",
    _NOT_EMPTY,
    "query",
    required=True,
    examples={"number": {"value": "15162065613"}},
)
_TIME = "Unix seconds or an ISO 8601 time."
_HISTORY_OFF = {404: Reply("Call history is off (`history.enabled`).")}
_RECORDS = Reply("The records, newest first.", dict[str, Any])
_CONSOLE = "The operator console (docs/console.md); the page holds no data."
_SUBSCRIBER_REPLIES = {
    200: Reply("The subscriber's entries, after the write for a write.", api.SubscriberEntries),
    400: Reply("Bad list name, not a subscribers list, or a bad subscriber, entry or side."),
    404: Reply("Unknown list."),
}

ROUTES: tuple[Route, ...] = (
    Route("post", "/", "screening", "Screen a call under `default_policy` (the CarrierX handler).",
          _SCREEN_REPLIES, request=api.SipHeaders, auth="handler"),
    Route("post", "/tg/{trunk_group}", "screening", "Screen a call under the trunk group's policy.",
          _SCREEN_REPLIES, request=api.SipHeaders, auth="handler"),
    Route("post", "/k/{secret}", "screening", "`POST /` with the shared secret in the path.",
          _SCREEN_REPLIES, request=api.SipHeaders, auth="handler"),
    Route("post", "/k/{secret}/tg/{trunk_group}", "screening",
          "`POST /tg/{trunk_group}` with the shared secret in the path.",
          _SCREEN_REPLIES, request=api.SipHeaders, auth="handler"),
    Route("post", "/v1/explain", "screening",
          "Why this call would be blocked or allowed (counts nothing).",
          _EXPLAIN_REPLIES, request=api.SipHeaders, auth="explain", description=_EXPLAIN_AUTH),
    Route("post", "/v1/explain/tg/{trunk_group}", "screening",
          "Why this call would be blocked or allowed under the trunk group's policy.",
          _EXPLAIN_REPLIES, request=api.SipHeaders, auth="explain", description=_EXPLAIN_AUTH),
    Route("get", "/healthz", "operations", "Alive: the process serves HTTP.",
          {200: Reply("Alive.", api.Health)}),
    Route("get", "/readyz", "operations",
          "Ready: Redis answers and every list a policy uses is loaded.",
          {200: Reply("Ready.", api.Readiness | api.Ready),
           503: Reply("Not ready; `reasons` says why.", api.Readiness | api.Ready)},
          description="Beside an operator listener, the handler port answers only "
          "`ready`; the details are on the operator listener."),
    Route("get", "/metrics", "operations", "Prometheus metrics (text exposition format).",
          {200: Reply("Metrics.", str, "text/plain")}),
    Route("post", "/v1/reload", "operations",
          "Re-read the config file, as SIGHUP does; checked first.",
          {202: Reply("The file is good: the reload has started.", api.ReloadStarted),
           409: Reply("Started without a config file (an embedded app)."),
           422: Reply("The file is refused; the last good config keeps serving.",
                      api.ReloadRefused)},
          auth="admin"),
    Route("get", "/v1/openapi.json", "admin", "This document.",
          {200: Reply("OpenAPI 3.1.", dict[str, Any])}),
    Route("get", "/v1/lists", "admin", "Every configured list with its metadata.",
          {200: Reply("The lists.", api.Lists)}, auth="admin"),
    Route("get", "/v1/lists/{name}", "admin", "One list with its metadata.",
          {200: Reply("The list.", api.ListInfo), **_BAD_NAME}, auth="admin"),
    Route("post", "/v1/lists/{name}/entries", "admin",
          "Add and remove many entries at once, all or nothing.",
          {200: Reply("Redis accepted the change.", api.BulkResult),
           400: Reply("Bad body or entries (`bad_entries` lists each with its index); "
                      "nothing was changed."),
           404: Reply("Unknown list."),
           413: Reply("Too large a body or too many entries.")},
          request=api.BulkChange, auth="admin", kinds=_ENTRY_KINDS),
    Route("get", "/v1/lists/{name}/entries", "admin",
          "The whole list as CSV, streamed (a backup; restore with `loader sync --from`).",
          {200: Reply("CSV: a header by kind, one entry (or subscriber pair) a row, and a "
                      "last `# end of export` line; without it the stream was cut short.",
                      str, "text/csv"),
           **_BAD_NAME},
          auth="admin"),
    Route("get", "/v1/lists/{name}/entries/{entry}", "admin",
          "Is this entry on the list? (asks Redis)",
          {200: Reply("On the list.", api.EntryState),
           **_BAD_ENTRY,
           404: Reply("Not on the list (`listed` is false), or unknown list.",
                      api.NotListed | api.Error)},
          auth="admin", kinds=_ENTRY_KINDS),
    Route("put", "/v1/lists/{name}/entries/{entry}", "admin",
          "Add one entry; answered after Redis accepted it (kept across syncs).",
          {200: _WRITTEN, **_BAD_ENTRY}, auth="admin", kinds=_ENTRY_KINDS, params=(_REASON, _TTL)),
    Route("delete", "/v1/lists/{name}/entries/{entry}", "admin",
          "Remove one entry; answered after Redis accepted it (kept across syncs).",
          {200: _WRITTEN, **_BAD_ENTRY}, auth="admin", kinds=_ENTRY_KINDS, params=(_REASON, _TTL)),
    Route("post", "/v1/lists/{name}/subscribers", "admin",
          "Add and remove entries of many subscribers at once; checked whole first.",
          {200: Reply("Redis accepted every change.", api.SubscriberBulkResult),
           400: Reply("Bad list name, not a subscribers list, or a bad body or item "
                      "(`bad_entries` lists each with its index); nothing was changed."),
           404: Reply("Unknown list."),
           409: Reply("A subscriber would hold more than 100 entries; nothing was changed."),
           413: Reply("Too large a body or too many items.")},
          request=api.SubscriberBulkChange, auth="admin", kinds=("subscribers",),
          description="Each item is checked before anything is written. The subscribers' "
          "buckets live on many Redis slots, so the change lands bucket by bucket: a "
          "`503` halfway may leave part of it applied; every item is idempotent, so "
          "sending the request again completes it."),
    Route("get", "/v1/lists/{name}/subscribers/{subscriber}", "admin",
          "One subscriber's block and allow entries (asks Redis).",
          _SUBSCRIBER_REPLIES, auth="admin", kinds=("subscribers",)),
    Route("put", "/v1/lists/{name}/subscribers/{subscriber}/entries/{entry}", "admin",
          "Put one entry on a side of the subscriber; answered after Redis accepted it.",
          {**_SUBSCRIBER_REPLIES, 409: Reply("The subscriber holds the most entries already.")},
          auth="admin", kinds=("subscribers",), params=(_SUBSCRIBER_ENTRY, _SIDE, _TTL)),
    Route("delete", "/v1/lists/{name}/subscribers/{subscriber}/entries/{entry}", "admin",
          "Take one entry off a side of the subscriber; answered after Redis accepted it.",
          _SUBSCRIBER_REPLIES, auth="admin", kinds=("subscribers",),
          params=(_SUBSCRIBER_ENTRY, _SIDE, _TTL)),
    Route("get", "/v1/whoami", "operator", "The token's name, role and the lists it may change.",
          {200: Reply("The token.", dict[str, Any])}, auth="admin"),
    Route("get", "/v1/audit", "operator", "The audit trail: admin changes, syncs, reloads.",
          {200: _RECORDS, 400: Reply("Bad limit.")}, auth="admin",
          params=(_param("entry", "Records of this entry or subscriber.", _STRING, "query"),
                  _param("list", "Records of this list.", _STRING, "query"),
                  _param("action", "Records of this action (add, remove, bulk, sync, ...).",
                         _STRING, "query"), _LIMIT)),
    Route("get", "/v1/history", "operator",
          "A number's recorded calls (as caller or called), newest first.",
          {200: Reply("The calls.", dict[str, Any]),
           400: Reply("Bad number, time or limit."), **_HISTORY_OFF}, auth="admin",
          params=(_NUMBER, _param("since", _TIME, _STRING, "query"),
                  _param("until", _TIME, _STRING, "query"), _LIMIT)),
    Route("get", "/v1/history/recent", "operator",
          "The newest recorded calls of every number, with their count by rule.",
          {200: Reply("The calls.", dict[str, Any]),
           400: Reply("Bad decision or limit."), **_HISTORY_OFF}, auth="admin",
          params=(_param("decision", "Only these.", {"enum": ["reject", "allow"]}, "query"),
                  _LIMIT)),
    Route("get", "/v1/lookup", "operator",
          "Everything about one number: lists, decisions by trunk group, calls, audit.",
          {200: Reply("The number.", dict[str, Any]), 400: Reply("Bad number.")},
          auth="admin", params=(_NUMBER,)),
    Route("get", "/console", "operator", "The operator console's page.",
          {200: Reply(_CONSOLE, str, "text/html")}),
    Route("get", "/console/console.js", "operator", "The console's script.",
          {200: Reply(_CONSOLE, str, "text/javascript")}),
    Route("get", "/console/console.css", "operator", "The console's style.",
          {200: Reply(_CONSOLE, str, "text/css")}),
)  # fmt: skip


class _Schemas(GenerateJsonSchema):
    """pydantic's JSON schemas without the noise: no per-field titles, no ``null`` defaults."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        json_schema = super().default_schema(schema)
        if json_schema.get("default", ...) is None:
            del json_schema["default"]
        return json_schema


def openapi_document(
    lists: Mapping[str, ListKind] | None = None, trunk_groups: Iterable[str] = ()
) -> dict[str, Any]:
    """The document; the configured list and trunk group names become ``enum`` values.

    ``lists`` maps each list's name to its kind: a route taking lists of some kinds only
    names those.
    """
    bodies = {t for r in ROUTES for t in (r.request, *(a.body for a in r.replies.values())) if t}
    bodies.update(_REFERENCED)
    # One mode for requests and answers: the models read and write the same JSON.
    by_body, definitions = TypeAdapter.json_schemas(
        [(body, "validation", TypeAdapter(body)) for body in bodies],
        ref_template="#/components/schemas/{model}",
        union_format="primitive_type_array",
        schema_generator=_Schemas,
    )
    schemas = {body: schema for (body, _), schema in by_body.items()}
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        names = sorted(name for name, kind in (lists or {}).items() if kind in route.kinds)
        enums = {"name": names, "trunk_group": sorted(trunk_groups)}
        paths.setdefault(route.path, {})[route.method] = _operation(route, schemas, enums)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "callscreen",
            "version": "1",
            "description": "Call screening for CarrierX trunk groups, and its admin API.",
        },
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": _SECURITY_SCHEMES,
        },
    }


def _operation(
    route: Route, schemas: Mapping[Any, JsonSchemaValue], enums: Mapping[str, list[str]]
) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": route.summary, "tags": [route.tag]}
    if route.description:
        operation["description"] = route.description
    given = {param["name"]: param for param in route.params}
    parameters = [
        given.pop(name) if name in given else _path_param(name, enums.get(name))
        for name in re.findall(r"{(\w+)}", route.path)
    ]
    parameters += given.values()
    if route.auth in ("handler", "explain"):
        parameters.append(_KEY_QUERY)
    if parameters:
        operation["parameters"] = parameters
    if route.request:
        content = {_JSON: {"schema": schemas[route.request]}}
        operation["requestBody"] = {"required": True, "content": content}
    replies = {**route.replies, **(_ADMIN_REFUSALS if route.auth == "admin" else {})}
    operation["responses"] = {}
    for status, reply in sorted(replies.items()):
        response = {
            "description": reply.description,
            "content": {reply.media: {"schema": schemas[reply.body]}},
        }
        if reply.challenge:
            response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        operation["responses"][str(status)] = response
    if route.auth != "none":
        operation["security"] = _SECURITY[route.auth]
    return operation


def _path_param(name: str, enum: list[str] | None) -> dict[str, Any]:
    param = _PATH_PARAMS[name]
    return {**param, "schema": {**param["schema"], "enum": enum}} if enum else param
