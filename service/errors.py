"""HTTP errors as JSON, mapped in one place.

Handlers return :func:`json_error` for the errors they expect; :func:`error_middleware`
turns aiohttp's own HTTP errors (404, 405, 413) into the same ``{"error": "..."}``
shape and logs anything unexpected once, answering 500 only off the screening path
(the screening handlers answer by ``on_error`` instead).
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from service.appkeys import METRICS
from service.auth import redact_path

logger = logging.getLogger(__name__)

_KIND_BY_STATUS = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"error": message}),
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = _KIND_BY_STATUS.get(exc.status)
        if kind:
            request.app[METRICS].error(kind)
        headers = {}
        if exc.status == 405:
            allowed = getattr(exc, "allowed_methods", ())
            headers["Allow"] = ", ".join(sorted(allowed))
            message = f"method {request.method} not allowed; use {headers['Allow']}"
        elif exc.status == 413:
            message = "request body too large"
        elif exc.status == 404:
            message = f"no such endpoint: {redact_path(request.path)}"
        else:
            message = exc.reason
        return json_error(exc.status, message, headers or None)
    except Exception:
        logger.exception("unexpected error on %s %s", request.method, redact_path(request.path))
        request.app[METRICS].error("internal")
        return json_error(500, "internal error")
