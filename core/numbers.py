"""Telephone number normalisation and validity, shared by the service and the loader.

Every number that becomes a Redis key or is looked up goes through :func:`normalise`,
so ``5162065613``, ``+1 (516) 206-5613`` and ``tel:+15162065613`` are one entry: the
E.164 digits without ``+``, or ``None`` for anything that is not a number. Validity
(:func:`is_dialable`) is libphonenumber's metadata, precomputed into
:mod:`core.numbering_plan` so nothing imports ``phonenumbers`` at run time. The rules,
and the project's own decisions among them, are in docs/design.md, "Normalisation"
and "Invalid number".
"""

from __future__ import annotations

import re
from collections.abc import Callable

from core.numbering_plan import NATIONAL_PREFIXES, PATTERNS, PLANS

MAX_E164_DIGITS = 15
_SEPARATORS = str.maketrans("", "", " -.()/\t")
_SCHEMES = ("tel:", "sip:", "sips:")


def _strip_uri(text: str) -> str:
    lowered = text[:5].lower()
    for scheme in _SCHEMES:
        if lowered.startswith(scheme):
            text = text[len(scheme) :]
            if scheme != "tel:":
                text = text.split("@", 1)[0]
            break
    return text.split(";", 1)[0]


def normalise(raw: str, default_country: str = "1") -> str | None:
    """Return the canonical E.164 digits of ``raw``, or ``None`` if it is not a number."""
    # Fast paths: the usual CarrierX ``user`` is a plain digit string, or "+" and digits.
    if raw.isdigit() and raw.isascii():
        digits = raw
    elif raw[:1] == "+" and raw[1:].isdigit() and raw.isascii():
        digits = raw[1:]
        return digits if len(digits) <= MAX_E164_DIGITS and digits[0] != "0" else None
    else:
        text = _strip_uri(raw.strip()).translate(_SEPARATORS)
        plus = text.startswith("+")
        digits = text[1:] if plus else text
        if not (digits.isascii() and digits.isdigit()):
            return None
        if plus:
            return digits if len(digits) <= MAX_E164_DIGITS and digits[0] != "0" else None
    # Both international prefixes begin with 0: most numbers need no startswith (slow
    # in CPython 3.11, which parses its arguments the general way) to rule them out.
    zero = digits[0] == "0"
    if zero and digits.startswith("00"):
        digits = digits[2:]
    elif default_country == "1":
        if zero and digits.startswith("011"):
            digits = digits[3:]
        elif len(digits) == 10:
            digits = "1" + digits
    else:
        prefix = NATIONAL_PREFIXES.get(default_country, "0")
        if prefix:
            if digits.startswith(prefix):
                digits = default_country + digits[len(prefix) :]
        elif digits[0] == "0":
            digits = default_country + digits
    if not digits or len(digits) > MAX_E164_DIGITS or digits[0] == "0":
        return None
    return digits


#: E.164 numbers shorter than this are not dialable callers.*
MIN_DIALABLE_DIGITS = 8
#: How many leading digits :data:`_PLANS` is keyed by (devtools/phone_metadata.py's too).
_KEY_DIGITS = 3
#: NANP numbers libphonenumber accepts but the project does not:* N11 service codes as
#: area code or exchange, and the fictional 555-0100..555-0199 (after the leading ``1``).
_NANP_REJECTS = r"(?!\d11|\d{3}\d11|\d{3}55501)"
_Fullmatch = Callable[[str], "re.Match[str] | None"]


