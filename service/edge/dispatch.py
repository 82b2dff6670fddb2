"""The main listener's request handler: screening calls go straight to their route.

aiohttp hands every request to ``Application._handle``, which resolves the path through
the router: it builds a ``yarl.URL`` for the path, walks the resources and matches a
regular expression, then checks middlewares and ``Expect``. For the calls CarrierX
sends, always a ``POST`` to one of four path shapes, that is about a seventh of the
instructions aiohttp itself spends on a request (callgrind: 233 k instructions a request
for a bare aiohttp app, 203 k for the same handler on aiohttp's low-level server).

:class:`ScreeningDispatch` takes those calls by splitting the raw path on ``/`` and
comparing segments with the app's own screening routes, then calls the route's handler
with the match information the router would have given (``request.match_info``,
``request.app``). Everything else takes the usual way through ``Application._handle``:
other methods and paths, a path with percent-escapes, braces or an empty segment,
an ``Expect`` header (100-continue is answered by the route's expect handler there),
and every request of an app with middlewares. So the answers are the router's; only the
look-up is shorter. ``tests/test_dispatch.py`` sends the same requests both ways. A
path's match is worked out once and remembered: the calls to that path share its frozen
match information (at most :data:`KNOWN_PATHS` paths, so made-up ones cannot grow it).

:class:`DirectRunner` is the ``AppRunner`` that installs it: the service's own runner
(``service.edge.connections.GuardedRunner``) is one, and so is the one the tests' service
fixture runs, so every screening test goes through this path. The match information is
put on the request the way ``Application._handle`` does it (``request._match_info``);
aiohttp is pinned in pyproject.toml.
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
