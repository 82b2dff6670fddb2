"""From a CarrierX request body to the facts a policy decides on (SPEC §2).

The body is a JSON object of SIP header name -> list of values; address headers hold
``{user, host, name, raw, header_parameters, uri_parameters}`` objects. Nothing here
trusts the shape: a value of the wrong type counts as absent, so odd input makes the
caller unknown (and so anonymous) instead of an error.

Decisions where the spec is silent:
- The caller number is the first of ``caller.sources`` whose user part normalises to a
  number; ``Remote-Party-ID`` entries count only with ``party=calling`` or no party.
- *Anonymous* means: privacy asked for (``Privacy: id``, ``user`` or ``full``; RPID
  ``privacy=full`` or ``uri``), or a ``From`` user that is one of the withheld words or
  empty or absent, or no caller number at all. A network-asserted number (PAI) behind an
  anonymous ``From`` is still checked against the lists.
- An *invalid* caller is a number that is not dialable, or a user part that is present
  but not a number at all (``From: <sip:john@...>`` with nothing better behind it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.numbers import is_dialable, normalise

WITHHELD_USERS = frozenset(
    {"", "anonymous", "restricted", "unavailable", "unknown", "private", "withheld"}
)
PRIVACY_TOKENS = frozenset({"id", "user", "full"})
RPID_PRIVACY = frozenset({"full", "uri"})
MAX_FIELD_CHARS = 256
#: Only the first few values of a header are looked at.
MAX_VALUES = 8
_HEADER_NAMES = {
    "from": "from",
    "p-asserted-identity": "p-asserted-identity",
    "remote-party-id": "remote-party-id",
}


@dataclass(slots=True)
class Call:
    """One call as the policy sees it. Numbers are canonical E.164 digit strings."""

    caller: str | None
    caller_int: int | None
    caller_source: str | None
    #: The first non-withheld user part seen, as sent (for explain and invalid checks).
    caller_user: str | None
    caller_name: str
    called: str | None
    called_int: int | None
    anonymous: bool
    verstat: str | None
    call_id: str | None

    @property
    def invalid_number(self) -> bool:
        if self.caller is not None:
            return not is_dialable(self.caller)
        return self.caller_user is not None

    @property
    def attestation_failed(self) -> bool:
        return self.verstat is not None and self.verstat.lower() == "tn-validation-failed"


def _str(value: Any) -> str | None:
    return value[:MAX_FIELD_CHARS] if isinstance(value, str) else None


def _user_from_raw(raw: str) -> str | None:
    """The user part of the URI in a raw address (``"N" <sip:user@host>;tag=x``)."""
    start = raw.find("<")
    if start >= 0:
        end = raw.find(">", start)
        uri = raw[start + 1 : end if end > 0 else None]
    else:
        uri = raw.strip()
    lowered = uri[:5].lower()
    if lowered.startswith("tel:"):
        user = uri[4:]
    elif lowered.startswith(("sip:", "sips:")):
        rest = uri[uri.index(":") + 1 :]
        if "@" not in rest:
            return None
        user = rest.split("@", 1)[0]
    else:
        return None
    return user.split(";", 1)[0]


def _param(address: dict[str, Any], name: str) -> str | None:
    for field in ("uri_parameters", "header_parameters"):
        params = address.get(field)
        if isinstance(params, dict):
            value = _str(params.get(name))
            if value is not None:
                return value
    raw = _str(address.get("raw"))
    if raw:
        at = raw.lower().find(name + "=")
        if at >= 0:
            value = raw[at + len(name) + 1 :]
            for stop in ";>,":
                value = value.split(stop, 1)[0]
            return value.strip() or None
    return None


def _addresses(values: Any, calling_only: bool = False) -> list[dict[str, Any]]:
    if not isinstance(values, list):
        return []
    found = []
    for item in values[:MAX_VALUES]:
        if not isinstance(item, dict):
            continue
        if calling_only:
            params = item.get("header_parameters")
            party = params.get("party") if isinstance(params, dict) else None
            if party not in (None, "calling"):
                continue
        found.append(item)
    return found


def _user(address: dict[str, Any]) -> str | None:
    user = _str(address.get("user"))
    if user:
        return user
    raw = _str(address.get("raw"))
    return _user_from_raw(raw) if raw else user


def _privacy_requested(headers: dict[str, Any], rpid: list[dict[str, Any]]) -> bool:
    values = headers.get("privacy")
    if isinstance(values, list):
        for value in values[:MAX_VALUES]:
            if isinstance(value, str):
                tokens = value[:MAX_FIELD_CHARS].replace(",", ";").split(";")
                if any(t.strip().lower() in PRIVACY_TOKENS for t in tokens):
                    return True
    for address in rpid:
        params = address.get("header_parameters")
        privacy = params.get("privacy") if isinstance(params, dict) else None
        if isinstance(privacy, str) and privacy.lower() in RPID_PRIVACY:
            return True
    return False


class CallParser:
    """Turns a decoded request body into a :class:`Call`, per the ``caller`` settings."""

    def __init__(self, sources: tuple[str, ...], default_country: str = "1") -> None:
        self.sources = sources
        self.default_country = default_country

    def parse(self, body: dict[str, Any]) -> Call:
        headers = {k.lower(): v for k, v in body.items()}
        by_source = {
            "from": _addresses(headers.get("from")),
            "p-asserted-identity": _addresses(headers.get("p-asserted-identity")),
            "remote-party-id": _addresses(headers.get("remote-party-id"), calling_only=True),
        }
        from_user = _user(by_source["from"][0]) if by_source["from"] else None
        caller = caller_source = caller_user = None
        name = ""
        for source in self.sources:
            for address in by_source[source]:
                if not name:
                    name = (_str(address.get("name")) or "").strip()
                user = _user(address)
                if user is None or user.strip().lower() in WITHHELD_USERS:
                    continue
                if caller_user is None:
                    caller_user = user
                if caller is None:
                    caller = normalise(user, self.default_country)
                    if caller is not None:
                        caller_source = source
            if caller is not None and name:
                break
        anonymous = (
            caller is None
            or from_user is None
            or from_user.strip().lower() in WITHHELD_USERS
            or _privacy_requested(headers, by_source["remote-party-id"])
        )
        called = None
        to = _addresses(headers.get("to"))
        if to:
            called_user = _user(to[0])
            if called_user:
                called = normalise(called_user, self.default_country)
        verstat = None
        for address in by_source["from"][:1] + by_source["p-asserted-identity"][:1]:
            verstat = _param(address, "verstat")
            if verstat:
                break
        call_ids = headers.get("call-id")
        call_id = _str(call_ids[0]) if isinstance(call_ids, list) and call_ids else None
        return Call(
            caller=caller,
            caller_int=int(caller) if caller else None,
            caller_source=caller_source,
            caller_user=caller_user,
            caller_name=name,
            called=called,
            called_int=int(called) if called else None,
            anonymous=anonymous,
            verstat=verstat,
            call_id=call_id,
        )