def _plan_tables() -> dict[str, dict[int, str | _Fullmatch]]:
    """:data:`_PLANS`: first E.164 digits -> {E.164 length: pattern of the whole number}.

    The patterns stay source text until :func:`is_dialable` first needs one: compiling
    all of them takes about 0.25 s, which every process (each worker, each loader run)
    would pay at import though most see a few countries only.
    """
    plans: dict[str, dict[int, str | _Fullmatch]] = {}
    for key, (code, lengths) in PLANS.items():
        table: dict[int, str | _Fullmatch] = {}
        for national_length, index in lengths.items():
            size = len(code) + national_length
            if not MIN_DIALABLE_DIGITS <= size <= MAX_E164_DIGITS:
                continue
            if code == "1" and size != 11:
                continue  # libphonenumber's 7-digit Canadian 310-xxxx numbers: not callers
            rejects = _NANP_REJECTS if code == "1" else ""
            table[size] = f"{code}{rejects}(?:{PATTERNS[index]})"
        # Keys shorter than _KEY_DIGITS (a two-digit code of a single region) stand for
        # every key they begin: they share the one table, so a pattern compiled for one
        # key serves them all.
        free = _KEY_DIGITS - len(key)
        for tail in range(10**free):
            plans[key + str(tail).zfill(free) if free else key] = table
    return plans


_PLANS = _plan_tables()
#: Compiled patterns by source: several lengths and keys share one.
_COMPILED: dict[str, _Fullmatch] = {}


def _compiled(table: dict[int, str | _Fullmatch], size: int, source: str) -> _Fullmatch:
    fullmatch = _COMPILED.get(source)
    if fullmatch is None:
        fullmatch = _COMPILED[source] = re.compile(source, re.ASCII).fullmatch
    table[size] = fullmatch
    return fullmatch


def is_dialable(e164: str) -> bool:
    """Whether a normalised number could be a real caller.

    libphonenumber's ``is_valid_number`` on the digits exactly as given, plus the
    project's stricter rules (NANP: 11 digits, no N11, no 555-01xx; at least 8 digits).
    Unlike ``phonenumbers.parse``, a trunk prefix written after the country code is not
    stripped: the digits are the key the lists use. See docs/design.md, "Invalid number".
    """
    table = _PLANS.get(e164[:_KEY_DIGITS])
    if table is None:
        return False
    size = len(e164)
    fullmatch = table.get(size)
    if fullmatch is None:
        return False
    if isinstance(fullmatch, str):  # first use of this pattern in this process
        fullmatch = _compiled(table, size, fullmatch)
    return fullmatch(e164) is not None


def normalise_prefix(raw: str) -> str | None:
    """Canonical form of a prefix-list entry: E.164 leading digits, country code first.

    Prefixes are not completed like full numbers (``516`` alone is ambiguous), so only
    separators and a leading ``+`` or ``00`` are dropped.
    """
    text = raw.strip().translate(_SEPARATORS)
    if text.startswith("+"):
        text = text[1:]
    elif text.startswith("00"):
        text = text[2:]
    if not text or not (text.isascii() and text.isdigit()) or len(text) > MAX_E164_DIGITS:
        return None
    return text


def undialable_reason(e164: str) -> str | None:
    """Why a normalised number can never be dialled, or None when its shape can be.

    Only the numbering plan's shape counts: a calling code some country has, and a
    length that code's numbers have. ``911``, ``1`` and ``44`` (from ``+44``) fail; a
    number of the right shape that :func:`is_dialable` still refuses (an unassigned
    range, the fictional 555-01xx) passes, since a block list may well hold spoofed
    numbers of exactly that kind. Lists refuse entries with a reason (short codes only
    when the list opts in).
    """
    size = len(e164)
    if size < MIN_DIALABLE_DIGITS:
        return (
            f"{size} digit{'s' if size != 1 else ''}: too short for a dialable number "
            f"(at least {MIN_DIALABLE_DIGITS} digits with the country code)"
        )
    table = _PLANS.get(e164[:_KEY_DIGITS])
    if table is None:
        return f"no country has a calling code that begins {e164[:_KEY_DIGITS]}"
    if size not in table:
        code = next((PLANS[e164[:k]][0] for k in (3, 2, 1) if e164[:k] in PLANS), "?")
        sizes = "/".join(str(n) for n in sorted(table))
        return f"{size} digits, but numbers under +{code} have {sizes} digits with the code"
    return None
