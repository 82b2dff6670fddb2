"""Reading a screening-shaped request: its trunk group's policy and its JSON body.

Shared by the screening handler and explain. A request the service cannot use raises
:class:`BadRequest`, which the caller answers as a 4xx JSON error (docs/failure.md).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web

from service.edge.errors import json_error
from service.screening.policy import CompiledPolicy
from service.screening.screen import Screener

logger = logging.getLogger(__name__)


class BadRequest(Exception):
    """A request the service cannot screen; carries the HTTP status and message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


async def read_body(request: web.Request) -> dict[str, Any]:
    """The decoded JSON object; aiohttp enforces ``server.max_body_bytes`` while reading."""
    try:
        raw = arrived_body(request)
        if raw is None:
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(request) from None
    return decode(raw)


def arrived_body(request: web.Request) -> bytes | None:
    """The whole body if it has all arrived (a call's usually comes in the headers'
    packet), taken at once; None while more is to come: then ``await request.read()``.

    ``request.read()`` would give the same bytes through two ``readany()`` awaits and
    two copies. The body is taken from the payload, so the request is read once, by
    this or by ``read()``. Over ``server.max_body_bytes`` raises 413's
    :class:`BadRequest`, as ``read()`` refuses it.
    """
    content = request.content
    if not content.is_eof() or content.exception() is not None:
        return None
    raw = content.read_nowait()
    limit = request.client_max_size
    if limit and len(raw) > limit:
        raise too_large(request)
    return raw


def too_large(request: web.Request) -> BadRequest:
    return BadRequest(413, "too_large", f"request body over {request.client_max_size} bytes")


def decode(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(400, "bad_json", f"request body is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(400, "not_object", "request body must be a JSON object of SIP headers")
    return body


def policy_of(screener: Screener, request: web.Request) -> tuple[str, CompiledPolicy]:
    """(metrics label, policy) of the request's trunk group; 404 when unknown."""
    trunk_group = request.match_info.get("trunk_group")
    found = screener.policy_for(trunk_group)
    if found is None:
        logger.warning(
            "request for unknown trunk group %r", trunk_group[:64] if trunk_group else ""
        )
        raise BadRequest(404, "unknown_trunk_group", f"unknown trunk group {trunk_group!r}")
    return found


def refuse(screener: Screener, exc: BadRequest) -> web.Response:
    """The 4xx answer for ``exc``, counted by kind."""
    screener.metrics.error(exc.kind)
    return json_error(exc.status, exc.message)
