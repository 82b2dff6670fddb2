"""A test STI PKI and a local HTTPS x5u server that can misbehave, for the STIR tests."""

from __future__ import annotations

import asyncio
import ssl
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from devtools.redis_server import free_port
from devtools.stir_pki import StiPKI, pem, sign_passport
from tests.helpers import body_from

CALLER = "15162065613"
CALLED = "19512623062"


class X5uServer:
    """Serves certificate files by path over HTTPS on 127.0.0.1 and counts each GET.

    ``files`` maps a path to (body, headers); ``/hang`` answers only once ``hang`` is
    set (then like any path), ``/redirect?to=`` redirects, anything else is a 404.
    """

    def __init__(self, pki: StiPKI, folder: Path) -> None:
        self.pki = pki
        self.port = free_port()
        self.base = f"https://127.0.0.1:{self.port}"
        self.files: dict[str, tuple[bytes, dict[str, str]]] = {}
        self.hits: Counter[str] = Counter()
        self.folder = folder
        self.hang = asyncio.Event()  # set to release the hanging requests
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def serve(self, path: str, body: bytes, **headers: str) -> str:
        self.files[path] = (body, headers)
        return self.url(path)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.hits[path] += 1
        if path.startswith("/hang"):
            await self.hang.wait()
        if path == "/redirect":
            raise web.HTTPFound(request.query["to"])
        if path not in self.files:
            return web.Response(status=404)
        body, headers = self.files[path]
        return web.Response(body=body, headers=headers, content_type="application/x-pem-file")

    async def start(self) -> X5uServer:
        app = web.Application()
        app.router.add_get("/{path:.*}", self._handle)
        cert, key = self.folder / "tls-cert.pem", self.folder / "tls-key.pem"
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=context).start()
        return self

    async def stop(self) -> None:
        self.hang.set()
        if self._runner is not None:
            await self._runner.cleanup()


@asynccontextmanager
async def x5u_server(pki: StiPKI, folder: Path) -> AsyncIterator[X5uServer]:
    server = await X5uServer(pki, folder).start()
    try:
        yield server
    finally:
        await server.stop()


def stir_settings(files: dict[str, Path], **overrides: Any) -> dict[str, Any]:
    """``stir`` config for the test PKI: loopback allowed, the test TLS CA trusted."""
    return {
        "trust_anchors": str(files["trust_anchors"]),
        "fetch_ca_file": str(files["tls_ca"]),
        "allow_networks": ["127.0.0.0/8"],
        "fetch_timeout_ms": 1000,
        **overrides,
    }


def call_body(identity: str | None, caller: str = CALLER, called: str = CALLED) -> dict[str, Any]:
    """A CarrierX body from ``caller`` to ``called`` carrying ``identity`` (if any)."""
    body = body_from(caller)
    body["To"][0]["user"] = called
    body["To"][0]["raw"] = f"<sip:{called}@10.1.10.190:5060>"
    if identity is not None:
        body["Identity"] = [identity]
    return body


def signed(pki: StiPKI, x5u: str, **options: Any) -> str:
    """A valid Identity value for CALLER -> CALLED (``sign_passport`` options)."""
    orig = options.pop("orig", CALLER)
    dest = options.pop("dest", CALLED)
    key = options.pop("key", pki.sp_key)
    return sign_passport(key, x5u, orig, dest, **options)


__all__ = ["CALLED", "CALLER", "X5uServer", "call_body", "pem", "signed", "stir_settings"]
