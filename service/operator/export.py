"""``GET /v1/lists/{name}/entries``: the list as CSV, streamed (admin token required).

The body is :func:`core.export.export_csv`, sent in chunks as it is read from Redis:
never the whole list in memory, and each piece cut so that the worker's event loop,
which answers calls too, is never held for more than a few milliseconds. The CSV reads
back through ``python -m loader sync --list NAME --from FILE`` (a restore). It ends with
a ``# end of export`` comment line: a body without it was cut short (a Redis failure
mid-stream can only end the connection, the status was sent already).
"""

from __future__ import annotations

import logging

from aiohttp import web
from redis.exceptions import RedisError

from core.config import ListKind
from core.export import ExportError, export_csv
from core.redact import redact_text
from service.appkeys import CONFIG, STORE

logger = logging.getLogger(__name__)


async def stream_export(request: web.Request, name: str, kind: ListKind) -> web.StreamResponse:
    """Stream configured list ``name`` of ``kind`` as CSV."""
    redis = request.app[STORE].redis
    pieces = export_csv(redis, name, kind)
    first = await anext(pieces)  # Redis trouble before a byte is sent is still a 503
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="{name}.csv"',
            "Cache-Control": "no-store",
        }
    )
    response.enable_chunked_encoding()
    await response.prepare(request)
    await response.write(first.encode())
    try:
        async for text in pieces:
            await response.write(text.encode())
    except (RedisError, ExportError, OSError) as exc:
        # Headers are gone: end the stream without its end line, which marks it cut.
        logger.error("export of %s cut short: %s", name, redact_text(str(exc)))
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    logger.info("admin: exported list %s (%s)", name, request.app[CONFIG].lists[name].kind)
    return response
