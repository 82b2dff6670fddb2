"""The ports a supervisor holds for its workers, and how many workers to start."""

from __future__ import annotations

import os
import socket


def worker_count(configured: int) -> int:
    """``server.workers`` or ``--workers`` as a number of processes (0: one per core).

    "Core" means one this process may run on (a container's cpuset), not every core of
    the host; a CPU *quota* (``docker --cpus``) is not visible here: set ``workers``.
    """
    if configured > 0:
        return configured
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def reserve_port(host: str, port: int, *, exclusive: bool = True) -> socket.socket:
    """Bind (without listening) host:port with ``SO_REUSEPORT``.

    Fails fast when anything listens there already, even another service whose workers
    would otherwise share the port silently; picks the port when ``port`` is 0; and
    keeps other programs off it while workers come and go. A bound socket that does not
    listen gets no connections: the workers' listening sockets share them.
    ``exclusive=False`` skips the check: a new supervisor taking over from an old one
    in a rolling upgrade shares the port with it on purpose.
    """
    family, kind, proto, _name, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    if exclusive:
        with socket.socket(family, kind, proto) as probe:  # without SO_REUSEPORT: exclusive
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
            address = (address[0], probe.getsockname()[1], *address[2:])
    sock = socket.socket(family, kind, proto)
    try:
        # SO_REUSEADDR too, like the workers' own sockets: without it the bind fails
        # while connections of an earlier run on this port linger in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock
