"""The main listener's request handler: screening calls go straight to their route.

:class:`ScreeningDispatch` matches the four screening ``POST`` path shapes on the raw
path and calls the route's handler with the match information aiohttp's router would
have given, remembered per path (at most :data:`KNOWN_PATHS`). Everything else (other
methods, escapes, braces, empty segments, ``Expect``, apps with middlewares) goes
through ``Application._handle``. Invariant: the answers are the router's
(tests/test_dispatch.py). :class:`DirectRunner` installs it. Why: docs/design.md,
"Screening calls skip the router".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

from aiohttp import hdrs, web
from aiohttp.web_server import Server
from aiohttp.web_urldispatcher import UrlMappingMatchInfo

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: How many distinct paths :class:`ScreeningDispatch` remembers.
KNOWN_PATHS = 1024

#: Characters that stop a path from being taken here: the router decodes escapes
#: before matching, and a dynamic segment never holds a brace.
_ROUTER_ONLY = frozenset("%{}")


class _Shape:
    """One route's path split on ``/``: literal segments, and names where values go."""

    __slots__ = ("app", "handler", "literals", "names", "route")

    def __init__(self, app: web.Application, route: web.AbstractRoute, canonical: str) -> None:
        self.app = app
        self.route = route
        self.handler = route.handler
        self.literals: list[tuple[int, str]] = []
        self.names: list[tuple[int, str]] = []
        for at, segment in enumerate(canonical.split("/")):
            if segment.startswith("{") and segment.endswith("}"):
                self.names.append((at, segment[1:-1]))
            else:
                self.literals.append((at, segment))

    def match(self, parts: list[str]) -> dict[str, str] | None:
        for at, literal in self.literals:
            if parts[at] != literal:
                return None
        found = {}
        for at, name in self.names:
            value = parts[at]
            if not value:
                return None
            found[name] = value
        return found


class ScreeningDispatch:
    """``handler(request)`` for aiohttp's server: screening POSTs direct, the rest routed.

    ``fallback`` is what the server would call otherwise (``Application._handle``).
    ``handlers`` are the route handlers to take directly: their ``POST`` routes must be
    plain ``/literal/{name}`` shapes registered before any route that could also match
    those paths (the router answers the first match; so does this).
    """

    def __init__(
        self,
        app: web.Application,
        fallback: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        handlers: tuple[Handler, ...],
    ) -> None:
        self.fallback = fallback
        #: Paths seen, with their frozen match information and handler (False: routed).
        #: Screening calls come to a few paths (one per trunk group), so after the first
        #: call each costs one dictionary look-up. Bounded: past KNOWN_PATHS (a scan of
        #: made-up paths, say) new paths are matched each time, never remembered.
        self.known: dict[str, tuple[UrlMappingMatchInfo, Handler] | Literal[False]] = {}
        #: Route shapes by segment count; empty (everything routed) with middlewares.
        self.shapes: dict[int, list[_Shape]] = {}
        if app.middlewares:
            return
        for route in app.router.routes():
            info = route.get_info()
            canonical = info.get("formatter", info.get("path"))
            if route.method != hdrs.METH_POST or route.handler not in handlers:
                continue
            if not isinstance(canonical, str) or not _plain(canonical):
                continue
            shape = _Shape(app, route, canonical)
            self.shapes.setdefault(canonical.count("/") + 1, []).append(shape)

    def __call__(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        # A plain method handing back the handler's coroutine: no frame of its own.
        if request.method == hdrs.METH_POST and hdrs.EXPECT not in request.headers:
            path = request.raw_path.partition("?")[0]
            known = self.known.get(path)
            if known is None:
                known = self._look_up(path)
            if known is not False:
                info, handler = known
                request._match_info = info  # type: ignore[attr-defined]
                return handler(request)  # type: ignore[arg-type]
        return self.fallback(request)

    def _look_up(self, path: str) -> tuple[UrlMappingMatchInfo, Handler] | Literal[False]:
        """The match for ``path`` (False: the router's), remembered while there is room."""
        found: tuple[UrlMappingMatchInfo, Handler] | Literal[False] = False
        shapes = self.shapes.get(path.count("/") + 1)
        if shapes is not None and _ROUTER_ONLY.isdisjoint(path):
            parts = path.split("/")
            for shape in shapes:
                values = shape.match(parts)
                if values is not None:
                    info = UrlMappingMatchInfo(values, shape.route)
                    info.add_app(shape.app)
                    info.freeze()
                    found = (info, shape.handler)
                    break
        if len(self.known) < KNOWN_PATHS:
            self.known[path] = found
        return found


class DirectRunner(web.AppRunner):
    """An :class:`aiohttp.web.AppRunner` whose server takes ``direct`` handlers' POSTs
    through :class:`ScreeningDispatch` (none given: the plain runner)."""

    def __init__(
        self, app: web.Application, *, direct: tuple[Handler, ...] = (), **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self.direct = direct

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        if self.direct:
            server.request_handler = ScreeningDispatch(
                self.app, server.request_handler, self.direct
            )
        return server


def _plain(canonical: str) -> bool:
    """Whether every segment is a literal or a whole ``{name}`` (no regex, no mix)."""
    if not canonical.startswith("/"):
        return False
    for segment in canonical.split("/")[1:]:
        if segment.startswith("{"):
            if not segment.endswith("}") or ":" in segment or segment.count("{") != 1:
                return False
        elif "{" in segment or "}" in segment:
            return False
    return True
