"""From a CarrierX request body to the facts a policy decides on (README, "How it decides").

Nothing here trusts the body's shape: a value of the wrong type counts as absent, so odd
input makes the caller unknown (and so anonymous), never an error. Header names match
case-insensitively (CarrierX's spelling wins a tie). The caller's number and name are
read up front (a short way for the usual single ``From``); the called number,
anonymity and ``verstat`` when a rule first asks. What anonymous, invalid and verstat
mean: docs/design.md, "Anonymous", and README, "How it decides".
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, overload

from core.numbers import is_dialable, normalise

WITHHELD_USERS = frozenset(
    {"", "anonymous", "restricted", "unavailable", "unknown", "private", "withheld"}
)
PRIVACY_TOKENS = frozenset({"id", "user", "full"})
#: CarrierX's spelling of each header read here (keys: the names in lower case).
_SPELLINGS = {
    "from": "From",
    "to": "To",
    "call-id": "Call-ID",
    "p-asserted-identity": "P-Asserted-Identity",
    "remote-party-id": "Remote-Party-ID",
    "privacy": "Privacy",
    "identity": "Identity",
}
RPID_PRIVACY = frozenset({"full", "uri"})
MAX_FIELD_CHARS = 256
#: Only the first few values of a header are looked at.
MAX_VALUES = 8


_T = TypeVar("_T")


class once(Generic[_T]):
    """``functools.cached_property`` without its lock: CPython 3.11 takes an RLock at
    every first read, and a call reads several of these once each. A call is read by
    one event loop only. The value becomes an attribute of the instance, which then
    answers every later read without this descriptor."""

    def __init__(self, func: Callable[[Any], _T]) -> None:
        self.func = func
        self.name = func.__name__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> once[_T]: ...
    @overload
    def __get__(self, instance: object, owner: type | None = None) -> _T: ...
    def __get__(self, instance: object | None, owner: type | None = None) -> once[_T] | _T:
        if instance is None:
            return self
        value = self.func(instance)
        # setattr, not ``instance.__dict__[...]``: reading ``__dict__`` would make the
        # instance trade its compact attribute storage for a dict, slowing every read.
        setattr(instance, self.name, value)
        return value


class Headers:
    """Case-insensitive access to the body's headers.

    A header in CarrierX's spelling costs one dictionary look-up; only when it is not
    there are all the body's names lower-cased (once per call), to find other spellings.
    """

    __slots__ = ("_body", "_lowered")

    def __init__(self, body: dict[str, Any]) -> None:
        self._body = body
        self._lowered: dict[str, Any] | None = None

    def get(self, name: str) -> Any:
        """The value of header ``name`` (given in lower case), or None."""
        value = self._body.get(_SPELLINGS.get(name, name))
        if value is not None:
            return value
        if self._lowered is None:
            body = self._body
            self._lowered = dict(zip(map(str.lower, body), body.values(), strict=True))
        return self._lowered.get(name)


@dataclass
class Call:
    """One call as the policy sees it. Numbers are canonical E.164 digit strings.

    The fields are read when the call is parsed; the properties below them on first use.
    """

    caller: str | None
    caller_int: int | None
    caller_source: str | None
    #: The first non-withheld user part seen, as sent (for explain and invalid checks).
    caller_user: str | None
    caller_name: str
    call_id: str | None
    headers: Headers = field(repr=False)
    #: The ``From`` address objects and the first one's user part.
    froms: list[dict[str, Any]] = field(repr=False)
    from_user: str | None = field(repr=False)
    default_country: str = field(repr=False)
    #: The STIR/SHAKEN verification (service/screening/stir/verify.py), set by the
    #: screener before a policy with ``stir_*`` rules evaluates the call.
    stir: Any = field(default=None, repr=False)

    @once
    def called(self) -> str | None:
        """The called number (``To``), normalised."""
        return called_number(self.headers.get("to"), self.default_country)

    @once
    def called_int(self) -> int | None:
        called = self.called
        return int(called) if called else None

    @once
    def anonymous(self) -> bool:
        """The caller withheld their identity (see the module docstring)."""
        from_user = self.from_user
        return (
            self.caller is None
            or from_user is None
            or _withheld(from_user)
            or _privacy_requested(self.headers)
        )

    @once
    def verstat(self) -> str | None:
        """The ``verstat`` attestation of ``From``, else of ``P-Asserted-Identity``."""
        for address in self.froms[:1] + _addresses(self.headers.get("p-asserted-identity"))[:1]:
            verstat = _param(address, "verstat")
            if verstat:
                return verstat
        return None

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


#: Raw addresses are parsed for parameters up to this length: long display names and
#: tags must not push ``verstat`` out of reach, but the work stays bounded.
MAX_RAW_CHARS = 1024
#: Parameters looked at in one parsed-parameters object, when the name's exact
#: spelling is not a key of it.
MAX_PARAMS = 32
_URI_SCHEMES = frozenset({"sip", "sips", "tel"})


@dataclass(frozen=True, slots=True)
class RawUri:
    """The parts of the URI in a raw address, as text.

    ``"N" <sip:+1212;verstat=X@host;user=phone>;tag=a`` gives user ``+1212``, user
    parameters ``verstat=X``, host ``host``, URI parameters ``user=phone`` and header
    parameters ``;tag=a``. A ``tel:`` URI has no host; its parameters are URI parameters.
    """

    scheme: str
    user: str | None
    user_params: str
    host: str
    uri_params: str
    header_params: str


def _after_display_name(text: str) -> str | None:
    """``text`` past a leading quoted display name (which may hold ``<``, ``@``, ``;``)."""
    if text[:1] != '"':
        return text
    i, size = 1, len(text)
    while i < size:
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == '"':
            return text[i + 1 :]
        i += 1
    return None  # unterminated: no URI can be told apart from the name


def parse_raw_uri(raw: str) -> RawUri | None:
    """The ``sip:``, ``sips:`` or ``tel:`` URI of a raw address, split; None if it has none."""
    text = _after_display_name(raw.strip())
    if text is None:
        return None
    start = text.find("<")
    bracketed = start >= 0
    if bracketed:
        end = text.find(">", start)
        uri = text[start + 1 : end] if end > 0 else text[start + 1 :]
        header = text[end + 1 :] if end > 0 else ""
    else:
        uri, header = text, ""
    scheme, colon, rest = uri.partition(":")
    scheme = scheme.strip().lower()
    if not colon or scheme not in _URI_SCHEMES:
        return None
    rest = rest.partition("?")[0]  # ?headers of the URI are not parameters
    if scheme == "tel":
        number, _, uri_params = rest.partition(";")
        return RawUri(scheme, number, "", "", uri_params, header)
    # The user part runs to the last "@": a parameter value in it may hold another.
    userinfo, at, hostport = rest.rpartition("@")
    user: str | None = None
    user_params = ""
    if at:
        user, _, user_params = userinfo.partition(";")
    host, _, uri_params = hostport.partition(";")
    if not bracketed:
        # RFC 3261 §20.10: without <>, parameters after the URI belong to the header.
        uri_params, header = "", uri_params
    return RawUri(scheme, user, user_params, host, uri_params, header)


def _user_from_raw(raw: str) -> str | None:
    """The user part of the URI in a raw address (``"N" <sip:user@host>;tag=x``)."""
    uri = parse_raw_uri(raw)
    return uri.user if uri is not None else None


def _clean(value: str) -> str | None:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1].strip()
    return value[:MAX_FIELD_CHARS] or None


def _find_param(params: str, name: str) -> str | None:
    """The value of parameter ``name`` (lower case) in ``a=1;b=2`` text, by exact name."""
    if not params:
        return None
    for item in params.split(";"):
        key, eq, value = item.partition("=")
        if eq and key.strip().lower() == name:
            return _clean(value)
    return None


def _dict_param(params: Any, name: str) -> str | None:
    """Parameter ``name`` (lower case) of a parsed-parameters object from CarrierX."""
    if not isinstance(params, dict):
        return None
    value = params.get(name)
    if value is None:
        for key, item in itertools.islice(params.items(), MAX_PARAMS):
            if isinstance(key, str) and key.lower() == name:
                value = item
                break
    return _clean(value) if isinstance(value, str) else None


def _param(address: dict[str, Any], name: str) -> str | None:
    """A SIP parameter of an address, by exact name (``name`` in lower case, matched
    case-insensitively), or None.

    Looked for in CarrierX's parsed ``uri_parameters`` and ``header_parameters``, then
    in the parameters of its ``user`` field (``+1212;verstat=X``), then in the raw
    address: the URI's user-part parameters, its URI parameters, its header parameters.
    """
    for kind in ("uri_parameters", "header_parameters"):
        value = _dict_param(address.get(kind), name)
        if value is not None:
            return value
    user = address.get("user")
    if isinstance(user, str) and ";" in user:
        value = _find_param(user[:MAX_RAW_CHARS].partition(";")[2], name)
        if value is not None:
            return value
    raw = address.get("raw")
    if not isinstance(raw, str) or not raw:
        return None
    uri = parse_raw_uri(raw[:MAX_RAW_CHARS])
    if uri is None:
        return None
    # Several addresses in one header value are separated by commas: keep to the first.
    header = uri.header_params.partition(",")[0]
    for params in (uri.user_params, uri.uri_params, header):
        value = _find_param(params, name)
        if value is not None:
            return value
    return None


def called_number(to: Any, default_country: str) -> str | None:
    """The called number of a body's ``To`` header value (as parsed), normalised."""
    # The usual CarrierX value first: one address whose user part is digits (the same
    # number as called_number_any gives; tests/test_request.py compares both).
    if type(to) is list and len(to) == 1:
        first = to[0]
        if type(first) is dict:
            user = first.get("user")
            if type(user) is str and user.isdigit():
                return normalise(user[:MAX_FIELD_CHARS], default_country)
    return called_number_any(to, default_country)


