"""List entries in their canonical form, one function per list kind.

The loader, the admin API and the service all pass entries through :func:`canonical`,
so an entry written by one is found by the others.

- ``numbers``: the E.164 digits from :func:`core.numbers.normalise`.
- ``prefixes``: E.164 leading digits, country code first (``1900``, ``44870``).
- ``names`` (CNAM): case-insensitive. ``re:<pattern>`` is a regular expression searched
  anywhere in the name, ``contains:<text>`` a substring, and anything else (or
  ``exact:<text>``) the whole name. Stored lower-cased, with the ``exact:`` marker dropped.
"""

from __future__ import annotations

import re

from core.config import ListKind
from core.numbers import normalise, normalise_prefix

MAX_NAME_ENTRY_CHARS = 256
REGEX_MARK = "re:"
CONTAINS_MARK = "contains:"
EXACT_MARK = "exact:"


class BadEntry(ValueError):
    """An entry that cannot be put on a list of its kind; the message says why."""


def _canonical_name(raw: str) -> str:
    text = raw.strip()
    if not text:
        raise BadEntry("empty name")
    if len(text) > MAX_NAME_ENTRY_CHARS:
        raise BadEntry(f"name entry longer than {MAX_NAME_ENTRY_CHARS} characters")
    lowered = text.casefold()
    if lowered.startswith(REGEX_MARK):
        pattern = text[len(REGEX_MARK) :]
        try:
            re.compile(pattern, re.IGNORECASE)
        except re.error as exc:
            raise BadEntry(f"bad regular expression {pattern!r}: {exc}") from None
        if not pattern:
            raise BadEntry("empty regular expression")
        # The pattern keeps its case (character classes like \S depend on it).
        return REGEX_MARK + pattern
    if lowered.startswith(CONTAINS_MARK):
        needle = lowered[len(CONTAINS_MARK) :].strip()
        if not needle:
            raise BadEntry("empty 'contains:' text")
        return CONTAINS_MARK + needle
    if lowered.startswith(EXACT_MARK):
        lowered = lowered[len(EXACT_MARK) :].strip()
        if not lowered:
            raise BadEntry("empty 'exact:' text")
    return lowered


def canonical(kind: ListKind, raw: str, default_country: str = "1") -> str:
    """Return the canonical entry for ``raw`` on a list of ``kind``, or raise BadEntry."""
    if kind == "numbers":
        number = normalise(raw, default_country) if len(raw) <= 64 else None
        if number is None:
            raise BadEntry(f"not a telephone number: {raw[:40]!r}")
        return number
    if kind == "prefixes":
        prefix = normalise_prefix(raw) if len(raw) <= 64 else None
        if prefix is None:
            raise BadEntry(f"not a number prefix (1-15 digits): {raw[:40]!r}")
        return prefix
    return _canonical_name(raw)
