"""The screening answer: a 200 JSON response written in one piece.

:class:`ScreeningAnswer` writes a status line and headers prepared once a second with a
pre-encoded body through the request's own stream writer, instead of building a
``web.Response`` per call; it needs aiohttp's internals (:mod:`.aiohttp_adapter`).
Invariant: the bytes are those aiohttp's ``Response`` would write
(tests/test_answers.py compares them). Apps with ``on_response_prepare`` signals
and HTTP versions other than 1.0/1.1 get a plain ``Response``
(:func:`screening_response`). Why and what it saves: docs/design.md, "The answer
written whole".
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion10, HttpVersion11
from multidict import CIMultiDict, CIMultiDictProxy

from service.edge.aiohttp_adapter import WholeAnswer

CONTENT_TYPE = "application/json"

#: Status line and headers up to ``Content-Length: ``, by HTTP minor version.
_STARTS = {
    minor: f"HTTP/1.{minor} 200 OK\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: "
    for minor in (0, 1)
}
#: The ``Connection`` header by (minor version, keep-alive), as aiohttp sets it: HTTP/1.1
#: says so when it closes, HTTP/1.0 when it keeps the connection open.
_CONNECTION = {
    (1, True): "",
    (1, False): "Connection: close\r\n",
    (0, True): "Connection: keep-alive\r\n",
    (0, False): "",
}


class _Heads:
    """The bytes before the body, by (minor version, keep-alive, body length), for the
    current second's ``Date``; made anew when the date changes."""

    def __init__(self) -> None:
        self.date = ""
        self.heads: dict[tuple[int, bool, int], bytes] = {}

    def get(self, minor: int, keep_alive: bool, length: int) -> bytes:
        date = rfc822_formatted_time()  # aiohttp's own, remade once a second
        if date != self.date:
            self.date = date
            self.heads = {}
        key = (minor, keep_alive, length)
        head = self.heads.get(key)
        if head is None:
            head = self.heads[key] = (
                f"{_STARTS[minor]}{length}\r\nDate: {date}\r\nServer: {SERVER_SOFTWARE}\r\n"
                f"{_CONNECTION[key[:2]]}\r\n"
            ).encode("latin-1")
        return head


_HEADS = _Heads()
_FIXED_HEADERS = CIMultiDictProxy(CIMultiDict({"Content-Type": CONTENT_TYPE}))
_VERSIONS = (HttpVersion11, HttpVersion10)


class ScreeningAnswer(WholeAnswer):
    """``200`` with a JSON ``body``, written whole (service/edge/aiohttp_adapter.py)."""

    heads = _HEADS.get
    fixed_headers = _FIXED_HEADERS


def screening_response(request: web.Request, body: bytes, whole: bool = True) -> web.StreamResponse:
    """The response for a screening answer ``body``: a :class:`ScreeningAnswer` where
    ``whole`` (aiohttp's internals in use) and its bytes are aiohttp's (see the module
    docstring), else a plain ``Response``."""
    if whole and request.version in _VERSIONS and not request.app.on_response_prepare:
        return ScreeningAnswer(body)
    return web.Response(body=body, content_type=CONTENT_TYPE)
