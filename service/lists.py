"""In-memory copies of the lists, built from the store and asked on every call.

Each object is immutable once built; the cache swaps in a new one when Redis says the
list changed, so a request always sees one whole version of a list.
"""

from __future__ import annotations

import logging
import re
from array import array
from collections.abc import Iterable

from core import keys
from core.entries import CONTAINS_MARK, REGEX_MARK
from core.store import bucket_contains

logger = logging.getLogger(__name__)

#: Names longer than this are cut before matching, which bounds regex work per call.
MAX_NAME_CHARS = 128


class NumberList:
    """Exact numbers: the bucketed base plus the admin deltas."""

    __slots__ = ("adds", "buckets", "dels", "size")

    def __init__(
        self, buckets: list[array[int]], adds: Iterable[str] = (), dels: Iterable[str] = ()
    ) -> None:
        self.buckets = buckets
        self.adds = frozenset(int(a) for a in adds)
        self.dels = frozenset(int(d) for d in dels) - self.adds
        base_size = sum(len(b) for b in buckets)
        self.size = (
            base_size
            + sum(1 for a in self.adds if not self._in_base(a))
            - sum(1 for d in self.dels if self._in_base(d))
        )

    def _in_base(self, number: int) -> bool:
        return bucket_contains(self.buckets[number % keys.NUMBER_BUCKETS], number)

    def with_deltas(self, adds: Iterable[str], dels: Iterable[str]) -> NumberList:
        """The same base with other deltas (no copy of the base)."""
        return NumberList(self.buckets, adds, dels)

    def __contains__(self, number: int) -> bool:
        if self.adds and number in self.adds:
            return True
        if self.dels and number in self.dels:
            return False
        bucket = self.buckets[number % keys.NUMBER_BUCKETS]
        return bucket_contains(bucket, number)


class PrefixList:
    """Number prefixes: the caller matches if its E.164 digits start with an entry."""

    __slots__ = ("entries", "lengths", "size")

    def __init__(self, entries: frozenset[str]) -> None:
        self.entries = entries
        self.lengths = tuple(sorted({len(e) for e in entries}))
        self.size = len(entries)

    def match(self, number: str) -> str | None:
        """The shortest entry that ``number`` starts with, or None."""
        entries = self.entries
        for length in self.lengths:
            if length > len(number):
                break
            prefix = number[:length]
            if prefix in entries:
                return prefix
        return None


class NameList:
    """CNAM entries: exact (case-insensitive), ``contains:`` substrings and ``re:`` patterns."""

    __slots__ = ("exact", "patterns", "search", "size")

    def __init__(self, entries: frozenset[str]) -> None:
        self.size = len(entries)
        self.exact = frozenset(e for e in entries if not e.startswith((REGEX_MARK, CONTAINS_MARK)))
        self.patterns: list[tuple[str, re.Pattern[str]]] = []
        for entry in sorted(entries - self.exact):
            if entry.startswith(REGEX_MARK):
                source = entry[len(REGEX_MARK) :]
            else:
                source = re.escape(entry[len(CONTAINS_MARK) :])
            try:
                self.patterns.append((entry, re.compile(source, re.IGNORECASE)))
            except re.error:
                logger.warning("skipping CNAM entry %r: not a valid regular expression", entry)
        self.search = self._combined()

    def _combined(self) -> re.Pattern[str] | None:
        """One alternation of every pattern: a single search per call instead of one each."""
        if not self.patterns:
            return None
        try:
            return re.compile("|".join(f"(?:{p.pattern})" for _, p in self.patterns), re.I)
        except re.error:  # e.g. inline global flags inside one entry; fall back to a loop
            return None

    def match(self, name: str) -> str | None:
        """The entry that ``name`` matches, or None."""
        if not name:
            return None
        name = name[:MAX_NAME_CHARS]
        folded = name.casefold()
        if folded in self.exact:
            return folded
        if self.search is not None and self.search.search(name) is None:
            return None
        for entry, pattern in self.patterns:
            if pattern.search(name):
                return entry
        return None


ListObject = NumberList | PrefixList | NameList
