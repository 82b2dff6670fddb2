"""Fetching a certificate from an x5u URL, which an attacker may have written.

Guards, in order: the URL rules (https unless ``stir.allow_http``; a host and nothing
else: no credentials, no fragment; at most MAX_URL_CHARS), the address rules (every
address the host resolves to, and an IP literal, must be public: not loopback,
private, link-local, multicast or reserved, unless inside ``stir.allow_networks``; the
connection goes to the addresses checked, so a DNS answer cannot change in between),
redirects only to the same scheme, host and port (at most MAX_REDIRECTS), a body cap
(``stir.max_cert_bytes``) and one time limit for the whole fetch.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from core.config import StirSettings

MAX_URL_CHARS = 512
MAX_REDIRECTS = 2
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class FetchError(Exception):
    """A certificate that could not be fetched; ``outcome`` is a metrics label."""

    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(f"{outcome}: {detail}")
        self.outcome = outcome


def address_allowed(address: str, allowed: Sequence[IPNetwork]) -> bool:
    ip = ipaddress.ip_address(address.partition("%")[0])
    if any(ip in net for net in allowed):
        return True
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    return ip.is_global and not ip.is_multicast


def check_url(url: str, settings: StirSettings) -> tuple[str, str, int]:
    """(scheme, host, port) of an acceptable x5u URL; raise FetchError("refused") if not."""
    if len(url) > MAX_URL_CHARS:
        raise FetchError("refused", "URL too long")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise FetchError("refused", "not a URL") from None
    schemes = ("https", "http") if settings.allow_http else ("https",)
    if parts.scheme not in schemes:
        raise FetchError("refused", f"scheme {parts.scheme!r} not allowed")
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise FetchError("refused", "no host, or credentials in the URL")
    if parts.fragment:
        raise FetchError("refused", "a fragment in the URL")
    host = parts.hostname
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:  # a literal address bypasses the resolver: check it here
        if not address_allowed(host, settings.allow_networks):
            raise FetchError("refused", f"address {host} not allowed")
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)


class AddressRefused(OSError):
    """A host name that resolves to an address outside the allowed networks."""


class GuardedResolver(AbstractResolver):
    """A resolver that refuses hosts with any address outside the allowed networks."""

    def __init__(self, allowed: Sequence[IPNetwork]) -> None:
        self.allowed = allowed
        self.inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self.inner.resolve(host, port, family)
        bad = [r["host"] for r in found if not address_allowed(r["host"], self.allowed)]
        if bad:
            raise AddressRefused(f"{host} resolves to an address not allowed: {bad[0]}")
        return found

    async def close(self) -> None:
        await self.inner.close()


def make_session(settings: StirSettings, base_dir: str) -> aiohttp.ClientSession:
    """The client session every certificate fetch of a worker uses."""
    context = ssl.create_default_context()
    if settings.fetch_ca_file:
        ca_file = settings.fetch_ca_file
        if not ca_file.startswith("/"):
            ca_file = f"{base_dir}/{ca_file}"
        context.load_verify_locations(ca_file)
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(settings.allow_networks), ssl=context, limit=32
    )
    return aiohttp.ClientSession(connector=connector, auto_decompress=False)


@dataclass(frozen=True, slots=True)
class Fetched:
    body: bytes
    #: How long the body may be cached, from the response's cache headers.
    ttl_s: int


def cache_ttl_s(control: str | None, expires: str | None, settings: StirSettings) -> int:
    """Cache lifetime from Cache-Control (max-age, no-cache/no-store) or Expires.

    Bounded to [cache_min_s, cache_max_s]; ``cache_default_s`` when neither is given.
    """
    ttl: float | None = None
    for item in (control or "").lower().split(","):
        name, _, value = item.strip().partition("=")
        if name in ("no-store", "no-cache"):
            ttl = 0
            break
        seconds = value.strip('"')
        if name in ("s-maxage", "max-age") and seconds.isascii() and seconds.isdigit():
            ttl = int(seconds)
    if ttl is None and expires:
        try:
            ttl = email.utils.parsedate_to_datetime(expires).timestamp() - time.time()
        except (TypeError, ValueError):
            ttl = 0  # an unreadable Expires means "already expired" (RFC 9111)
    if ttl is None:
        ttl = settings.cache_default_s
    return int(min(max(ttl, settings.cache_min_s), settings.cache_max_s))


async def fetch_cert(session: aiohttp.ClientSession, url: str, settings: StirSettings) -> Fetched:
    """GET an x5u under the guards above; raise FetchError with its outcome label."""
    scheme, host, port = check_url(url, settings)
    timeout = aiohttp.ClientTimeout(total=settings.fetch_timeout_ms / 1000)
    try:
        async with asyncio.timeout(settings.fetch_timeout_ms / 1000):
            for _ in range(MAX_REDIRECTS + 1):
                async with session.get(url, allow_redirects=False, timeout=timeout) as response:
                    if response.status in (301, 302, 303, 307, 308):
                        target = urljoin(url, response.headers.get("Location", ""))
                        if check_url(target, settings) != (scheme, host, port):
                            raise FetchError("refused", "redirect to another host")
                        url = target
                        continue
                    if response.status != 200:
                        raise FetchError("http_error", f"HTTP {response.status}")
                    body = await _read_capped(response, settings.max_cert_bytes)
                    return Fetched(
                        body,
                        cache_ttl_s(
                            response.headers.get("Cache-Control"),
                            response.headers.get("Expires"),
                            settings,
                        ),
                    )
            raise FetchError("refused", "too many redirects")
    except TimeoutError:
        raise FetchError("timeout", f"no answer within {settings.fetch_timeout_ms} ms") from None
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, AddressRefused):
            raise FetchError("refused", str(exc.os_error)) from None
        raise FetchError("error", str(exc) or type(exc).__name__) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise FetchError("error", str(exc) or type(exc).__name__) from None


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    if response.content_length is not None and response.content_length > limit:
        raise FetchError("too_large", f"{response.content_length} bytes")
    body = bytearray()
    async for chunk in response.content.iter_chunked(4096):
        body += chunk
        if len(body) > limit:
            raise FetchError("too_large", f"over {limit} bytes")
    return bytes(body)
