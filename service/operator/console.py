"""The operator console: one page at ``/console`` on the operator listener (docs/console.md).

The page, its script and its style are files of this package, served as they are: no
build step, nothing fetched from elsewhere (the Content-Security-Policy allows this
origin only). The page holds no data; its script asks the admin API for everything
with the token the operator typed, kept in ``sessionStorage`` (this tab only, gone when
it closes) and sent as ``Authorization: Bearer``. No cookie, so no request the browser
sends by itself carries a credential. What a token may do is the API's to decide; the
script only leaves out the controls its role may not use.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from service.edge.errors import json_errors

_FILES = {
    "/console": ("console.html", "text/html"),
    "/console/console.js": ("console.js", "text/javascript"),
    "/console/console.css": ("console.css", "text/css"),
}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def add_console_routes(app: web.Application) -> None:
    """Serve the console's three files (read now, once)."""
    folder = resources.files("service.operator") / "console_files"
    for path, (name, media) in _FILES.items():
        body = (folder / name).read_bytes()
        app.router.add_get(path, json_errors(_serve(body, media)))


def _serve(body: bytes, media: str):  # type: ignore[no-untyped-def]
    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=media, charset="utf-8", headers=_HEADERS)

    return serve
