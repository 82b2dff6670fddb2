"""The OpenAPI 3.1 description of the service, served at ``GET /v1/openapi.json``.

Written by hand next to the routes it describes; tests check that every route of the
app is in it and nothing else is (tests/test_admin_openapi.py), and schemathesis checks
the answers against it. The configured list and trunk group names are filled in as
``enum`` values, so the document shows what this deployment accepts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}
_LIST_NAME = {"type": "string", "pattern": "^[a-z0-9_-]{1,64}$"}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json_content(_ERROR)}


_UNAUTHORIZED = {
    "description": "No admin token: send `Authorization: Bearer <token>`.",
    "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    "content": _json_content(_ERROR),
}
_FORBIDDEN = _error("Wrong admin token, or the admin API is disabled (no tokens set).")
_UNAVAILABLE = _error("Redis did not answer; nothing was changed.")
_ADMIN_ERRORS = {"401": _UNAUTHORIZED, "403": _FORBIDDEN, "503": _UNAVAILABLE}

_NAME_PARAM = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "List name, as configured.",
    "schema": _LIST_NAME,
}
_ENTRY_PARAM = {
    "name": "entry",
    "in": "path",
    "required": True,
    "description": "A number (any common format), a prefix, or a CNAM entry "
    "(`contains:` / `re:` / exact), by the list's kind; URL-encoded.",
    "schema": {"type": "string", "minLength": 1},
    "examples": {"number": {"value": "15162065613"}, "name": {"value": "contains:warranty"}},
}
_TRUNK_GROUP_PARAM = {
    "name": "trunk_group",
    "in": "path",
    "required": True,
    "description": "A key of `trunk_groups` in config.yaml.",
    "schema": {"type": "string"},
}
_SECRET_PARAM = {
    "name": "secret",
    "in": "path",
    "required": True,
    "description": "The handler shared secret, when configured.",
    "schema": {"type": "string"},
}
_KEY_QUERY = {
    "name": "key",
    "in": "query",
    "required": False,
    "description": "The handler shared secret, when configured (instead of the path).",
    "schema": {"type": "string"},
}

_SIP_BODY = {
    "required": True,
    "description": "The call's SIP headers as CarrierX sends them: header name -> values.",
    "content": _json_content({"$ref": "#/components/schemas/SipHeaders"}),
}
_SCREEN_RESPONSES = {
    "200": {
        "description": "`[]` lets the call continue; a reject action blocks it.",
        "content": _json_content({"$ref": "#/components/schemas/Actions"}),
    },
    "400": _error("The body is not JSON, not UTF-8, or not an object."),
    "401": {
        "description": "Handler authentication is on and no credentials came.",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
        "content": _json_content(_ERROR),
    },
    "403": _error("Wrong credentials, or the source address is not allowed."),
    "404": _error("Unknown trunk group."),
    "413": _error("The body is over `server.max_body_bytes`."),
}
_EXPLAIN_RESPONSES = {
    **_SCREEN_RESPONSES,
    "200": {
        "description": "The decision, the rule and list behind it, and the caller as parsed.",
        "content": _json_content({"$ref": "#/components/schemas/Explanation"}),
    },
}


def _screen(summary: str, params: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "tags": ["screening"],
            "parameters": [*params, _KEY_QUERY],
            "requestBody": _SIP_BODY,
            "responses": _SCREEN_RESPONSES,
            "security": [{}, {"handlerBasic": []}],
        }
    }


def _explain(params: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "post": {
            "summary": "Why this call would be blocked or allowed (counts nothing).",
            "description": "Needs an admin token while admin tokens are configured; "
            "otherwise the screening endpoints' authentication applies.",
            "tags": ["screening"],
            "parameters": [*params, _KEY_QUERY],
            "requestBody": _SIP_BODY,
            "responses": _EXPLAIN_RESPONSES,
            "security": [{"adminToken": []}, {}, {"handlerBasic": []}],
        }
    }


def _admin(
    summary: str, responses: dict[str, Any], *, params: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "tags": ["admin"],
        "responses": {**responses, **_ADMIN_ERRORS},
        "security": [{"adminToken": []}],
    }
    if params:
        operation["parameters"] = params
    return operation


_ENTRY_STATE = {
    "description": "The entry (canonical form) and whether it is on the list.",
    "content": _json_content({"$ref": "#/components/schemas/EntryState"}),
}
_ENTRY_ERRORS = {"400": _error("Bad list name or entry."), "404": _error("Unknown list.")}


def _build() -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/": _screen("Screen a call under `default_policy` (the CarrierX handler).", []),
        "/tg/{trunk_group}": _screen(
            "Screen a call under the trunk group's policy.", [_TRUNK_GROUP_PARAM]
        ),
        "/k/{secret}": _screen("`POST /` with the shared secret in the path.", [_SECRET_PARAM]),
        "/k/{secret}/tg/{trunk_group}": _screen(
            "`POST /tg/{trunk_group}` with the shared secret in the path.",
            [_SECRET_PARAM, _TRUNK_GROUP_PARAM],
        ),
        "/v1/explain": _explain([]),
        "/v1/explain/tg/{trunk_group}": _explain([_TRUNK_GROUP_PARAM]),
        "/healthz": {
            "get": {
                "summary": "Alive: the process serves HTTP.",
                "tags": ["operations"],
                "responses": {
                    "200": {"description": "Alive.", "content": _json_content({"type": "object"})}
                },
            }
        },
        "/readyz": {
            "get": {
                "summary": "Ready: Redis answers and every list a policy uses is loaded.",
                "tags": ["operations"],
                "responses": {
                    "200": {"description": "Ready.", "content": _json_content({"type": "object"})},
                    "503": {
                        "description": "Not ready; `reasons` says why.",
                        "content": _json_content({"type": "object"}),
                    },
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text exposition format).",
                "tags": ["operations"],
                "responses": {
                    "200": {
                        "description": "Metrics.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/v1/openapi.json": {
            "get": {
                "summary": "This document.",
                "tags": ["admin"],
                "responses": {"200": {"description": "OpenAPI 3.1.", "content": _json_content({})}},
            }
        },
        "/v1/lists": {
            "get": _admin(
                "Every configured list with its metadata.",
                {
                    "200": {
                        "description": "The lists.",
                        "content": _json_content(
                            {
                                "type": "object",
                                "required": ["lists"],
                                "properties": {
                                    "lists": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/ListInfo"},
                                    }
                                },
                            }
                        ),
                    }
                },
            )
        },
        "/v1/lists/{name}": {
            "get": _admin(
                "One list with its metadata.",
                {
                    "200": {
                        "description": "The list.",
                        "content": _json_content({"$ref": "#/components/schemas/ListInfo"}),
                    },
                    **_ENTRY_ERRORS,
                },
                params=[_NAME_PARAM],
            )
        },
        "/v1/lists/{name}/entries": {
            "post": {
                **_admin(
                    "Add and remove many entries at once, all or nothing.",
                    {
                        "200": {
                            "description": "Redis accepted the change.",
                            "content": _json_content({"$ref": "#/components/schemas/BulkResult"}),
                        },
                        "400": _error(
                            "Bad body or entries (`bad_entries` lists each with its index); "
                            "nothing was changed."
                        ),
                        "404": _error("Unknown list."),
                        "413": _error("Too large a body or too many entries."),
                    },
                    params=[_NAME_PARAM],
                ),
                "requestBody": {
                    "required": True,
                    "content": _json_content({"$ref": "#/components/schemas/BulkChange"}),
                },
            }
        },
        "/v1/lists/{name}/entries/{entry}": {
            "get": _admin(
                "Is this entry on the list? (asks Redis)",
                {"200": _ENTRY_STATE, **_ENTRY_ERRORS},
                params=[_NAME_PARAM, _ENTRY_PARAM],
            ),
            "put": _admin(
                "Add one entry; answered after Redis accepted it.",
                {"200": _ENTRY_STATE, **_ENTRY_ERRORS},
                params=[_NAME_PARAM, _ENTRY_PARAM],
            ),
            "delete": _admin(
                "Remove one entry; answered after Redis accepted it.",
                {"200": _ENTRY_STATE, **_ENTRY_ERRORS},
                params=[_NAME_PARAM, _ENTRY_PARAM],
            ),
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "callscreen",
            "version": "1",
            "description": "Call screening for CarrierX trunk groups, and its admin API.",
        },
        "paths": paths,
        "components": {"schemas": _SCHEMAS, "securitySchemes": _SECURITY},
    }


_SECURITY = {
    "adminToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "A token from the variable named by `admin.tokens_env`.",
    },
    "handlerBasic": {
        "type": "http",
        "scheme": "basic",
        "description": "Handler Basic credentials, when configured.",
    },
}

_NULLABLE_INT = {"type": ["integer", "null"]}
_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string"},
            "entry": {"type": "string"},
            "entries": {"type": "array", "items": {"type": "string"}},
            "bad_entries": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["field", "index", "error"],
                    "properties": {
                        "field": {"enum": ["add", "remove"]},
                        "index": {"type": "integer", "minimum": 0},
                        "entry": {"type": "string"},
                        "error": {"type": "string"},
                    },
                },
            },
        },
    },
    "SipHeaders": {
        "type": "object",
        "additionalProperties": {"type": "array"},
        "example": {
            "From": [{"user": "15162065613", "host": "10.1.10.190", "name": "John Smith"}],
            "To": [{"user": "19512623062", "host": "10.1.10.190:5060"}],
        },
    },
    "Actions": {
        "type": "array",
        "maxItems": 1,
        "items": {
            "type": "object",
            "required": ["action", "operands"],
            "properties": {
                "action": {"const": "reject"},
                "operands": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": '[reason, tag], e.g. ["unavailable", "aniblock"].',
                    "minItems": 2,
                    "maxItems": 2,
                },
            },
        },
    },
    "Explanation": {
        "type": "object",
        "required": ["decision", "answer", "policy", "rule", "caller"],
        "properties": {
            "decision": {"enum": ["allow", "reject"]},
            "answer": {"$ref": "#/components/schemas/Actions"},
            "trunk_group": {"type": ["string", "null"]},
            "policy": {"type": "string"},
            "rule": {"type": "string"},
            "list": {"type": ["string", "null"]},
            "caller": {"type": "object"},
        },
    },
    "ListMeta": {
        "type": "object",
        "description": "As stored in Redis by the last sync and changes.",
        "properties": {
            "gen": {"type": "integer"},
            "version": {"type": "integer"},
            "size": {"type": "integer", "description": "Entries in the base (last sync)."},
            "source": {"type": "string"},
            "checksum": {"type": "string"},
            "synced_at": {"type": "number", "description": "Unix time; 0: never synced."},
            "rows_read": {"type": "integer"},
            "rows_rejected": {"type": "integer"},
            "added": {"type": "integer"},
            "removed": {"type": "integer"},
            "pending_adds": {"type": "integer"},
            "pending_dels": {"type": "integer"},
        },
    },
    "ListInfo": {
        "type": "object",
        "required": ["name", "kind", "meta", "loaded"],
        "properties": {
            "name": _LIST_NAME,
            "kind": {"enum": ["numbers", "prefixes", "names"]},
            "description": {"type": "string"},
            "source": {"type": ["string", "null"]},
            "interval_s": _NULLABLE_INT,
            "meta": {
                "oneOf": [{"$ref": "#/components/schemas/ListMeta"}, {"type": "null"}],
                "description": "null: never written.",
            },
            "loaded": {
                "description": "This instance's copy; null: not loaded.",
                "oneOf": [
                    {
                        "type": "object",
                        "required": ["entries", "gen", "version"],
                        "properties": {
                            "entries": {"type": "integer"},
                            "gen": {"type": "integer"},
                            "version": {"type": "integer"},
                        },
                    },
                    {"type": "null"},
                ],
            },
        },
    },
    "EntryState": {
        "type": "object",
        "required": ["list", "entry", "listed"],
        "properties": {
            "list": _LIST_NAME,
            "entry": {"type": "string"},
            "listed": {"type": "boolean"},
            "version": {"type": "integer", "description": "After a write: the list's version."},
        },
    },
    "BulkChange": {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "properties": {
            "add": {"type": "array", "items": {"type": "string"}},
            "remove": {"type": "array", "items": {"type": "string"}},
        },
        "example": {"add": ["+1 516 206 5617"], "remove": ["15162065613"]},
    },
    "BulkResult": {
        "type": "object",
        "required": ["list", "added", "removed", "version"],
        "properties": {
            "list": _LIST_NAME,
            "added": {"type": "integer"},
            "removed": {"type": "integer"},
            "version": {"type": "integer"},
        },
    },
}


def openapi_document(lists: Iterable[str] = (), trunk_groups: Iterable[str] = ()) -> dict[str, Any]:
    """The document; the configured list and trunk group names become ``enum`` values."""
    document = _build()
    lists, trunk_groups = sorted(lists), sorted(trunk_groups)
    for path_item in document["paths"].values():
        for operation in path_item.values():
            params = operation.get("parameters", [])
            operation["parameters"] = [_named(p, lists, trunk_groups) for p in params]
            if not operation["parameters"]:
                del operation["parameters"]
    return document


def _named(param: dict[str, Any], lists: list[str], trunk_groups: list[str]) -> dict[str, Any]:
    names = {"name": lists, "trunk_group": trunk_groups}.get(param["name"])
    if param["in"] != "path" or not names:
        return param
    return {**param, "schema": {**param["schema"], "enum": names}}
