"""The Redis side of the fraud rules: keyed call-rate counters and sequential dialing.

Pure functions, no I/O: :func:`plan` lists the commands one call adds to its single
Redis round trip (``ListStore.fetch_for_call(extra=...)``) and :meth:`Plan.read` turns
their replies into what each rule is judged on, by rule key (``policy:rule``): a call
count for a ``call_rate`` rule, a run length for a ``sequential_dialing`` rule.

Invariants: every key a call touches has a hash tag of its own (core/keys.py), so the
commands go to whichever Cluster node holds each; every key written has a TTL, so a
number that stops calling leaves nothing behind. ``call_rate`` rules keyed by the
caller stay with ``fetch_for_call``'s own counters, unchanged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from core import keys, wire

Command = tuple[str | int | float, ...]
#: Tag of each ``call_rate`` key (other than ``caller``) in its counters' key names.
KEY_TAGS = {"called": "called", "trunk_group": "tg", "caller_prefix": "cp", "caller_called": "cc"}


#: Members up to which Redis keeps a sorted set compact (``zset-max-listpack-entries``):
#: trims come often enough that a set of one worker's calls stays within it.
COMPACT_SET_MAX = 128


def dialled_ttl_s(window_s: int) -> int:
    """A dialled set's TTL: 1.1 windows (see :class:`Upkeep`)."""
    return math.ceil(window_s * 1.1)


@dataclass(frozen=True, slots=True)
class KeyedRate:
    """A ``call_rate`` rule that counts calls by something other than the caller."""

    rule_key: str
    key: str
    window_s: int
    prefix_digits: int = 0


