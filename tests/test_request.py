"""Caller identification from CarrierX bodies (README, "How it decides"), and a fuzz of the parser."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from service.screening.request import CallParser, called_number, called_number_any
from tests.helpers import EXAMPLE_BODY, body_from

PARSER = CallParser(("from", "p-asserted-identity", "remote-party-id"))


def address(
    user: Any = None, name: str = "", raw: str | None = None, **params: Any
) -> dict[str, Any]:
    found: dict[str, Any] = {
        "header_parameters": params.pop("header_parameters", {}),
        "host": "10.0.0.1",
        "name": name,
        "uri_parameters": params.pop("uri_parameters", {}),
    }
    if user is not None:
        found["user"] = user
    if raw is not None:
        found["raw"] = raw
    return found


def test_documented_example() -> None:
    call = PARSER.parse(EXAMPLE_BODY)
    assert call.caller == "15162065613"
    assert call.caller_source == "from"
    assert call.caller_name == "John Smith"
    assert call.called == "19512623062"
    assert call.call_id == "243b35b872d5bb005af22dd9339e8149@10.1.10.190"
    assert not call.anonymous
    assert not call.invalid_number


def test_header_names_match_case_insensitively() -> None:
    body = {"FROM": [address("5162065613", "Jane")], "to": [address("9512623062")]}
    call = PARSER.parse(body)
    assert (call.caller, call.caller_name, call.called) == ("15162065613", "Jane", "19512623062")


def test_user_taken_from_raw_uri_when_missing() -> None:
    for raw in (
        '"J" <sip:+15162065613@host;user=phone>;tag=1',
        "<sips:15162065613@host>",
        "<tel:+1-516-206-5613>",
        "tel:+15162065613",
    ):
        call = PARSER.parse({"From": [address(None, raw=raw)]})
        assert call.caller == "15162065613", raw


def test_falls_back_to_p_asserted_identity_then_rpid() -> None:
    anonymous_from = address("anonymous", "Anonymous")
    body = {
        "From": [anonymous_from],
        "P-Asserted-Identity": [address("+15162065614", "Real Name")],
        "Remote-Party-ID": [address("15162065615", header_parameters={"party": "calling"})],
    }
    call = PARSER.parse(body)
    assert call.caller == "15162065614"
    assert call.caller_source == "p-asserted-identity"
    assert call.caller_name == "Anonymous"  # From name first, by the same fallbacks
    assert call.anonymous  # the From identity is withheld

    del body["P-Asserted-Identity"]
    call = PARSER.parse(body)
    assert (call.caller, call.caller_source) == ("15162065615", "remote-party-id")


def test_rpid_counts_only_for_the_calling_party() -> None:
    body = {
        "From": [address("anonymous")],
        "Remote-Party-ID": [
            address("15550000000", header_parameters={"party": "called"}),
            address("15162065616", header_parameters={"party": "calling"}),
        ],
    }
    assert PARSER.parse(body).caller == "15162065616"


def test_fallback_order_is_configurable() -> None:
    parser = CallParser(("p-asserted-identity", "from"))
    body = {"From": [address("15162065613")], "P-Asserted-Identity": [address("15162065614")]}
    assert parser.parse(body).caller == "15162065614"


def test_anonymous_forms() -> None:
    for user in ("anonymous", "Restricted", "unavailable", "unknown", ""):
        call = PARSER.parse({"From": [address(user)]})
        assert call.anonymous and call.caller is None, user
    assert PARSER.parse({}).anonymous
    assert PARSER.parse({"From": [address(None)]}).anonymous
    for privacy in ("id", "full", "header;id", "user"):
        call = PARSER.parse(body_from(Privacy=[privacy]))
        assert call.anonymous and call.caller == "15162065613", privacy
    rpid_full = address("15162065613", header_parameters={"party": "calling", "privacy": "full"})
    with_rpid = body_from()
    with_rpid["Remote-Party-ID"] = [rpid_full]
    assert PARSER.parse(with_rpid).anonymous
    assert not PARSER.parse(body_from(Privacy=["none"])).anonymous


def test_invalid_numbers() -> None:
    assert PARSER.parse(body_from("5550123")).invalid_number  # 7 digits
    assert PARSER.parse(body_from("12125550142")).invalid_number  # 555-01xx
    assert PARSER.parse(body_from("john")).invalid_number  # a name, not a number
    assert not PARSER.parse(body_from("anonymous")).invalid_number  # anonymous, not invalid


def test_verstat_from_uri_parameters_or_raw() -> None:
    failed = address("15162065613", uri_parameters={"verstat": "TN-Validation-Failed"})
    call = PARSER.parse({"From": [failed]})
    assert call.verstat == "TN-Validation-Failed" and call.attestation_failed
    raw = "<sip:+15162065613@host;verstat=TN-Validation-Passed;user=phone>"
    call = PARSER.parse({"From": [address(None, raw=raw)]})
    assert call.verstat == "TN-Validation-Passed" and not call.attestation_failed
    pai = address("15162065613", uri_parameters={"verstat": "tn-validation-failed"})
    call = PARSER.parse({"From": [address("15162065613")], "P-Asserted-Identity": [pai]})
    assert call.attestation_failed


def test_odd_shapes_make_the_caller_unknown() -> None:
    for body in (
        {"From": "15162065613"},
        {"From": {"user": "15162065613"}},
        {"From": [None, 3, "x"]},
        {"From": [{"user": 15162065613}]},
        {"From": [{"user": ["15162065613"]}]},
        {"From": [{"user": "9" * 10_000}]},
        {"From": [{"raw": 42}]},
    ):
        call = PARSER.parse(body)
        assert call.caller is None and call.anonymous, body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner, max_size=5)
    ),
    max_leaves=8,
)
header_names = st.sampled_from(
    ["From", "from", "To", "P-Asserted-Identity", "Remote-Party-ID", "Privacy", "Call-ID", "X"]
)
address_like = st.fixed_dictionaries(
    {},
    optional={
        "user": json_values | st.text(max_size=40),
        "name": json_values,
        "raw": st.text(max_size=80) | json_values,
        "header_parameters": st.dictionaries(st.text(max_size=10), json_values, max_size=3),
        "uri_parameters": st.dictionaries(st.text(max_size=10), json_values, max_size=3),
    },
)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        header_names | st.text(max_size=20),
        st.lists(address_like | json_values, max_size=3) | json_values,
        max_size=8,
    )
)
def test_parser_never_raises(body: dict[str, Any]) -> None:
    call = PARSER.parse(body)
    assert call.caller is None or call.caller.isdigit()
    assert isinstance(call.anonymous, bool)


def facts(call: Any) -> tuple[Any, ...]:
    """Everything a rule, the log or explain reads of a call."""
    return (
        call.caller, call.caller_int, call.caller_source, call.caller_user, call.caller_name,
        call.call_id, call.from_user, call.froms, call.called, call.anonymous, call.verstat,
        call.invalid_number, call.attestation_failed,
    )  # fmt: skip


# Mostly what takes the short way (digits, a name, a Call-ID list), with the edges.
digit_users = (
    st.from_regex(r"\A[0-9]{7,15}\Z") | st.from_regex(r"\A\+?[0-9]{0,16}\Z") | st.text(max_size=12)
)
names = st.sampled_from(["JOHN SMITH", " ", "", "  padded  ", "x" * 300]) | json_values
call_ids = st.lists(st.text(max_size=300), min_size=1, max_size=2) | json_values


@settings(max_examples=300, deadline=None)
@given(
    user=digit_users,
    name=names,
    call_id=call_ids,
    call_id_spelling=st.sampled_from(["Call-ID", "Call-ID", "call-id", None]),
    extra=st.dictionaries(header_names, st.lists(address_like, max_size=2), max_size=3),
    country=st.sampled_from(["1", "44", "39"]),
)
def test_the_usual_body_parses_as_the_general_way_does(
    user: str, name: Any, call_id: Any, call_id_spelling: str | None,
    extra: dict[str, Any], country: str,
) -> None:  # fmt: skip
    """CallParser.parse takes a short way for one From address with a digit user and a
    name; every fact of the call must be what the general way (parse_any) finds."""
    body: dict[str, Any] = dict(extra)
    body["From"] = [address(user, name) | {"name": name}]
    if call_id_spelling is not None:
        body[call_id_spelling] = call_id
    for sources in (("from", "p-asserted-identity"), ("p-asserted-identity", "from")):
        parser = CallParser(sources, country)
        assert facts(parser.parse(body)) == facts(parser.parse_any(body)), body


@settings(max_examples=300, deadline=None)
@given(
    to=st.lists(
        address_like | st.builds(address, digit_users) | json_values, min_size=0, max_size=2
    )
    | json_values,
    country=st.sampled_from(["1", "44", "39"]),
)
def test_the_usual_called_number_parses_as_the_general_way_does(to: Any, country: str) -> None:
    """called_number takes a short way for one To address with a digit user; the number
    must be the one the general way finds, for any shape of To value."""
    assert called_number(to, country) == called_number_any(to, country), to