def called_number_any(to: Any, default_country: str) -> str | None:
    """:func:`called_number` the general way: any shape of ``To`` value."""
    found = _addresses(to)
    user = _user(found[0]) if found else None
    return normalise(user, default_country) if user else None


def _addresses(values: Any, calling_only: bool = False) -> list[dict[str, Any]]:
    """The address objects of one header (the first MAX_VALUES values that are objects)."""
    if not isinstance(values, list):
        return []
    if len(values) == 1 and not calling_only:  # the usual case, without copying
        return values if isinstance(values[0], dict) else []
    found = [item for item in values[:MAX_VALUES] if isinstance(item, dict)]
    if calling_only:
        found = [item for item in found if _party(item) in (None, "calling")]
    return found


def _party(address: dict[str, Any]) -> Any:
    params = address.get("header_parameters")
    return params.get("party") if isinstance(params, dict) else None


def _withheld(user: str) -> bool:
    # Digits are the usual case and never a withheld word: skip the normalising.
    if user.isdigit():
        return False
    # CarrierX may hand the user part with its parameters: "anonymous;verstat=...".
    return user.partition(";")[0].strip().lower() in WITHHELD_USERS


def _user(address: dict[str, Any]) -> str | None:
    user = address.get("user")
    if isinstance(user, str) and user:
        return user[:MAX_FIELD_CHARS]
    raw = address.get("raw")
    if isinstance(raw, str) and raw:
        return _user_from_raw(raw[:MAX_FIELD_CHARS])
    return user if isinstance(user, str) else None


