"""In-memory copies of the lists, built from the store and asked on every call.

Each object is immutable once built; the cache swaps in a new one when Redis says the
list changed, so a request always sees one whole version of a list. Look-ups are built
to cost the same whatever the list's size (decision cost flat from 1 k to 10 M
numbers); see each class.

CNAM ``re:`` patterns run on RE2 (google-re2), not Python's backtracking ``re``: RE2's
time is linear in the name's length for any pattern, so an entry such as ``(a+)+$``
cannot pin a worker's event loop (see :class:`NameList`).
"""

from __future__ import annotations

import logging
import re
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import re2

from core import keys
from core.bucket_gens import BucketGens
from core.entries import (
    CONTAINS_MARK,
    REGEX_MARK,
    BadEntry,
    Pattern,
    compile_pattern,
    pattern_error,
    pattern_options,
)

logger = logging.getLogger(__name__)

#: Names longer than this are cut before matching: with RE2's linear time, this bounds
#: the pattern work per call.
MAX_NAME_CHARS = 128
#: Caller names whose answer a names list remembers (about 200 bytes each).
MEMO_NAMES = 20_000
#: Average numbers per look-up group of a numbers list (see :class:`NumberList`).
NUMBERS_PER_GROUP = 4
_BUCKET_BITS = keys.NUMBER_BUCKETS.bit_length() - 1


