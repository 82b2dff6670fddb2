"""Telephone number normalisation and validity, shared by the service and the loader.

Every number that becomes a Redis key or is looked up goes through :func:`normalise`,
so ``5162065613``, ``15162065613``, ``+1 (516) 206-5613`` and ``tel:+15162065613`` are
the same entry. The canonical form is the E.164 digit string without the ``+``.

Rules, in order (* marks the project's own decisions):
- A ``tel:``, ``sip:`` or ``sips:`` scheme is dropped; for SIP the user part before
  ``@`` is kept; URI parameters after ``;`` are dropped.
- Visual separators (space, ``-``, ``.``, ``(``, ``)``, ``/``) are dropped. Any other
  non-digit, such as letters in ``anonymous``, makes the input not a number (``None``).
- A leading ``+`` means the digits are already E.164.
- ``00`` is the international prefix everywhere; ``011`` is when the default country is 1.
  (Other international prefixes, such as Russia's ``810``, are not recognised.)
- Default country 1 (NANP): 10 digits get a ``1`` in front; anything else is taken as
  already carrying its country code.*
- Another default country: if libphonenumber gives it a national (trunk) prefix, a
  number starting with that prefix is national: the prefix is replaced by the country
  code (``0`` for GB, DE, FR and most others; ``8`` for RU and BY, ``06`` for HU). If it
  has none (IT, ES, NO, DK...), a number starting with ``0`` is national and keeps the
  ``0`` behind the country code, as Italy's ``06 1234 5678`` is ``+39 06 1234 5678``.
  Anything else is taken as already E.164.* A code libphonenumber does not know
  keeps the most common rule, trunk prefix ``0``.
- More than 15 digits (the E.164 maximum) is not a number.

Validity (:func:`is_dialable`, the ``invalid_number`` rule) is Google's libphonenumber
metadata, as shipped by the ``phonenumbers`` package (version in
:data:`core.numbering_plan.PHONENUMBERS_VERSION`, pinned in pyproject.toml). Calling
``phonenumbers`` per call costs tens of microseconds, so ``devtools/phone_metadata.py``
turns its metadata into :mod:`core.numbering_plan` (generated, ~210 kB): per calling
code (and, for codes shared by several regions, per first national digits), one regular
expression per national-number length: the union of the patterns of every number type
of the regions that can own the number, tried in libphonenumber's order of regions
(the generator's docstring says how). Each is compiled the first time a number needs
it (all of them at import would cost every process ~0.25 s), and the national prefixes
are a plain dict, so neither function imports ``phonenumbers``.
``is_dialable`` is two dict look-ups and one ``fullmatch``: 0.1-0.5 µs a call, up to
~1.5 µs for the regions tried last of a shared code (+1 784 after the US and Canada,
+44 7624 after GB and Guernsey).
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
    if digits.startswith("00"):
        digits = digits[2:]
    elif default_country == "1":
        if digits.startswith("011"):
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

    Valid, as libphonenumber's ``is_valid_number`` says, for the digits exactly as
    given; that is, for ``PhoneNumber(country_code, national_number)`` built from them,
    the module docstring says how. Differences, all on purpose:

    - NANP (country code 1): exactly 11 digits, neither an N11 service code as area
      code or exchange, and not the fictional 555-0100..555-0199 range, which
      libphonenumber accepts.* Nor its 7-digit Canadian ``310-xxxx`` numbers.*
    - At least 8 digits in all. A few territories (Niue, Tokelau, St Helena) have
      7-digit E.164 numbers, but a 7-digit caller ID is far more often a NANP local
      number with its area code missing, so 7 digits count as invalid.*
    - ``phonenumbers.parse("+" + digits)`` first strips what it takes for a national
      prefix written after the country code (``+44 0 20 7946 0018``,
      ``+1 1 212 555 0200``) or rewrites it (Argentina's ``+54 11 15 ...`` becomes
      ``+54 9 11 ...``), so ``is_valid_number`` of its result accepts such forms too,
      and rejects the odd valid number that begins like a national prefix
      (``+375 810 ...``, Belarus premium rate). Here the digits are checked as they
      are: they are the key the lists are looked up by, and a caller ID with a trunk
      prefix inside is not E.164. On a 200,000-number sample these were the only
      differences besides the ones above.
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