def _privacy_requested(headers: Headers) -> bool:
    values = headers.get("privacy")
    if isinstance(values, list):
        for value in values[:MAX_VALUES]:
            if isinstance(value, str):
                tokens = value[:MAX_FIELD_CHARS].replace(",", ";").split(";")
                if any(t.strip().lower() in PRIVACY_TOKENS for t in tokens):
                    return True
    for address in _addresses(headers.get("remote-party-id"), calling_only=True):
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
        #: ``From`` is read first: a call settled by it needs no other header.
        self.from_first = sources[:1] == ("from",)

    def parse(self, body: dict[str, Any]) -> Call:
        # The usual CarrierX body, decided on its From alone: one address whose user
        # part is digits and which has a display name. The same Call as the general
        # way below gives it (tests/test_request.py compares both on every shape).
        froms = body.get("From")
        if self.from_first and type(froms) is list and len(froms) == 1:
            first = froms[0]
            if type(first) is dict:
                user = first.get("user")
                name = first.get("name")
                if type(user) is str and type(name) is str and user.isdigit():
                    user = user[:MAX_FIELD_CHARS]
                    name = name[:MAX_FIELD_CHARS].strip()
                    caller = normalise(user, self.default_country) if name else None
                    call_ids = body.get("Call-ID")
                    # No Call-ID in CarrierX's spelling: another spelling may hold it.
                    if caller is not None and call_ids is not None:
                        ok = type(call_ids) is list and call_ids
                        return Call(
                            caller, int(caller), "from", user, name,
                            _str(call_ids[0]) if ok else None,
                            Headers(body), froms, user, self.default_country,
                        )  # fmt: skip
        return self.parse_any(body)

    def parse_any(self, body: dict[str, Any]) -> Call:
        """The general way: any shape, every ``caller.sources`` entry in order."""
        headers = Headers(body)
        froms = _addresses(headers.get("from"))
        first_from = froms[0] if froms else None
        from_user = _user(first_from) if first_from is not None else None
        caller = caller_source = caller_user = None
        name = ""
        for source in self.sources:
            if source == "from":
                addresses = froms
            else:
                addresses = _addresses(
                    headers.get(source), calling_only=source == "remote-party-id"
                )
            for address in addresses:
                if not name:
                    name = _name(address)
                user = from_user if address is first_from else _user(address)
                if user is None or _withheld(user):
                    continue
                if caller_user is None:
                    caller_user = user
                if caller is None:
                    caller = normalise(user, self.default_country)
                    if caller is not None:
                        caller_source = source
            if caller is not None and name:
                break
        call_ids = headers.get("call-id")
        call_id = _str(call_ids[0]) if isinstance(call_ids, list) and call_ids else None
        return Call(
            caller,
            int(caller) if caller else None,
            caller_source,
            caller_user,
            name,
            call_id,
            headers,
            froms,
            from_user,
            self.default_country,
        )


def _name(address: dict[str, Any]) -> str:
    name = address.get("name")
    return name[:MAX_FIELD_CHARS].strip() if isinstance(name, str) else ""
