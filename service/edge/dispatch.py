"""The main listener's request handler: screening calls go straight to their route.

:class:`ScreeningDispatch` matches the four screening ``POST`` path shapes on the raw
path and calls the route's handler with the match information aiohttp's router would
have given, remembered per path (at most :data:`KNOWN_PATHS`). Everything else (other
methods, escapes, braces, empty segments, ``Expect``, apps with middlewares) goes
through ``Application._handle``. Invariant: the answers are the router's
(tests/test_dispatch.py). :func:`direct_runner` installs it when aiohttp's internals
are in use (:mod:`service.edge.aiohttp_adapter`); otherwise the router takes all.
Why: docs/design.md, "Screening calls skip the router".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web
from aiohttp.web_urldispatcher import UrlMappingMatchInfo

from service.edge.aiohttp_adapter import Handler, InternalRunner, Internals, Known, RawDispatch

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


class ScreeningDispatch(RawDispatch):
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
        super().__init__(fallback)
        #: Paths seen (:attr:`known`), with their frozen match information and handler
        #: (False: routed). Screening calls come to a few paths (one per trunk group), so
        #: after the first call each costs one dictionary look-up. Bounded: past
        #: KNOWN_PATHS (a scan of made-up paths, say) new paths are matched each time.
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

    def look_up(self, path: str) -> Known:
        """The match for ``path`` (False: the router's), remembered while there is room."""
        found: Known = False
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


def direct_runner(
    app: web.Application,
    internals: Internals,
    *,
    direct: tuple[Handler, ...] = (),
    **kwargs: Any,
) -> web.AppRunner:
    """An ``AppRunner`` whose server takes ``direct`` handlers' POSTs through
    :class:`ScreeningDispatch`; the plain runner without internals or handlers.
    ``kwargs`` go to :class:`InternalRunner` (``guard``, ``on_server``) or aiohttp."""
    if not internals.enabled:
        kwargs.pop("guard", None)
        kwargs.pop("on_server", None)
        return web.AppRunner(app, **kwargs)

    def dispatch(
        fallback: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
    ) -> ScreeningDispatch:
        return ScreeningDispatch(app, fallback, direct)

    return InternalRunner(app, dispatch=dispatch if direct else None, **kwargs)


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
