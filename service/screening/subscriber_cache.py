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
  one poll, as for the local lists;
- an entry used in the last fifth of its max age is *due*: the screener reads it again
  off the calls' path (:meth:`take_due`, then :meth:`put` or :meth:`drop`) under the
  same rules as a call's read, so a subscriber called at least once a max age is not
  read by a call again. Until the new read lands the old entry is used as before,
  never past its max age.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

from core.subscribers import Entries
from service.screening.lists import ListObject, SubscriberList
from service.screening.request import Call

_Cached = tuple[SubscriberList, float, Entries]
#: The share of the max age after which an entry a call uses is due for renewal.
RENEW_AFTER = 0.8
#: A read of one subscriber: ``(list, generation of its bucket, subscriber)``
#: (core/store.py; core/bucket_gens.py).
Read = tuple[str, int, str]


def readable(copy: ListObject | None) -> SubscriberList | None:
    """``copy`` if it is a subscribers list whose entries can be read: trusted (in the
    list cache) and not empty (gen 0). Otherwise a call finds no entries in it, and
    evaluate() tells whether that is for lack of trust."""
    return copy if isinstance(copy, SubscriberList) and copy.gen else None


class SubscriberCache:
    """The LRU (see the module doc); its counts are read at scrape (service/metrics.py)."""

    def __init__(
        self, max_entries: int, max_age_ms: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_entries = max_entries
        self.max_age_s = max_age_ms / 1000
        self.renew_after_s = self.max_age_s * RENEW_AFTER
        self.clock = clock
        self._entries: OrderedDict[tuple[str, str], _Cached] = OrderedDict()
        #: Entries due for a read off the calls' path, with the copy each was used under.
        self.due: dict[tuple[str, str], SubscriberList] = {}
        #: Look-ups answered from the cache, and those that had to read Redis.
        self.hits = 0
        self.misses = 0
        #: Entries read again off the calls' path, and such reads that failed.
        self.renewed = 0
        self.renewals_failed = 0

    def resize(self, max_entries: int, max_age_ms: int) -> None:
        """New limits (a config reload); the least recently used go first."""
        self.max_entries = max_entries
        self.max_age_s = max_age_ms / 1000
        self.renew_after_s = self.max_age_s * RENEW_AFTER
        while len(self._entries) > max_entries:
            self._entries.popitem(last=False)
        if not max_entries:
            self.due.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str, held: SubscriberList, subscriber: str) -> Entries | None:
        """``subscriber``'s entries if cached under ``held`` and young enough, else None;
        one in the last fifth of its max age is marked due for renewal (:attr:`due`)."""
        key = (name, subscriber)
        found = self._entries.get(key)
        if found is None or found[0] is not held:
            return None
        age = self.clock() - found[1]
        if age > self.renew_after_s:
            if age > self.max_age_s:
                return None
            self.due[key] = held
        self._entries.move_to_end(key)
        return found[2]

    def take_due(self, limit: int) -> list[tuple[str, SubscriberList, str]]:
        """Up to ``limit`` due entries, oldest call first, as ``(list, copy, subscriber)``:
        each to read from Redis and :meth:`put` (sent under that copy) or :meth:`drop`."""
        taken = []
        due = self.due
        for key in list(itertools.islice(due, limit)):
            taken.append((key[0], due.pop(key), key[1]))
        return taken

    def drop(self, name: str, subscriber: str) -> None:
        """Forget ``subscriber``'s entries (its bucket came back without its marker)."""
        self._entries.pop((name, subscriber), None)

    def put(
        self, name: str, held: SubscriberList, subscriber: str, entries: Entries, sent_at: float
    ) -> None:
        """Keep entries read under ``held`` by a read sent at ``sent_at`` (clock seconds)."""
        if not self.max_entries:
            return
        key = (name, subscriber)
        self._entries[key] = (held, sent_at, entries)
        self._entries.move_to_end(key)
        self.due.pop(key, None)  # (marked again by calls while its read was out)
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def lookup(
        self,
        names: Sequence[str],
        lists: Mapping[str, ListObject],
        call: Call,
    ) -> tuple[list[Read], list[SubscriberList], dict[str, Entries]]:
        """For the call's subscriber in each of the subscribers lists ``names``: the
        reads Redis must answer, with the copy each was live in (to :meth:`put` the
        reply under), and the entries cached (fresh) instead; counted as misses and
        hits."""
        called = call.called
        reads: list[Read] = []
        held: list[SubscriberList] = []
        cached: dict[str, Entries] = {}
        if called is None or call.caller is None:
            return reads, held, cached
        for name in names:
            copy = readable(lists.get(name))
            if copy is not None:
                entries = self.get(name, copy, called) if self.max_entries else None
                if entries is None:
                    reads.append((name, copy.gens.of_subscriber(called), called))
                    held.append(copy)
                else:
                    cached[name] = entries
        self.hits += len(cached)
        self.misses += len(reads)
        return reads, held, cached


class CachedFound:
    """The entries cache as a call's ``found`` (``policy.EntriesFound``), for a policy that
    needs nothing else from Redis: each subscriber rule looks its list up as evaluation
    reaches it, and stops for Redis (``get`` gives None) only when the entries are not
    cached, or not fresh. One per screener, set for each call by :meth:`start`:
    evaluation never awaits, so two calls never use it at once.

    Invariants: it answers as :meth:`SubscriberCache.lookup` would (a list not trusted,
    or empty, gives the default: no entries), and a list's entries are looked up once a
    call, however many rules read them.
    """

    __slots__ = ("cache", "call", "lists", "served")

    def __init__(self, cache: SubscriberCache) -> None:
        self.cache = cache
        self.lists: Mapping[str, ListObject] = {}
        self.call: Call | None = None
        #: The entries given to this call, by list (the cache hits it is counted).
        self.served: dict[str, Entries] = {}

    def start(self, lists: Mapping[str, ListObject], call: Call) -> CachedFound:
        self.lists = lists
        self.call = call
        self.served.clear()
        return self

    def release(self) -> None:
        """Let go of the call and of the list copies (a swapped-out list must not be
        kept alive until the next call of such a policy); :attr:`served` stays."""
        self.lists = {}
        self.call = None

    def get(self, name: str, default: Entries, /) -> Entries | None:
        served = self.served.get(name)
        if served is not None:
            return served
        copy = readable(self.lists.get(name))
        called = self.call.called if self.call is not None else None
        if called is None or copy is None:
            return default
        entries = self.cache.get(name, copy, called)
        if entries is not None:
            self.served[name] = entries
        return entries
