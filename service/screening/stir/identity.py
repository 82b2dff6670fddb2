"""``Identity`` header values (RFC 8224) and the PASSporTs in them (RFC 8225, RFC 8588).

Only the full form is read: ``<header>.<payload>.<signature>;info=<x5u>;alg=ES256;ppt=shaken``.
A value whose ``ppt`` is not ``shaken`` is skipped (RFC 8224 §6.2: unknown PASSporT
types are ignored); a ``shaken`` one that cannot be read is :class:`Malformed`, never an
exception. Nothing here checks the signature: :mod:`.verify` does, with the key of the
certificate the header names.

The parts every call of one signer repeats (the PASSporT header segment and the value's
parameters) are decoded once per distinct string, in small LRUs: the dictionaries they
give are shared and must not be changed. The payload and signature are decoded per call.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

SHAKEN = "shaken"
ES256 = "ES256"
#: Longest Identity value read; a SHAKEN one is well under 1 KiB.
MAX_VALUE_CHARS = 4096
#: Identity values looked at per call.
MAX_VALUES = 4
ATTESTATIONS = frozenset({"A", "B", "C"})
#: Distinct header segments and parameter strings kept decoded (one or two per signer).
DECODED_CACHE_SIZE = 512
_URLSAFE = bytes.maketrans(b"-_", b"+/")


class Malformed(Exception):
    """A SHAKEN Identity value that cannot be used; the message says why."""


@dataclass(slots=True)
class Passport:
    """A decoded SHAKEN PASSporT whose signature is not checked yet.

    Never changed once made; not ``frozen`` because one is made per call and a frozen
    dataclass sets each field through ``object.__setattr__``, several times slower.
    """

    header: dict[str, Any]
    payload: dict[str, Any]
    #: What the signature covers (``<b64 header>.<b64 payload>``) and the raw ``r||s``.
    signing_input: bytes
    signature: bytes
    x5u: str
    iat: int
    attest: str
    orig_tn: str
    dest_tns: tuple[str, ...]
    origid: str


def identity_values(values: Any) -> list[str]:
    """The Identity header's string values (a body's list), each split at top-level commas."""
    if not isinstance(values, list):
        return []
    found: list[str] = []
    for value in values[:MAX_VALUES]:
        if isinstance(value, str) and value:
            found.extend(_split(value[:MAX_VALUE_CHARS]))
    return found[:MAX_VALUES]


def _split(value: str) -> list[str]:
    """``a;info=<u,1>, b`` -> [``a;info=<u,1>``, ``b``]: commas inside ``<>`` do not split."""
    if "," not in value:  # the usual case: one PASSporT per header value
        return [value.strip()]
    parts, depth, start = [], 0, 0
    for i, char in enumerate(value):
        if char == "<":
            depth += 1
        elif char == ">":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            parts.append(value[start:i])
            start = i + 1
    parts.append(value[start:])
    return [part.strip() for part in parts if part.strip()]


@lru_cache(maxsize=DECODED_CACHE_SIZE)
def _params(text: str) -> dict[str, str]:
    """The parameters after a value's first ``;`` (shared: do not change the result)."""
    params: dict[str, str] = {}
    for item in text.split(";"):
        key, _, value = item.partition("=")
        key = key.strip().lower()
        if key and key not in params:
            params[key] = value.strip()
    return params


def value_ppt(value: str) -> str | None:
    """The ``ppt`` parameter of a value, in lower case (None when it has none)."""
    rest = value.partition(";")[2]
    ppt = _params(rest).get("ppt")
    return ppt.strip('"').lower() if ppt is not None else None


def _b64(part: str) -> bytes:
    # base64.urlsafe_b64decode's steps without its wrappers: same alphabet, same leniency.
    try:
        raw = part.encode("ascii").translate(_URLSAFE)
        return binascii.a2b_base64(raw + b"=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):  # UnicodeEncodeError is a ValueError
        raise Malformed("a PASSporT part is not base64url") from None


def _object(part: str, what: str) -> dict[str, Any]:
    try:
        found = orjson.loads(_b64(part))
    except orjson.JSONDecodeError:
        raise Malformed(f"the PASSporT {what} is not JSON") from None
    if not isinstance(found, dict):
        raise Malformed(f"the PASSporT {what} is not a JSON object")
    return found


@lru_cache(maxsize=DECODED_CACHE_SIZE)
def _header(part: str) -> dict[str, Any]:
    """A decoded header segment (shared: do not change the result); Malformed if not one."""
    return _object(part, "header")


def parse_value(value: str) -> Passport:
    """Decode one SHAKEN Identity value; raise :class:`Malformed` naming the problem."""
    token, _, rest = value.partition(";")
    params = _params(rest)
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise Malformed("the PASSporT is not <header>.<payload>.<signature>")
    if not parts[1]:
        raise Malformed("compact form (no payload) cannot be checked from a header alone")
    header = _header(parts[0])
    payload = _object(parts[1], "payload")
    signature = _b64(parts[2])
    if header.get("alg") != ES256 or params.get("alg", ES256).strip('"') != ES256:
        raise Malformed("alg is not ES256")
    if header.get("ppt") != SHAKEN:
        raise Malformed("the PASSporT's ppt is not shaken")
    if header.get("typ") != "passport":
        raise Malformed("typ is not passport")
    x5u = header.get("x5u")
    if not isinstance(x5u, str) or not x5u:
        raise Malformed("no x5u in the PASSporT header")
    info = params.get("info", "")
    if not (info.startswith("<") and info.endswith(">")):
        raise Malformed("no info=<URL> parameter")
    if info[1:-1] != x5u:
        raise Malformed("info and x5u name different certificates")
    if len(signature) != 64:
        raise Malformed("an ES256 signature is 64 bytes")
    iat = payload.get("iat")
    if type(iat) is not int:
        raise Malformed("iat is not an integer")
    attest = payload.get("attest")
    if attest not in ATTESTATIONS:
        raise Malformed("attest is not A, B or C")
    orig, dest = payload.get("orig"), payload.get("dest")
    orig_tn = orig.get("tn") if isinstance(orig, dict) else None
    if not isinstance(orig_tn, str) or not orig_tn:
        raise Malformed("no orig.tn")
    dest_tns = dest.get("tn") if isinstance(dest, dict) else None
    if not isinstance(dest_tns, list) or not dest_tns:
        raise Malformed("no dest.tn")
    for tn in dest_tns:
        if not isinstance(tn, str):
            raise Malformed("dest.tn holds a value that is not a string")
    origid = payload.get("origid")
    if not isinstance(origid, str) or not origid:
        raise Malformed("no origid")
    return Passport(
        header,
        payload,
        f"{parts[0]}.{parts[1]}".encode("ascii", "replace"),
        signature,
        x5u,
        iat,
        attest,
        orig_tn,
        tuple(dest_tns[:8]),
        origid,
    )


def shaken_value(values: Any) -> str | None:
    """The first Identity value for SHAKEN (``ppt=shaken`` or no ppt), or None."""
    for value in identity_values(values):
        ppt = value_ppt(value)
        if ppt is None:  # no parameter: the PASSporT's own header says which type it is
            try:
                ppt = _header(value.partition(".")[0]).get("ppt")
            except Malformed:
                return value  # unreadable: reported as malformed
        if ppt is None or ppt == SHAKEN:
            return value
    return None
