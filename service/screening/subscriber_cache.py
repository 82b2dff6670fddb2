"""Each worker's cache of subscribers' entries, so a busy DID is answered without Redis.

A bounded LRU of ``(list, subscriber) -> Entries``. An entry is tagged with the
:class:`~service.screening.lists.SubscriberList` object that was live when its read was
*sent*; the list cache swaps in a new object whenever a poll sees the list's ``gen``,
``version``, stamp or admin-write count (:func:`core.keys.subscriber_changes`) move.
Invariants:

- an entry is used only while its tag is still the live object and it is younger than
  ``cache.subscriber_max_age_ms`` (counted from when its read was sent);
- a read whose bucket had no marker (a lost bucket) is never stored;
- a writer counts its write only after Redis acknowledged it, and the tag is the object
  from before the read was sent, so a read that raced a write is dropped at the first
  poll after the count moved: an admin change is seen within ``cache.refresh_ms`` plus
  one poll, as for the local lists.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

from core.subscribers import Entries
from service.screening.lists import ListObject, SubscriberList
from service.screening.request import Call

_Cached = tuple[SubscriberList, float, Entries]
#: A read of one subscriber: ``(list, generation of its bucket, subscriber)``
#: (core/store.py; core/bucket_gens.py).
Read = tuple[str, int, str]


class SubscriberCache:
    """The LRU (see the module doc); its counts are read at scrape (service/metrics.py)."""

    def __init__(
        self, max_entries: int, max_age_ms: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_entries = max_entries
        self.max_age_s = max_age_ms / 1000
        self.clock = clock
        self._entries: OrderedDict[tuple[str, str], _Cached] = OrderedDict()
        #: Look-ups answered from the cache, and those that had to read Redis.
        self.hits = 0
        self.misses = 0

    def resize(self, max_entries: int, max_age_ms: int) -> None:
        """New limits (a config reload); the least recently used go first."""
        self.max_entries = max_entries
        self.max_age_s = max_age_ms / 1000
        while len(self._entries) > max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str, held: SubscriberList, subscriber: str) -> Entries | None:
        """``subscriber``'s entries if cached under ``held`` and young enough, else None."""
        key = (name, subscriber)
        found = self._entries.get(key)
        if found is None or found[0] is not held or self.clock() - found[1] > self.max_age_s:
            return None
        self._entries.move_to_end(key)
        return found[2]

    def put(
        self, name: str, held: SubscriberList, subscriber: str, entries: Entries, sent_at: float
    ) -> None:
        """Keep entries read under ``held`` by a read sent at ``sent_at`` (clock seconds)."""
        if not self.max_entries:
            return
        key = (name, subscriber)
        self._entries[key] = (held, sent_at, entries)
        self._entries.move_to_end(key)
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def lookup(
        self,
        names: Sequence[str],
        lists: Mapping[str, ListObject],
        call: Call,
        *,
        count: bool = True,
    ) -> tuple[list[Read], list[SubscriberList], dict[str, Entries]]:
        """For the call's subscriber in each of the subscribers lists ``names``: the
        reads Redis must answer, with the copy each was live in (to :meth:`put` the
        reply under), and the entries cached (fresh) instead. ``count``: add to the
        hits and misses."""
        called = call.called
        reads: list[Read] = []
        held: list[SubscriberList] = []
        cached: dict[str, Entries] = {}
        if called is None or call.caller is None:
            return reads, held, cached
        for name in names:
            copy = lists.get(name)
            # Not trusted (or empty: gen 0): nothing to read; evaluate() tells which.
            if isinstance(copy, SubscriberList) and copy.gen:
                entries = self.get(name, copy, called) if self.max_entries else None
                if entries is None:
                    reads.append((name, copy.gens.of_subscriber(called), called))
                    held.append(copy)
                else:
                    cached[name] = entries
        if count:
            self.hits += len(cached)
            self.misses += len(reads)
        return reads, held, cached