def _group_count(size: int) -> int:
    """A power of two, at least NUMBER_BUCKETS, giving about NUMBERS_PER_GROUP per group."""
    wanted = max(size // NUMBERS_PER_GROUP, keys.NUMBER_BUCKETS)
    return 1 << (wanted - 1).bit_length()


def index_arrays(
    buckets: Sequence[array[int]],
) -> tuple[np.ndarray[Any, np.dtype[np.uint64]], np.ndarray[Any, np.dtype[np.uint32]]]:
    """``(flat, offsets)`` for the stored buckets, as numpy arrays (see :class:`NumberList`).

    ``buckets[b]`` must hold the numbers with ``number % NUMBER_BUCKETS == b``, sorted: the
    stored layout. The group count is a multiple of NUMBER_BUCKETS, so each group is a
    slice of one bucket, picked by the bits of the number just above the bucket bits. A
    stable sort on those bits alone (16 bits at most: a linear-time radix sort) therefore
    leaves every group sorted, without sorting the numbers themselves. The mask is
    ``len(offsets) - 2``. Used as is to write a shared file (service/screening/shared_lists.py).
    """
    size = sum(len(b) for b in buckets)
    groups = _group_count(size)
    if size:
        numbers = np.concatenate([np.frombuffer(b, dtype=np.uint64) for b in buckets if len(b)])
    else:
        numbers = np.empty(0, dtype=np.uint64)
    above = (numbers >> np.uint64(_BUCKET_BITS)) & np.uint64(groups // keys.NUMBER_BUCKETS - 1)
    numbers = numbers[np.argsort(above.astype(np.uint16), kind="stable")]
    del above
    counts = np.bincount((numbers & np.uint64(groups - 1)).astype(np.int64), minlength=groups)
    offsets = np.zeros(groups + 1, dtype=np.uint32)
    np.cumsum(counts, out=offsets[1:])
    return numbers, offsets


def _index(buckets: Sequence[array[int]]) -> tuple[array[int], array[int], int]:
    """``(flat, offsets, mask)`` for the stored buckets, as a private copy in arrays."""
    numbers, offsets = index_arrays(buckets)
    flat = array("Q")
    flat.frombytes(numbers.tobytes())
    starts = array("I")
    starts.frombytes(offsets.tobytes())
    return flat, starts, len(offsets) - 2


#: A numbers base as look-ups read it: ``(flat, offsets, mask)``. ``flat`` and
#: ``offsets`` are arrays (a private copy) or memoryviews of a shared file
#: (service/screening/shared_lists.py); both index to Python ints at the same cost.
NumberBase = tuple[Sequence[int], Sequence[int], int]


class NumberList:
    """Exact numbers: the base from the last full sync, plus the admin deltas.

    The base is ``flat``, every number grouped by ``number & mask`` and sorted within its
    group, with ``offsets`` marking the groups (about NUMBERS_PER_GROUP numbers each), so a
    look-up costs the same at 1 k and 10 M numbers. ``flat`` and ``offsets`` are arrays or
    memoryviews over a shared mapped file (:mod:`service.screening.shared_lists`); both
    cost the same (BENCHMARKS.md, "Memory: numbers lists shared between workers").
    """

    __slots__ = ("changes", "flat", "mask", "offsets", "size")

    flat: Sequence[int]
    offsets: Sequence[int]

    def __init__(
        self,
        buckets: Sequence[array[int]],
        adds: Iterable[str] = (),
        dels: Iterable[str] = (),
        *,
        _base: NumberBase | None = None,
    ) -> None:
        self.flat, self.offsets, self.mask = _base if _base is not None else _index(buckets)
        added = frozenset(int(a) for a in adds)
        removed = frozenset(int(d) for d in dels) - added
        #: Single-entry changes since the base: None when there are none (most calls
        #: then skip the look-up), else each changed number -> whether it is listed.
        self.changes: dict[int, bool] | None = (
            dict.fromkeys(removed, False) | dict.fromkeys(added, True) if added or removed else None
        )
        self.size = (
            len(self.flat)
            + sum(1 for a in added if not self._in_base(a))
            - sum(1 for d in removed if self._in_base(d))
        )

    @classmethod
    def from_base(
        cls, base: NumberBase, adds: Iterable[str] = (), dels: Iterable[str] = ()
    ) -> NumberList:
        """A list on a base indexed elsewhere (a shared file), with these deltas."""
        return cls((), adds, dels, _base=base)

    @property
    def base(self) -> NumberBase:
        return self.flat, self.offsets, self.mask

    def _in_base(self, number: int) -> bool:
        offsets = self.offsets
        group = number & self.mask
        end = offsets[group + 1]
        at = bisect_left(self.flat, number, offsets[group], end)
        return at < end and self.flat[at] == number

    def with_deltas(self, adds: Iterable[str], dels: Iterable[str]) -> NumberList:
        """The same base with other deltas (no copy of the base)."""
        return NumberList((), adds, dels, _base=self.base)

    def __contains__(self, number: int) -> bool:
        # The body of _in_base, inlined: this runs for every call on every numbers rule.
        changes = self.changes
        if changes is not None:
            changed = changes.get(number)
            if changed is not None:
                return changed
        offsets = self.offsets
        group = number & self.mask
        start = offsets[group]
        end = offsets[group + 1]
        if start == end:
            return False
        at = bisect_left(self.flat, number, start, end)
        return at < end and self.flat[at] == number


class PrefixList:
    """Number prefixes: the caller matches if its E.164 digits start with an entry.

    ``heads`` holds the first ``len(shortest entry)`` digits of every entry: a number
    whose head is not there matches nothing, which settles most callers with one set
    look-up however many entries and lengths the list has.
    """

    __slots__ = ("entries", "head_length", "heads", "lengths", "size")

    def __init__(self, entries: frozenset[str]) -> None:
        self.entries = entries
        self.lengths = tuple(sorted({len(e) for e in entries}))
        self.head_length = self.lengths[0] if self.lengths else 0
        self.heads = frozenset(e[: self.head_length] for e in entries)
        self.size = len(entries)

    def match(self, number: str) -> str | None:
        """The shortest entry that ``number`` starts with, or None."""
        if number[: self.head_length] not in self.heads:
            return None
        entries = self.entries
        for length in self.lengths:
            if length > len(number):
                break
            prefix = number[:length]
            if prefix in entries:
                return prefix
        return None


def _trie_pattern(words: Iterable[str]) -> str:
    """A regular expression finding any of ``words``, laid out as a trie.

    In a flat ``word1|word2|...`` the engine tries every word at every position; here
    each character is tried once, so the cost hardly grows with the number of words. A
    word that extends another is dropped: finding the shorter one is enough.
    """
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for char in word:
            if "" in node:  # a shorter word ends here already
                break
            node = node.setdefault(char, {})
        else:
            node.clear()
            node[""] = {}

    def render(node: dict[str, Any]) -> str:
        if "" in node:
            return ""
        branches = [re.escape(char) + render(child) for char, child in sorted(node.items())]
        return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"

    return render(trie)


class NameList:
    """CNAM entries: exact (case-insensitive), ``contains:`` substrings and ``re:`` patterns.

    At most one set look-up and two searches a call, whatever the number of entries. The
    substrings are one backtracking-free literal alternation in Python's ``re``; the
    entry-supplied patterns run as one case-insensitive ``re2.Set``, linear in the name's
    length whatever the pattern, so no entry can stall the event loop. Why this split:
    docs/design.md, "CNAM matching".
    """

    __slots__ = (
        "contains",
        "exact",
        "memo",
        "pattern_set",
        "patterns",
        "search_contains",
        "size",
    )

    def __init__(self, entries: frozenset[str]) -> None:
        self.size = len(entries)
        self.exact = frozenset(e for e in entries if not e.startswith((REGEX_MARK, CONTAINS_MARK)))
        self.contains = sorted(
            e[len(CONTAINS_MARK) :] for e in entries if e.startswith(CONTAINS_MARK)
        )
        self.patterns: list[tuple[str, Pattern]] = []
        for entry in sorted(e for e in entries if e.startswith(REGEX_MARK)):
            try:
                self.patterns.append((entry, compile_pattern(entry[len(REGEX_MARK) :])))
            except BadEntry as exc:  # stored before RE2, or written past the API
                logger.warning("skipping CNAM entry %r: %s", entry, exc)
        self.search_contains = re.compile(_trie_pattern(self.contains)) if self.contains else None
        self.pattern_set = self._pattern_set()
        #: Answers for names seen lately ("" for no match). Caller names repeat a lot
        #: (the same callers, "WIRELESS CALLER", city names), and a repeat costs one
        #: dictionary look-up instead of the searches (docs/design.md, "CNAM matching").
        #: The object is replaced whole when the list changes, and its memo with it.
        self.memo: dict[str, str] = {}

    def _pattern_set(self) -> Any:
        """Every pattern in one ``re2.Set``, index for index, plus a last one matching all.

        ``Set.Match`` answers no indices both for "no match" and for "the automaton ran
        out of memory"; the empty pattern, which matches every name, tells them apart.
        None when RE2 cannot build the set (too large): match() then tries each pattern.
        """
        if not self.patterns:
            return None
        pattern_set = re2.Set.SearchSet(pattern_options())
        try:
            for entry, _ in self.patterns:
                pattern_set.Add(entry[len(REGEX_MARK) :])
            pattern_set.Add("")
            pattern_set.Compile()
        except re2.error as exc:
            logger.warning(
                "CNAM patterns tried one by one (%d of them): %s",
                len(self.patterns),
                pattern_error(exc),
            )
            return None
        return pattern_set

    def match(self, name: str) -> str | None:
        """The entry that ``name`` matches, or None."""
        if not name:
            return None
        name = name[:MAX_NAME_CHARS]
        memo = self.memo
        known = memo.get(name)
        if known is not None:
            return known or None
        if len(memo) >= MEMO_NAMES:
            memo.clear()  # simpler than an LRU, and as good for a working set under the cap
        found = self._search(name)
        memo[name] = found or ""
        return found

    def _search(self, name: str) -> str | None:
        folded = name.casefold()
        if folded in self.exact:
            return folded
        if self.search_contains is not None and self.search_contains.search(folded):
            for needle in self.contains:
                if needle in folded:
                    return CONTAINS_MARK + needle
        patterns = self.patterns
        if not patterns:
            return None
        hits = self.pattern_set.Match(name) if self.pattern_set is not None else None
        if hits is not None:
            # Indices follow the sorted entries; the smallest is the first that matched,
            # and it is the all-matching sentinel (len(patterns)) when none did.
            first: int = min(hits)
            return patterns[first][0] if first < len(patterns) else None
        for entry, pattern in patterns:  # no set, or it failed: still linear, per pattern
            if pattern.search(name) is not None:
                return entry
        return None


class SubscriberList:
    """A subscribers list as a worker holds it: only its live generation, no entries.

    100 M pairs cannot live in every worker: calls read the one subscriber they need
    from Redis (service/screening/screen.py); this tells them which generation's key
    holds its bucket (``gens``, :mod:`core.bucket_gens`).
    """

    __slots__ = ("gen", "gens", "size")

    def __init__(self, gen: int, size: int, gens: BucketGens | None = None) -> None:
        self.gen = gen
        #: Pairs at the last full sync (``meta.size``), for metrics and ``/readyz``.
        self.size = size
        self.gens = gens if gens is not None else BucketGens(gen)


ListObject = NumberList | PrefixList | NameList | SubscriberList
