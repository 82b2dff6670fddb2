"""Redis clients from a URL, for the service, the loader and the tests alike.

``redis://``, ``rediss://`` and ``unix://`` URLs give a client for one server. Failures
surface fast (one quick retry, short timeouts): the callers have their own loops and
deadlines, and a stuck client would hide an outage from them.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from core.store import RedisClient


class BadRedisUrl(ValueError):
    """A Redis URL with a scheme this project does not know."""


def connect(
    url: str, *, socket_timeout_s: float = 2.0, client_name: str = "callscreen"
) -> RedisClient:
    """A client for ``url``; no connection is made until the first command."""
    scheme = url.split("://", 1)[0].lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise BadRedisUrl(f"unsupported Redis URL scheme {scheme!r} in {redact(url)}")
    return Redis.from_url(
        url,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
        client_name=client_name,
    )


def redact(url: str) -> str:
    """``url`` with any password replaced, for logs and error messages."""
    head, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{head}://{user}:***@{host}" if ":" in creds else f"{head}://***@{host}"
