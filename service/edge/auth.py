"""Who may call the screening endpoints (docs/security.md): shared secret, HTTP Basic, source IPs.

A trunk group's ``auth`` block replaces the top-level one; unknown trunk groups and
``POST /`` are checked against the top-level block, so nobody learns which exist.
First the source address against ``allow_cidrs`` (``403``; behind ``trusted_proxies``
the right-most untrusted ``X-Forwarded-For`` hop), then the secret (``/k/<secret>``,
``?key=``) or Basic credentials (``401``). Comparisons are constant-time over SHA-256
digests; refusals are counted and logged without the secret, path or query.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import orjson
from aiohttp import web

from core.config import AuthSettings, Config, ConfigError
from service.metrics import Metrics
from service.ratelimit import RateLimitedLog

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Path prefix that carries the shared secret: ``/k/<secret>`` and ``/k/<secret>/tg/<name>``.
SECRET_PREFIX = "/k/"
_SECRET_SEGMENT = re.compile(r"^/k/[^/]*")
_CHALLENGE = {"WWW-Authenticate": 'Basic realm="callscreen", charset="UTF-8"'}


def _digest(value: str | bytes) -> bytes:
    return hashlib.sha256(value.encode() if isinstance(value, str) else value).digest()


def _matches(given: str | bytes, expected: tuple[bytes, ...]) -> bool:
    """Constant-time: every expected digest is compared, whatever matches first."""
    digest = _digest(given)
    found = False
    for candidate in expected:
        found |= hmac.compare_digest(digest, candidate)
    return found


def redact_path(path: str) -> str:
    """``path`` with the secret segment of ``/k/<secret>/...`` hidden, for logs and errors."""
    return _SECRET_SEGMENT.sub("/k/***", path)


def _address(text: str | None) -> IPAddress | None:
    """An IP address from a peer or ``X-Forwarded-For`` hop (ports and brackets allowed)."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("["):  # [v6] or [v6]:port
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _basic_credentials(header: str) -> bytes | None:
    """The ``user:password`` bytes of an ``Authorization: Basic`` header, or None."""
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        return base64.b64decode(encoded.strip(), validate=True)
    except ValueError:
        return None


def _within(address: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    return any(address in network for network in networks)


@dataclass(frozen=True, slots=True)
class Guard:
    """One resolved ``auth`` block: digests of the secrets, networks, proxies."""

    secrets: tuple[bytes, ...] = ()
    #: Digests of ``user:password`` for each accepted Basic password.
    basic: tuple[bytes, ...] = ()
    allow: tuple[IPNetwork, ...] = ()
    proxies: tuple[IPNetwork, ...] = ()

    @property
    def needs_credentials(self) -> bool:
        return bool(self.secrets or self.basic)

    def client_address(self, request: web.Request) -> IPAddress | None:
        """The caller's address: the peer's, or through trusted proxies, the first hop
        (from the right) of ``X-Forwarded-For`` that is not a trusted proxy."""
        address = _address(request.remote)
        if address is None or not self.proxies or not _within(address, self.proxies):
            return address
        hops = [
            hop
            for value in request.headers.getall("X-Forwarded-For", ())
            for hop in value.split(",")
        ]
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:  # a trusted proxy passed on something unreadable
                return None
            if not _within(address, self.proxies):
                return address
        return address  # every hop is a trusted proxy: the left-most one called

    def problem(self, request: web.Request) -> tuple[int, str, str] | None:
        """``(status, metrics kind, message)`` when the request may not pass, else None."""
        if self.allow:
            address = self.client_address(request)
            if address is None or not _within(address, self.allow):
                return 403, "forbidden", f"source address {address or 'unknown'} not allowed"
        if not self.needs_credentials:
            return None
        if self.secrets:
            secret = request.match_info.get("secret")
            if secret is None:
                secret = request.query.get("key")
            if secret is not None and _matches(secret, self.secrets):
                return None
        if self.basic:
            sent = _basic_credentials(request.headers.get("Authorization", ""))
            if sent is not None and _matches(sent, self.basic):
                return None
        return 401, "unauthorized", "missing or wrong credentials"


def _env_values(name: str, where: str, environ: Mapping[str, str]) -> tuple[str, ...]:
    values = tuple(v.strip() for v in environ.get(name, "").split(",") if v.strip())
    if not values:
        raise ConfigError(f"config: {where}: environment variable {name} is not set or empty")
    return values


def resolve_guard(settings: AuthSettings, where: str, environ: Mapping[str, str]) -> Guard:
    """Read one ``auth`` block's secrets from the environment; raise ConfigError if unset."""
    secrets: tuple[bytes, ...] = ()
    basic: tuple[bytes, ...] = ()
    if settings.secret_env:
        secrets = tuple(
            _digest(v) for v in _env_values(settings.secret_env, f"{where}.secret_env", environ)
        )
    if settings.basic_user and settings.basic_password_env:
        passwords = _env_values(settings.basic_password_env, f"{where}.basic_password_env", environ)
        basic = tuple(_digest(f"{settings.basic_user}:{p}") for p in passwords)
    return Guard(secrets, basic, settings.allow_cidrs, settings.trusted_proxies)


def check_secrets(config: Config, environ: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError now if a secret the config names is missing from the environment."""
    env = os.environ if environ is None else environ
    resolve_guard(config.auth, "auth", env)
    for name, group in config.trunk_groups.items():
        if group.auth is not None:
            resolve_guard(group.auth, f"trunk_groups.{name}.auth", env)


class HandlerAuth:
    """The guards of every trunk group, and the check the screening handlers call first."""

    def __init__(
        self, config: Config, metrics: Metrics, environ: Mapping[str, str] | None = None
    ) -> None:
        self.metrics = metrics
        self._warn = RateLimitedLog(logger, interval_s=10.0)
        self.reconfigure(config, environ)

    def reconfigure(self, config: Config, environ: Mapping[str, str] | None = None) -> None:
        """Take the guards from ``config`` (at start, and by a config reload in place)."""
        env = os.environ if environ is None else environ
        self.default = resolve_guard(config.auth, "auth", env)
        self.by_group: dict[str, Guard] = {
            name: resolve_guard(group.auth, f"trunk_groups.{name}.auth", env)
            for name, group in config.trunk_groups.items()
            if group.auth is not None
        }
        #: False when no guard checks anything: :meth:`refuse` then returns at once.
        self.enabled = config.auth.enabled or any(
            g.auth.enabled for g in config.trunk_groups.values() if g.auth is not None
        )

    def refuse(self, request: web.Request) -> web.Response | None:
        """A 401/403 JSON answer when ``request`` may not be screened, else None."""
        if not self.enabled:
            return None
        group = request.match_info.get("trunk_group")
        guard = self.by_group.get(group, self.default) if group else self.default
        found = guard.problem(request)
        if found is None:
            return None
        status, kind, message = found
        self.metrics.error(kind)
        self._warn.warning(
            "refused %s request (%s) for trunk group %r from %s",
            kind, message, (group or "")[:64], request.remote or "unknown", cause=kind,
        )  # fmt: skip
        headers = _CHALLENGE if status == 401 and guard.basic else None
        return web.Response(
            status=status,
            body=orjson.dumps({"error": f"{kind}: {message}"}),
            content_type="application/json",
            headers=headers,
        )
