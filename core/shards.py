"""Pipelined batches of single-key commands (key first) that one failing node cannot spread.

On one server or Sentinel: one plain pipeline. On a Cluster: the batch grouped by node
through the client's slot map, each node's share pipelined on a plain client of that
node's own (no retries), all nodes at once. Invariants: a failing node fails only its own
commands, at once, and for :data:`FAIL_FAST_S` after without sending them; a MOVED reply
is followed once; a failure starts a background slot-map refresh every
:data:`REFRESH_INTERVAL_S` until the node answers or no longer serves slots; anything the
client raises reaches the caller as :class:`ShardError`. Why not redis-py's cluster
pipeline: docs/design.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError

from core.wire import Link, settings_of

logger = logging.getLogger(__name__)

#: How often the slot map is read again while a node is down.
REFRESH_INTERVAL_S = 0.1
#: After a node failed, its commands fail unsent for this long (then one batch probes it).
FAIL_FAST_S = 0.05
#: Connection settings carried from the cluster client's nodes to the per-node pools.
_CARRIED = (
    "username", "password", "credential_provider", "client_name", "socket_timeout",
    "socket_connect_timeout", "socket_keepalive", "encoding", "encoding_errors",
    "decode_responses", "ssl_keyfile", "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs",
    "ssl_ca_data", "ssl_check_hostname",
)  # fmt: skip

Command = tuple[Any, ...]


#: Told ``(index, reply)`` for the replies that are final (see :meth:`Dispatcher.run`).
Report = Callable[[list[tuple[int, Any]]], None]


def _ignore(done: list[tuple[int, Any]]) -> None:
    pass


class ShardError(RedisConnectionError):
    """A command was not answered: its node failed (or was recently failing)."""


class Dispatcher:
    """Runs batches of single-key commands (key first) on one Redis, Sentinel or Cluster."""

    def __init__(self, client: Redis | RedisCluster, *, lean: bool = False) -> None:
        """``lean``: send on :mod:`core.wire` links where the settings allow; only for
        an owner that closes the dispatcher (:class:`LeanRedis`, :class:`ShardedCluster`)."""
        self.client = client
        self._allow_links = lean
        self._pools: dict[str, Redis] = {}
        #: Node name -> its lean connection (:mod:`core.wire`), None where its settings
        #: need redis-py's (TLS, a Unix socket, Sentinel).
        self._links: dict[str, Link | None] = {}
        self._plain_link: Link | None = None
        self._cluster_lean: bool | None = None
        #: Asked once: RedisCluster's isinstance goes through typing.Protocol's slow check.
        self._cluster = isinstance(client, RedisCluster)
        if lean and not isinstance(client, RedisCluster):
            settings = settings_of(client.connection_pool)
            self._plain_link = Link(settings) if settings is not None else None
        #: Node name -> monotonic time of its last failure, while it is failing.
        self._down: dict[str, float] = {}
        self._refresher: asyncio.Task[None] | None = None

    @property
    def plain_link(self) -> Link | None:
        """The lean link of a single Redis server (not a Cluster), if batches use one.

        A caller may run its commands on it directly: what :meth:`run` adds for one
        server is only turning the link's exceptions (every one a ``RedisError``, or
        ``TimeoutError`` for the deadline) into failed replies.
        """
        return self._plain_link

    @property
    def lean(self) -> bool:
        """Whether batches go on :mod:`core.wire` links, which join each event-loop
        turn's callers into one write by themselves (see :mod:`core.coalesce`)."""
        if not self._cluster:
            return self._plain_link is not None
        if not self._allow_links:
            return False
        if self._cluster_lean is None:
            default = cast(RedisCluster, self.client).get_default_node()
            model = _node_client(default, "localhost", 6379)
            lean = settings_of(model.connection_pool) is not None
            if default is None:  # not connected yet: the node settings are not known
                return lean
            self._cluster_lean = lean
        return self._cluster_lean

    def sent(self) -> tuple[int, int]:
        """(writes, callers) of the lean links so far (for tests and benchmarks)."""
        links = [link for link in (self._plain_link, *self._links.values()) if link is not None]
        return sum(link.writes for link in links), sum(link.callers for link in links)

    @property
    def down(self) -> list[str]:
        """The nodes failing right now (Cluster only), by name."""
        return sorted(self._down)

    def nodes(self) -> dict[str, bool]:
        """``{node: failing}`` for the Cluster's slot-serving masters and failing nodes."""
        if not self._cluster:
            return {}
        slots = cast(RedisCluster, self.client).nodes_manager.slots_cache
        found = dict.fromkeys({nodes[0].name for nodes in slots.values() if nodes}, False)
        found.update(dict.fromkeys(self._down, True))
        return found

    async def run(
        self,
        commands: Sequence[Command],
        on_part: Report | None = None,
        timeout_s: float | None = None,
    ) -> list[Any]:
        """The replies in order; a command whose node failed gets a :class:`ShardError`.

        Never raises for a Redis failure; Redis error replies come back as exceptions too.
        ``on_part`` is given ``(index, reply)`` for the final replies as each node's share
        completes, so a caller need not wait for a slower node it has no command on.
        ``timeout_s``: raise ``TimeoutError`` when it passes first.
        """
        if not commands:
            return []
        if not self._cluster:
            plain = await self._plain(commands, timeout_s)
            if on_part is not None:
                on_part(list(enumerate(plain)))
            return plain
        report = on_part if on_part is not None else _ignore
        if timeout_s is None:
            return await self._on_cluster(commands, report)
        async with asyncio.timeout(timeout_s):
            return await self._on_cluster(commands, report)

    async def _on_cluster(self, commands: Sequence[Command], report: Report) -> list[Any]:
        assert isinstance(self.client, RedisCluster)
        cluster = self.client
        try:
            if not cluster.nodes_manager.slots_cache:
                await cluster.initialize()
            where = [_address(cluster.get_node_from_key(command[1])) for command in commands]
        except Exception as exc:
            failed = ShardError(f"Redis Cluster slot map unavailable: {exc}")
            self._refresh()
            report([(i, failed) for i in range(len(commands))])
            return [failed] * len(commands)
        replies: list[Any] = [None] * len(commands)
        await self._on_nodes(commands, where, replies, report)
        moved = [i for i, reply in enumerate(replies) if isinstance(reply, MovedError)]
        if moved:
            self._refresh()
            retried: list[Any] = [None] * len(moved)
            moved_to = [replies[i].node_addr for i in moved]

            def report_moved(done: list[tuple[int, Any]]) -> None:
                report([(moved[i], reply) for i, reply in done])

            await self._on_nodes([commands[i] for i in moved], moved_to, retried, report_moved)
            for i, reply in zip(moved, retried, strict=True):
                replies[i] = reply
        return replies

    async def _plain(self, commands: Sequence[Command], timeout_s: float | None) -> list[Any]:
        if self._plain_link is not None:
            try:
                return await self._plain_link.run(commands, timeout_s)
            except TimeoutError:  # the deadline, not a failure of Redis
                raise
            except Exception as exc:  # any failure inside the link is a Redis failure
                return [ShardError(f"{type(exc).__name__}: {exc}")] * len(commands)
        if timeout_s is None:
            return await self._pipeline(commands)
        async with asyncio.timeout(timeout_s):
            return await self._pipeline(commands)

    async def _pipeline(self, commands: Sequence[Command]) -> list[Any]:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                return list(await pipe.execute(raise_on_error=False))
        except Exception as exc:  # any failure inside the client is a Redis failure
            failed = ShardError(f"{type(exc).__name__}: {exc}")
            return [failed] * len(commands)

    async def _on_nodes(
        self,
        commands: Sequence[Command],
        where: Sequence[tuple[str, int]],
        out: list[Any],
        report: Report,
    ) -> None:
        """Run each node's share of ``commands`` at once; replies into ``out`` by index,
        reported as each node is done (a MOVED reply is not final: left unreported)."""
        groups: dict[tuple[str, int], list[int]] = {}
        for i, address in enumerate(where):
            groups.setdefault(address, []).append(i)

        async def one(address: tuple[str, int], indexes: list[int]) -> None:
            replies = await self._node_batch(address, [commands[i] for i in indexes])
            for i, reply in zip(indexes, replies, strict=True):
                out[i] = reply
            report([(i, out[i]) for i in indexes if not isinstance(out[i], MovedError)])

        parts = [one(address, indexes) for address, indexes in groups.items()]
        if len(parts) == 1:
            await parts[0]
        else:
            await asyncio.gather(*parts)

    async def _node_batch(self, address: tuple[str, int], commands: list[Command]) -> list[Any]:
        host, port = address
        name = f"{host}:{port}"
        failed_at = self._down.get(name)
        if failed_at is not None and time.monotonic() - failed_at < FAIL_FAST_S:
            return [ShardError(f"Redis node {name} is failing")] * len(commands)
        try:
            link = self._link(host, port)
            if link is not None:
                replies = await link.run(commands)
            else:
                async with self._pool(host, port).pipeline(transaction=False) as pipe:
                    for command in commands:
                        pipe.execute_command(*command)
                    replies = list(await pipe.execute(raise_on_error=False))
        except Exception as exc:  # any failure inside the client is a Redis failure
            why = f"{type(exc).__name__}: {exc}"
            self._failed(name, why)
            return [ShardError(f"Redis node {name}: {why}")] * len(commands)
        if self._down.pop(name, None) is not None:
            logger.info("Redis Cluster node %s answers again", name)
        return replies

    def _pool(self, host: str, port: int) -> Redis:
        name = f"{host}:{port}"
        found = self._pools.get(name)
        if found is None:
            assert isinstance(self.client, RedisCluster)
            model = self.client.get_node(host, port) or self.client.get_default_node()
            found = self._pools[name] = _node_client(model, host, port)
        return found

    def _link(self, host: str, port: int) -> Link | None:
        name = f"{host}:{port}"
        try:
            return self._links[name]
        except KeyError:
            if not self._allow_links:
                return None
            settings = settings_of(self._pool(host, port).connection_pool)
            link = self._links[name] = Link(settings) if settings is not None else None
            return link

    def _failed(self, name: str, why: str) -> None:
        if name not in self._down:
            logger.warning(
                "Redis Cluster node %s failing (%s): calls and polls whose keys it holds "
                "fail until it answers again or a replica takes over its slots",
                name, why,
            )  # fmt: skip
        self._down[name] = time.monotonic()
        self._refresh()

    def _refresh(self) -> None:
        if self._refresher is None or self._refresher.done():
            # A fresh context: the call that noticed the failure lends the task nothing
            # (its request id would otherwise tag every line the refresh logs).
            self._refresher = asyncio.create_task(
                self._refresh_slots(), name="cluster-slots", context=contextvars.Context()
            )

    async def _refresh_slots(self) -> None:
        """Read the slot map again, and again while a node that owns slots is failing."""
        assert isinstance(self.client, RedisCluster)
        cluster = self.client
        while True:
            try:
                await cluster.nodes_manager.initialize()
            except Exception as exc:  # every node unreachable: the next call tries again
                logger.debug("Redis Cluster slot map refresh failed: %s", exc)
            owners = {nodes[0].name for nodes in cluster.nodes_manager.slots_cache.values()}
            for name in list(self._down):
                if name not in owners:  # its replica took over: it fails no command now
                    del self._down[name]
                    logger.info("Redis Cluster node %s no longer serves slots", name)
                else:  # back without a failover (a restart within the node timeout)?
                    await self._probe(name)
            if not self._down:
                return
            await asyncio.sleep(REFRESH_INTERVAL_S)

    async def _probe(self, name: str) -> None:
        host, _, port = name.rpartition(":")
        with contextlib.suppress(Exception):  # still failing: the loop comes back
            await self._pool(host, int(port)).ping()
            if self._down.pop(name, None) is not None:
                logger.info("Redis Cluster node %s answers again", name)

    async def aclose(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        for link in (self._plain_link, *self._links.values()):
            if link is not None:
                await link.aclose()
        self._links.clear()
        for pool in self._pools.values():
            await pool.aclose(close_connection_pool=True)
        self._pools.clear()


def _address(node: ClusterNode | None) -> tuple[str, int]:
    if node is None:  # only asked for with replica=True; kept for the type checker
        raise LookupError("no node serves the key")
    return node.host, int(node.port)


def _node_client(model: ClusterNode | None, host: str, port: int) -> Redis:
    """A plain client for one node, with the cluster client's credentials and timeouts.

    No retries: a node that fails should fail its commands now, not after a backoff.
    """
    settings: dict[str, Any] = {}
    connection_class: Any = None
    if model is not None:
        settings = {k: model.connection_kwargs[k] for k in _CARRIED if k in model.connection_kwargs}
        connection_class = model.connection_class
    if connection_class is not None:
        settings["connection_class"] = connection_class
    pool = ConnectionPool(host=host, port=port, retry=Retry(NoBackoff(), 0), **settings)
    return Redis(connection_pool=pool)


class ShardedCluster(RedisCluster):
    """A RedisCluster that owns the :class:`Dispatcher` for its batches (see the module doc).

    Closing the client closes the dispatcher's per-node connections too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dispatcher = Dispatcher(self, lean=True)

    async def aclose(self) -> None:
        await self.dispatcher.aclose()
        await super().aclose()


class LeanRedis(Redis):
    """A client of one server that owns the :class:`Dispatcher` of its calls' batches,
    with its :mod:`core.wire` link; closing the client closes the link too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dispatcher = Dispatcher(self, lean=True)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await self.dispatcher.aclose()
        await super().aclose(close_connection_pool)


def dispatcher_for(client: Redis | RedisCluster) -> Dispatcher:
    """The client's own dispatcher (a :class:`ShardedCluster`'s or :class:`LeanRedis`'s),
    or a new one on redis-py's connections (nobody would close links made for it)."""
    if isinstance(client, ShardedCluster | LeanRedis):
        return client.dispatcher
    return Dispatcher(client)