@dataclass(frozen=True, slots=True)
class SequenceRule:
    """A ``sequential_dialing`` rule as Redis sees it, with its upkeep's schedule
    (:class:`Upkeep`) worked out once."""

    rule_key: str
    window_s: int
    max_gap: int
    track: int
    #: Calls between two trims of a dialled set to the newest ``track``.
    trim_every: int = field(init=False)
    #: Seconds between two pushes of a dialled set's expiry.
    expire_every_s: float = field(init=False)
    #: A dialled set's TTL (:func:`dialled_ttl_s`).
    ttl_s: int = field(init=False)

    def __post_init__(self) -> None:
        trim_every = max(1, min(self.track // 4, COMPACT_SET_MAX - self.track))
        object.__setattr__(self, "trim_every", trim_every)
        object.__setattr__(self, "expire_every_s", self.window_s / 10)
        object.__setattr__(self, "ttl_s", dialled_ttl_s(self.window_s))


def subject_of(
    key: str, prefix_digits: int, caller: str | None, called: str | None, trunk_group: str
) -> str | None:
    """What a call is counted under for ``key``; None: the call has no such thing.

    Only ``called`` and ``trunk_group`` count anonymous callers: a flood towards one
    number often hides its callers.
    """
    if key == "called":
        return called
    if key == "trunk_group":
        return trunk_group
    if caller is None:
        return None
    if key == "caller_prefix":
        return caller[:prefix_digits]
    if key == "caller_called":
        return None if called is None else f"{caller}:{called}"
    return caller


def sliding_count(current: Any, previous: Any, now_s: float, window_s: int, increment: bool) -> int:
    """The sliding-window estimate ``core.store`` uses for caller counters.

    This window's count plus the previous one's weighted by how much of it the sliding
    window still covers, rounded up; without ``increment`` the call itself is added.
    """
    overlap = 1 - (now_s % window_s) / window_s
    weighted = math.ceil(int(previous or 0) * overlap - 1e-9)
    return int(current or 0) + weighted + (0 if increment else 1)


def run_length(numbers: Iterable[int], current: int, max_gap: int) -> int:
    """How many of ``numbers`` (with ``current``) form one run around ``current``.

    A run: the numbers sorted, each at most ``max_gap`` above the one before. Order of
    dialling does not matter: a war dialler that shuffles a block is still caught.
    """
    ordered = sorted({*numbers, current})
    at = ordered.index(current)
    low = at
    while low > 0 and ordered[low] - ordered[low - 1] <= max_gap:
        low -= 1
    high = at
    while high + 1 < len(ordered) and ordered[high + 1] - ordered[high] <= max_gap:
        high += 1
    return high - low + 1


#: Keys an :class:`Upkeep` remembers at most; past it it starts again empty (every key
#: then gets its expiry and trim at its next call: safe, only a command dearer).
UPKEEP_MAX = 100_000


class Upkeep:
    """What this process already did for the keys calls write, so that a call sends
    only the commands that change something: a counter's expiry once per counter (its
    name holds its window), a dialled set's expiry at most every tenth of its window
    (to 1.1 windows, so it outlives every call it holds by a window) and its trim to the
    newest ``track`` after every quarter of ``track`` calls (fewer where that would take
    the set past :data:`COMPACT_SET_MAX`).

    A key deleted meanwhile (FLUSHALL, eviction, a failover) would come back without a
    TTL from a call that skipped its expiry: the replies show it (a counter at 1, a set
    holding only this call), and :meth:`Plan.repairs` gives the expiry to send then.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._counted: dict[str, None] = {}
        #: A dialled set -> [when its expiry was last pushed back, calls since its trim].
        self._dialled: dict[str, list[float]] = {}

    def counter_expiry_due(self, key: str) -> bool:
        """Whether a call counting on ``key`` should send its EXPIRE (the first time)."""
        if key in self._counted:
            return False
        if len(self._counted) >= UPKEEP_MAX:
            self._counted.clear()
        self._counted[key] = None
        return True

    def dialled_due(self, key: str, rule: SequenceRule) -> tuple[bool, bool]:
        """(trim, expire) due for a dialled set of ``rule`` a call adds to."""
        state = self._dialled.get(key)
        now = self.clock()
        if state is None:
            if len(self._dialled) >= UPKEEP_MAX:
                self._dialled.clear()
            state = self._dialled[key] = [-math.inf, 0]
        calls = state[1] + 1
        trim = calls >= rule.trim_every
        state[1] = 0 if trim else calls
        expire = now - state[0] >= rule.expire_every_s
        if expire:
            state[0] = now
        return trim, expire

    def forget(self, key: str) -> None:
        """Send ``key``'s upkeep again at its next call (its write may have failed)."""
        self._counted.pop(key, None)
        self._dialled.pop(key, None)


@dataclass(slots=True)
class Plan:
    """The commands of one call and how to read their replies."""

    commands: list[Command]
    #: Per rule: (rule key, index of its first reply, window_s or max_gap, is a rate,
    #: for a dialled set the numbers it keeps).
    _parts: list[tuple[str, int, int, bool, int]]
    now_s: float
    increment: bool
    called_int: int
    #: Writes whose expiry this call skipped (:class:`Upkeep`): (index of the reply that
    #: tells whether the key is new, index of the ZADD's reply for a dialled set or -1,
    #: the EXPIRE to send then).
    _unexpired: list[tuple[int, int, Command]]
    #: :attr:`commands` as RESP text, one string each, when :func:`plan` was asked for it.
    text: list[str] | None

    def repairs(self, replies: Sequence[Any]) -> list[Command]:
        """The EXPIREs this call skipped on keys its replies show are new: a counter at
        1, or a dialled set that this call's number joined (ZADD added it) and that holds
        only it. Such a key was deleted since the process last gave it one. A redial of
        the same number (ZADD added nothing) is no repair. Rare; sent after the answer,
        off the call's round trip."""
        found = []
        for at, added_at, expire in self._unexpired:
            reply = replies[at]
            if added_at < 0:
                if reply == 1:
                    found.append(expire)
            elif replies[added_at] == 1 and isinstance(reply, list) and len(reply) == 1:
                found.append(expire)
        return found

    def read(self, replies: Sequence[Any]) -> dict[str, int]:
        """Count or run length per rule key, from the replies to :attr:`commands`."""
        values: dict[str, int] = {}
        for rule_key, at, param, is_rate, track in self._parts:
            if is_rate:  # this window's count (INCRBY or GET), the last one's GET
                previous = replies[at + 1]
                values[rule_key] = sliding_count(
                    replies[at], previous, self.now_s, param, self.increment
                )
            else:
                # Oldest first: the newest ``track``, as the set keeps between trims.
                dialled = [int(m) for m in replies[at][-track:]]
                values[rule_key] = run_length(dialled, self.called_int, param)
        return values


def plan(
    rates: Sequence[KeyedRate],
    sequences: Sequence[SequenceRule],
    *,
    caller: str | None,
    called: str | None,
    trunk_group: str,
    now_s: float,
    increment: bool = True,
    upkeep: Upkeep | None = None,
    resp: bool = False,
) -> Plan:
    """The commands one call adds to its round trip for these rules.

    ``increment=False`` (explain) writes nothing and reads what the call would be
    judged on. A rule whose subject the call lacks gets no commands and no value.
    ``upkeep``: the process's record of expiries and trims already sent (without it,
    every call sends them). ``resp``: also compose the commands' RESP text
    (:attr:`Plan.text`, for a link that sends text: ``ListStore.sends_text``).
    Scores are written and compared to the millisecond.
    """
    commands: list[Command] = []
    text: list[str] | None = [] if resp else None
    parts: list[tuple[str, int, int, bool, int]] = []
    unexpired: list[tuple[int, int, Command]] = []
    for rate in rates:
        subject = subject_of(rate.key, rate.prefix_digits, caller, called, trunk_group)
        if subject is None:
            continue
        index = int(now_s // rate.window_s)
        head = keys.rate_by_head(KEY_TAGS[rate.key], subject, rate.rule_key)
        current = f"{head}{index}"
        previous = f"{head}{index - 1}"
        parts.append((rate.rule_key, len(commands), rate.window_s, True, 0))
        if not increment:
            commands += [("GET", current), ("GET", previous)]
            if text is not None:
                text += [wire.get(current), wire.get(previous)]
            continue
        commands += [("INCRBY", current, 1), ("GET", previous)]
        if text is not None:
            text += [wire.incrby_one(current), wire.get(previous)]
        expire = ("EXPIRE", current, 2 * rate.window_s)
        if upkeep is None or upkeep.counter_expiry_due(current):
            commands.append(expire)
            if text is not None:
                text.append(wire.expire(current, 2 * rate.window_s))
        else:
            unexpired.append((len(commands) - 2, -1, expire))
    if caller is not None and called and sequences:
        score = f"{now_s:.3f}"
        for seq in sequences:
            key = keys.dialed(caller, seq.rule_key)
            after = f"({now_s - seq.window_s:.3f}"
            added_at = len(commands)
            if increment:
                commands.append(("ZADD", key, score, called))
                if text is not None:
                    text.append(wire.zadd_one(key, score, called))
            # Read: the calls less than window_s old. Kept: the newest ``track`` (older
            # ones go with the trim or the set's expiry).
            read_at = len(commands)
            parts.append((seq.rule_key, read_at, seq.max_gap, False, seq.track))
            commands.append(("ZRANGEBYSCORE", key, after, "+inf"))
            if text is not None:
                text.append(wire.zrangebyscore_after(key, after))
            if not increment:
                continue
            trim, expire_due = (True, True) if upkeep is None else upkeep.dialled_due(key, seq)
            if trim:
                commands.append(("ZREMRANGEBYRANK", key, 0, -seq.track - 1))
                if text is not None:
                    text.append(wire.zremrangebyrank_to(key, -seq.track - 1))
            expire = ("EXPIRE", key, seq.ttl_s)
            if expire_due:
                commands.append(expire)
                if text is not None:
                    text.append(wire.expire(key, seq.ttl_s))
            else:
                unexpired.append((read_at, added_at, expire))
    return Plan(commands, parts, now_s, increment, int(called) if called else 0, unexpired, text)
