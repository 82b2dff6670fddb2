"""Redis clients from a URL, for the service, the loader and the tests alike.

The scheme picks the topology: ``redis://``/``rediss://``/``unix://`` one server;
``redis+sentinel://host[:port][,...]/service[/db]`` the primary the Sentinels name
(their own credentials as ``?sentinel_username=&sentinel_password=``);
``redis+cluster://host[:port][,...]`` a Cluster discovered from any node. The
``rediss+`` forms use TLS throughout. Failures surface fast (one quick retry, short
timeouts): callers have their own loops and deadlines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff

# Re-exported: redact() lived here first, and callers still import it from this module.
from core.redact import redact as redact  # noqa: PLC0414
from core.shards import LeanRedis, ShardedCluster
from core.store import RedisClient

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
_SERVER_SCHEMES = ("redis", "rediss", "unix")
_SENTINEL_QUERY = ("sentinel_username", "sentinel_password")
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_REDIS_PORT = 6379


class BadRedisUrl(ValueError):
    """A Redis URL this project cannot use; the message shows it with passwords hidden."""


class SentinelRedis(Redis):
    """The primary behind Sentinel; closing it closes the Sentinel connections too."""

    owned_sentinel: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.owned_sentinel is not None:
            await self.owned_sentinel.aclose()


@dataclass(frozen=True, slots=True)
class MultiHostUrl:
    """A parsed ``redis+sentinel://`` or ``redis+cluster://`` URL."""

    scheme: str
    hosts: tuple[tuple[str, int], ...]
    path: tuple[str, ...]
    username: str | None = None
    password: str | None = None
    query: dict[str, str] = field(default_factory=dict)

    @property
    def tls(self) -> bool:
        return self.scheme.startswith("rediss")


def _fail(url: str, problem: str) -> BadRedisUrl:
    return BadRedisUrl(f"Redis URL {redact(url)}: {problem}")


def _host_port(url: str, item: str, default_port: int) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, _, rest = item[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise _fail(url, f"bad address {item!r}")
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise _fail(url, f"missing host in {item!r}")
    if not port_text:
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise _fail(url, f"bad port in {item!r}")
    return host, int(port_text)


def parse_multi_host(url: str, default_port: int) -> MultiHostUrl:
    """Split a Sentinel or Cluster URL into hosts, path, credentials and query."""
    scheme, _, rest = url.partition("://")
    rest, _, query_text = rest.partition("?")
    # The last "@" ends the credentials even when an unencoded password holds a "/".
    userinfo, at, rest = rest.rpartition("@")
    hosts_text, _, path_text = rest.partition("/")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    items = hosts_text.split(",")
    if not hosts_text or any(not item for item in items):
        raise _fail(url, "give one or more host[:port] separated by commas")
    hosts = tuple(_host_port(url, item, default_port) for item in items)
    path = tuple(part for part in path_text.split("/") if part)
    query = dict(parse_qsl(query_text, keep_blank_values=True))
    return MultiHostUrl(scheme.lower(), hosts, path, username, password, query)


def _db(url: str, text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise _fail(url, f"database must be a number, not {text!r}")
    return int(text)


def _retry() -> Retry:
    return Retry(ExponentialBackoff(cap=0.1, base=0.01), 1)


def _sentinel(url: str, socket_timeout_s: float, client_name: str) -> SentinelRedis:
    parsed = parse_multi_host(url, DEFAULT_SENTINEL_PORT)
    if not parsed.path or len(parsed.path) > 2:
        raise _fail(url, "the path must be /<service name>[/<db>], e.g. /mymaster/0")
    service = parsed.path[0]
    db = _db(url, parsed.path[1]) if len(parsed.path) == 2 else 0
    unknown = sorted(set(parsed.query) - set(_SENTINEL_QUERY))
    if unknown:
        raise _fail(url, f"unknown option(s) {', '.join(unknown)}; known: sentinel_password, "
                    "sentinel_username")  # fmt: skip
    timeouts = {"socket_timeout": socket_timeout_s, "socket_connect_timeout": socket_timeout_s}
    sentinel_kwargs: dict[str, Any] = {**timeouts, "retry": _retry()}
    if parsed.tls:
        sentinel_kwargs["ssl"] = True
    if "sentinel_password" in parsed.query:
        sentinel_kwargs["password"] = parsed.query["sentinel_password"]
        sentinel_kwargs["username"] = parsed.query.get("sentinel_username") or None
    sentinel = Sentinel(list(parsed.hosts), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    client = sentinel.master_for(
        service,
        redis_class=SentinelRedis,
        db=db,
        username=parsed.username,
        password=parsed.password,
        client_name=client_name,
        retry=_retry(),
        ssl=parsed.tls,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
    )
    assert isinstance(client, SentinelRedis)
    client.owned_sentinel = sentinel
    return client


def _tolerate_routing_keys(callback: Callable[..., Any]) -> Callable[..., Any]:
    def parse(response: Any, keys: Any = None, **options: Any) -> Any:
        return callback(response, **options)

    return parse


def _cluster(url: str, socket_timeout_s: float, client_name: str) -> ShardedCluster:
    parsed = parse_multi_host(url, DEFAULT_REDIS_PORT)
    if parsed.path not in ((), ("0",)):
        raise _fail(url, "a Redis Cluster has only database 0; drop the path")
    if parsed.query:
        raise _fail(url, f"unknown option(s) {', '.join(sorted(parsed.query))}")
    client = ShardedCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.hosts],
        username=parsed.username,
        password=parsed.password,
        client_name=client_name,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        # Cluster redirections and node failover need a few tries; keep them quick. The
        # call path and the polls do not go through this client's pipeline, whose retry
        # on a ConnectionError closes every connection (core/shards.py).
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 3),
        ssl=parsed.tls,
    )
    # redis-py 8.1's cluster MULTI/EXEC hands each reply's parser the routing ``keys``
    # option, which most parsers do not take (SMEMBERS, HGETALL, SISMEMBER in a
    # transaction raise TypeError). The dict is shared with every node, so one pass
    # fixes the plain and the transactional paths alike.
    callbacks = client.response_callbacks
    for command, callback in list(callbacks.items()):
        callbacks[command] = _tolerate_routing_keys(callback)
    return client


def connect(
    url: str, *, socket_timeout_s: float = 2.0, client_name: str = "callscreen"
) -> RedisClient:
    """A client for ``url`` (see the module doc); no connection is made until the first command.

    Raises :class:`BadRedisUrl` for a URL that cannot work, naming the problem.
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in SENTINEL_SCHEMES:
        return _sentinel(url, socket_timeout_s, client_name)
    if scheme in CLUSTER_SCHEMES:
        return _cluster(url, socket_timeout_s, client_name)
    if scheme not in _SERVER_SCHEMES:
        known = ", ".join(
            f"{s}://" for s in (*_SERVER_SCHEMES, *SENTINEL_SCHEMES, *CLUSTER_SCHEMES)
        )
        raise _fail(url, f"unsupported scheme {scheme!r}; use one of {known}")
    return LeanRedis.from_url(
        url,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        retry=_retry(),
        client_name=client_name,
    )
