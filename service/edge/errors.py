"""HTTP errors as JSON, mapped in one place, without a middleware.

:func:`json_errors` wraps each non-screening handler: aiohttp's HTTP errors become
``{"error": ...}`` and anything unexpected is logged once and answered 500 (screening
handlers answer their own errors, by ``on_error``, never a 5xx). :func:`no_route` is
the last route: 405 with ``Allow`` when another route has the path, else 404. Why no
middleware: docs/design.md, "Where a call's time goes".
"""

from __future__ import annotations

import logging
from functools import wraps

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from service.appkeys import METRICS
from service.edge.auth import redact_path

logger = logging.getLogger(__name__)

_KIND_BY_STATUS = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"error": message}),
        content_type="application/json",
        headers=headers,
    )


def http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """The JSON answer for one of aiohttp's HTTP errors, counted by kind."""
    kind = _KIND_BY_STATUS.get(exc.status)
    if kind:
        request.app[METRICS].error(kind)
    if exc.status == 413:
        return json_error(413, "request body too large")
    return json_error(exc.status, exc.reason)


def internal_error(request: web.Request) -> web.Response:
    """Log the exception being handled, count it, answer 500."""
    logger.exception("unexpected error on %s %s", request.method, redact_path(request.path))
    request.app[METRICS].error("internal")
    return json_error(500, "internal error")


def client_gone(request: web.Request) -> web.Response:
    """Count a request whose client went away before its body arrived; nobody gets the answer.

    Not a bug, so no traceback and not ``internal``: ``read_timeout`` when the connection
    guard cut a body that took too long (it counted it already), else
    ``client_disconnected``.
    """
    if not getattr(request.protocol, "timed_out", False):
        request.app[METRICS].error("client_disconnected")
    logger.debug("client went away during %s %s", request.method, redact_path(request.path))
    return json_error(400, "client went away")


def json_errors(handler: Handler) -> Handler:
    """``handler``, with aiohttp's HTTP errors and unexpected exceptions answered as JSON."""

    @wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return http_error(request, exc)
        except ConnectionError:
            return client_gone(request)
        except Exception:
            return internal_error(request)

    return guarded


async def no_route(request: web.Request) -> web.Response:
    """The catch-all route: 405 if another route serves the path with other methods, else 404."""
    allowed: set[str] = set()
    this = request.match_info.route.resource
    for resource in request.app.router.resources():
        if resource is not this:
            _match, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        request.app[METRICS].error("method_not_allowed")
        allow = ", ".join(sorted(allowed))
        message = f"method {request.method} not allowed; use {allow}"
        return json_error(405, message, {"Allow": allow})
    request.app[METRICS].error("not_found")
    return json_error(404, f"no such endpoint: {redact_path(request.path)}")
