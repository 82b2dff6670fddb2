"""Lua scripts a call's round trip runs in place of several commands on one key.

Each command a call sends costs the worker's loop a packing and a parsed reply, and
Redis a parse and a dispatch; a script on one key (or on keys of one hash tag) does the
same writes for one of each. A call sends ``EVALSHA``; :class:`core.shards.Dispatcher`
routes it by its first key and, where a server answers ``NOSCRIPT`` (restarted, or its
scripts flushed), sends that command again as ``EVAL`` with the body
(:func:`as_eval`), so no call fails for it.

Invariants: every script reads and writes only the keys it is given, all of one hash
tag; every key it writes ends with a TTL.
"""

from __future__ import annotations

import hashlib
from typing import Any

Command = tuple[Any, ...]


class Script:
    """A script known by its SHA-1, as ``EVALSHA`` names it."""

    def __init__(self, body: str) -> None:
        self.body = body
        self.sha = hashlib.sha1(body.encode()).hexdigest()
        _BY_SHA[self.sha] = self

    def command(self, keys: tuple[str, ...], *args: Any) -> Command:
        """The ``EVALSHA`` command running this script on ``keys`` with ``args``."""
        return ("EVALSHA", self.sha, len(keys), *keys, *args)


_BY_SHA: dict[str, Script] = {}

#: One call counted in a fixed window: KEYS[1] this window's counter, KEYS[2] the last
#: window's; ARGV[1] the counter's TTL (two windows), set as the counter is created, so
#: it outlives the next window, which reads it. Returns {this window's count, the last
#: window's count or false}: core.store's and core.fraud's sliding estimate.
COUNT_CALL = Script(
    """
local count = redis.call('incrby', KEYS[1], 1)
if count == 1 then redis.call('expire', KEYS[1], ARGV[1]) end
return {count, redis.call('get', KEYS[2])}
"""
)

#: One call added to a caller's recently dialled numbers (a sorted set by time):
#: KEYS[1] the set; ARGV: now (s), the called number, the oldest time kept, how many
#: kept at most, the TTL. Returns the numbers kept (core.fraud's run length).
DIALLED = Script(
    """
redis.call('zadd', KEYS[1], ARGV[1], ARGV[2])
redis.call('zremrangebyscore', KEYS[1], '-inf', ARGV[3])
redis.call('zremrangebyrank', KEYS[1], 0, -tonumber(ARGV[4]) - 1)
redis.call('expire', KEYS[1], ARGV[5])
return redis.call('zrange', KEYS[1], 0, -1)
"""
)


def key_of(command: Command) -> Any:
    """The key a single-key command (key first) or a script (its first key) works on."""
    if command[0] in ("EVALSHA", "EVAL"):
        return command[3]
    return command[1]


def as_eval(command: Command) -> Command | None:
    """``command`` again as ``EVAL`` with its script's body (None: not one of ours)."""
    if command[0] != "EVALSHA":
        return None
    script = _BY_SHA.get(command[1])
    return None if script is None else ("EVAL", script.body, *command[2:])
