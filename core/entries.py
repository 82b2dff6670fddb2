"""List entries in their canonical form, one function per list kind.

The loader, the admin API and the service all pass entries through :func:`canonical`,
so an entry written by one is found by the others: ``numbers`` are E.164 digits,
``prefixes`` E.164 leading digits, ``names`` lower-cased ``re:``/``contains:``/exact
entries (``exact:`` dropped). ``re:`` patterns must compile under RE2
(:func:`compile_pattern`), as the service matches them with RE2. ``subscribers`` entries
have their own format (:mod:`core.subscribers`).
Writes (admin API, loader) go through :func:`new_entry`, which also refuses a number
whose shape no numbering plan has (``911``, ``1``, ``+44``) unless the list opts in with
``allow_short_codes``; look-ups and removals take any canonical entry.
"""

from __future__ import annotations

from typing import Any, Protocol

import re2

from core.config import ListKind
from core.numbers import normalise, normalise_prefix, undialable_reason

MAX_NAME_ENTRY_CHARS = 256
REGEX_MARK = "re:"
CONTAINS_MARK = "contains:"
EXACT_MARK = "exact:"


#: RE2 errors for syntax Python's ``re`` has and RE2 lacks on purpose (backreferences,
#: lookaround, atomic groups, ``\Z``...): worth a plainer message than the raw text.
_UNSUPPORTED_ERRORS = ("invalid escape sequence", "invalid perl operator")


class BadEntry(ValueError):
    """An entry that cannot be put on a list of its kind; the message says why."""


class Pattern(Protocol):
    """What the service needs of a compiled RE2 pattern (re2 ships no type hints)."""

    def search(self, text: str) -> object | None: ...


def pattern_options() -> Any:
    """The ``re2.Options`` every CNAM pattern is compiled with: case-insensitive, quiet.

    ``log_errors`` off: RE2 would otherwise print each refused pattern to stderr through
    absl, outside the service's logging.
    """
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False
    return options


def pattern_error(exc: Exception) -> str:
    """The text of a ``re2.error``, whose argument is bytes."""
    detail = exc.args[0] if exc.args else exc
    return detail.decode(errors="replace") if isinstance(detail, bytes) else str(detail)


def compile_pattern(pattern: str) -> Pattern:
    """``pattern`` compiled by RE2 as the service uses it; BadEntry if RE2 cannot."""
    try:
        compiled: Pattern = re2.compile(pattern, pattern_options())
    except re2.error as exc:
        detail = pattern_error(exc)
        if detail.startswith(_UNSUPPORTED_ERRORS):
            reason = f"RE2 does not support backreferences or lookaround ({detail})"
        else:
            reason = f"RE2 cannot compile it ({detail})"
        raise BadEntry(f"bad regular expression {pattern!r}: {reason}") from None
    return compiled


def _canonical_name(raw: str) -> str:
    text = raw.strip()
    if not text:
        raise BadEntry("empty name")
    if len(text) > MAX_NAME_ENTRY_CHARS:
        raise BadEntry(f"name entry longer than {MAX_NAME_ENTRY_CHARS} characters")
    lowered = text.casefold()
    if lowered.startswith(REGEX_MARK):
        pattern = text[len(REGEX_MARK) :]
        compile_pattern(pattern)
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
    """Return the canonical entry for ``raw`` on a list of ``kind``, or raise BadEntry.

    A ``subscribers`` list has no single entries: its entries belong to a subscriber
    (see :mod:`core.subscribers`), so this refuses them.
    """
    if kind == "subscribers":
        raise BadEntry(
            "a subscribers list holds entries per subscriber: use "
            "/v1/lists/{name}/subscribers/{subscriber}/entries/{entry}"
        )
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


def new_entry(
    kind: ListKind, raw: str, default_country: str = "1", *, allow_short_codes: bool = False
) -> str:
    """:func:`canonical`, refusing numbers no numbering plan can dial (BadEntry says why).

    For entries written to a list (admin API, loader); ``allow_short_codes`` (the list's
    opt-in) lets ``911``-like numbers through.
    """
    entry = canonical(kind, raw, default_country)
    if kind == "numbers" and not allow_short_codes:
        reason = undialable_reason(entry)
        if reason is not None:
            raise BadEntry(
                f"not a dialable number: {raw[:40]!r} ({reason}); set allow_short_codes "
                "on the list to keep short codes"
            )
    return entry
