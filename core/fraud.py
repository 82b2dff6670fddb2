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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from core import keys

Command = tuple[str | int | float, ...]
#: Tag of each ``call_rate`` key (other than ``caller``) in its counters' key names.
KEY_TAGS = {"called": "called", "trunk_group": "tg", "caller_prefix": "cp", "caller_called": "cc"}


@dataclass(frozen=True, slots=True)
class KeyedRate:
    """A ``call_rate`` rule that counts calls by something other than the caller."""

    rule_key: str
    key: str
    window_s: int
    prefix_digits: int = 0


@dataclass(frozen=True, slots=True)
class SequenceRule:
    """A ``sequential_dialing`` rule as Redis sees it."""

    rule_key: str
    window_s: int
    max_gap: int
    track: int


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


@dataclass(slots=True)
class Plan:
    """The commands of one call and how to read their replies."""

    commands: list[Command] = field(default_factory=list)
    #: Per rule: (rule key, index of its first reply, window_s or max_gap, is a rate).
    _parts: list[tuple[str, int, int, bool]] = field(default_factory=list)
    now_s: float = 0.0
    increment: bool = True
    called_int: int = 0

    def read(self, replies: Sequence[Any]) -> dict[str, int]:
        """Count or run length per rule key, from the replies to :attr:`commands`."""
        values: dict[str, int] = {}
        for rule_key, at, param, is_rate in self._parts:
            if is_rate:  # this window's count (INCRBY or GET), the last one's GET
                previous = replies[at + (2 if self.increment else 1)]
                values[rule_key] = sliding_count(
                    replies[at], previous, self.now_s, param, self.increment
                )
            else:
                members = replies[at + (4 if self.increment else 0)]
                dialled = [int(m) for m in members]
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
) -> Plan:
    """The commands one call adds to its round trip for these rules.

    ``increment=False`` (explain) writes nothing and reads what the call would be
    judged on. A rule whose subject the call lacks gets no commands and no value.
    """
    out = Plan(now_s=now_s, increment=increment, called_int=int(called) if called else 0)
    commands = out.commands
    for rate in rates:
        subject = subject_of(rate.key, rate.prefix_digits, caller, called, trunk_group)
        if subject is None:
            continue
        index = int(now_s // rate.window_s)
        tag = KEY_TAGS[rate.key]
        current = keys.rate_by(tag, subject, rate.rule_key, index)
        out._parts.append((rate.rule_key, len(commands), rate.window_s, True))
        if increment:
            commands += [("INCRBY", current, 1), ("EXPIRE", current, 2 * rate.window_s)]
        else:
            commands.append(("GET", current))
        commands.append(("GET", keys.rate_by(tag, subject, rate.rule_key, index - 1)))
    if caller is None or not called:
        return out
    for seq in sequences:
        key = keys.dialed(caller, seq.rule_key)
        since = now_s - seq.window_s
        out._parts.append((seq.rule_key, len(commands), seq.max_gap, False))
        if increment:
            commands += [
                ("ZADD", key, now_s, called),
                # Kept: calls less than window_s old, the newest ``track`` of them.
                ("ZREMRANGEBYSCORE", key, "-inf", since),
                ("ZREMRANGEBYRANK", key, 0, -seq.track - 1),
                ("EXPIRE", key, seq.window_s),
                ("ZRANGE", key, 0, -1),
            ]
        else:
            commands.append(("ZRANGEBYSCORE", key, f"({since!r}", "+inf"))
    return out
