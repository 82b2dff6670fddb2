"""Telephone number normalisation, shared by the service and the loader.

Every number that becomes a Redis key or is looked up goes through :func:`normalise`,
so ``5162065613``, ``15162065613``, ``+1 (516) 206-5613`` and ``tel:+15162065613`` are
the same entry. The canonical form is the E.164 digit string without the ``+``.

Rules, in order (decisions where SPEC §2 is silent are marked *):
- A ``tel:``, ``sip:`` or ``sips:`` scheme is dropped; for SIP the user part before
  ``@`` is kept; URI parameters after ``;`` are dropped.
- Visual separators (space, ``-``, ``.``, ``(``, ``)``, ``/``) are dropped. Any other
  non-digit, such as letters in ``anonymous``, makes the input not a number (``None``).
- A leading ``+`` means the digits are already E.164.
- ``00`` is the international prefix everywhere; ``011`` is when the default country is 1.
- Default country 1 (NANP): 10 digits get a ``1`` in front; anything else is taken as
  already carrying its country code.*
- Another default country: one leading ``0`` is the national trunk prefix and is replaced
  by the country code; anything else is taken as already E.164.*
- More than 15 digits (the E.164 maximum) is not a number.
"""

from __future__ import annotations

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
    elif digits.startswith("0"):
        digits = default_country + digits[1:]
    if not digits or len(digits) > MAX_E164_DIGITS or digits[0] == "0":
        return None
    return digits


def is_dialable(e164: str) -> bool:
    """Whether a normalised number could be a real caller.

    NANP (country code 1): exactly 11 digits, NPA and NXX not starting with 0 or 1,
    neither an N11 service code, and not the fictional 555-0100..555-0199 range.
    Elsewhere: 8 to 15 digits. A few territories (Niue, Tokelau) have 7-digit E.164
    numbers, but a 7-digit caller ID is far more often a NANP local number with its area
    code missing, so 7 digits count as invalid.
    """
    if e164.startswith("1"):
        if len(e164) != 11:
            return False
        npa, nxx, line = e164[1:4], e164[4:7], e164[7:]
        if npa[0] in "01" or nxx[0] in "01":
            return False
        if npa[1:] == "11" or nxx[1:] == "11":
            return False
        return not (nxx == "555" and line.startswith("01"))
    return 8 <= len(e164) <= MAX_E164_DIGITS


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
