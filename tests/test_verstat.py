"""STIR/SHAKEN ``verstat``: parsed from where carriers put it, and acted on by a real service."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devtools.redis_server import RedisProcess
from service.screening.request import MAX_FIELD_CHARS, CallParser, RawUri, parse_raw_uri
from tests.helpers import EXAMPLE_BODY, REJECT
from tests.procs import ServiceProcess

PARSER = CallParser(("from", "p-asserted-identity", "remote-party-id"))
FAILED = "TN-Validation-Failed"
PASSED = "TN-Validation-Passed"
#: The standard placement: a parameter of the URI's user part.
USER_PART_RAW = f"<sip:+12125551234;verstat={FAILED}@10.0.0.1;user=phone>;tag=abc"


def address(raw: str | None = None, user: str | None = None, **parsed: Any) -> dict[str, Any]:
    """A CarrierX address object; parsed parameter dicts are empty unless given."""
    found: dict[str, Any] = {
        "header_parameters": parsed.pop("header_parameters", {}),
        "host": "10.0.0.1",
        "name": "",
        "uri_parameters": parsed.pop("uri_parameters", {}),
    }
    if raw is not None:
        found["raw"] = raw
    if user is not None:
        found["user"] = user
    return found


def verstat_of(raw: str | None = None, user: str | None = None, **parsed: Any) -> str | None:
    return PARSER.parse({"From": [address(raw, user, **parsed)]}).verstat


def test_the_raw_uri_is_split_into_its_parts() -> None:
    assert parse_raw_uri(f'"Jane; <x@y>" {USER_PART_RAW}') == RawUri(
        scheme="sip",
        user="+12125551234",
        user_params=f"verstat={FAILED}",
        host="10.0.0.1",
        uri_params="user=phone",
        header_params=";tag=abc",
    )
    assert parse_raw_uri("tel:+12125551234;verstat=x") == RawUri(
        "tel", "+12125551234", "", "", "verstat=x", ""
    )
    # Without <>, parameters after the host are the header's (RFC 3261 §20.10).
    unbracketed = parse_raw_uri("sip:+1212;a=1@host;b=2")
    assert unbracketed is not None
    assert (unbracketed.user_params, unbracketed.uri_params) == ("a=1", "")
    assert unbracketed.header_params == "b=2"
    assert parse_raw_uri("<sip:host;x=1?Subject=y>") == RawUri("sip", None, "", "host", "x=1", "")
    for no_uri in ("", "John", "<http://x@y>", '"unterminated <sip:1@h>', "mailto:a@b"):
        assert parse_raw_uri(no_uri) is None, no_uri


def test_verstat_in_the_user_part_of_the_raw_uri() -> None:
    assert verstat_of(USER_PART_RAW) == FAILED
    call = PARSER.parse({"From": [address(USER_PART_RAW, "+12125551234")]})
    assert call.caller == "12125551234" and call.attestation_failed


def test_a_user_field_with_its_parameters_still_normalises_and_gives_the_verstat() -> None:
    call = PARSER.parse({"From": [address(user=f"+12125551234;verstat={FAILED}")]})
    assert call.caller == "12125551234" and call.caller_source == "from"
    assert call.verstat == FAILED and call.attestation_failed
    assert not call.anonymous and not call.invalid_number
    withheld = PARSER.parse({"From": [address(user=f"anonymous;verstat={PASSED}")]})
    assert withheld.anonymous and not withheld.invalid_number


def test_verstat_as_a_uri_parameter_a_header_parameter_and_in_tel_uris() -> None:
    assert verstat_of(f"<sip:+12125551234@host;user=phone;verstat={PASSED}>") == PASSED
    assert verstat_of(f"sip:+12125551234@host;verstat={FAILED}") == FAILED
    assert verstat_of(f"<sip:+12125551234@host>;tag=1;verstat={FAILED}") == FAILED
    assert verstat_of(f"<tel:+12125551234;verstat={PASSED}>") == PASSED
    assert verstat_of(f"tel:+12125551234;verstat={PASSED}") == PASSED
    assert verstat_of(f'<sip:+1212@h>;verstat="{FAILED}"') == FAILED


def test_parsed_parameters_come_first_then_the_user_field_then_the_raw_text() -> None:
    raw = "<sip:+1212;verstat=raw-user@h;verstat=raw-uri>;verstat=raw-header"
    assert verstat_of(raw, uri_parameters={"verstat": "parsed"}) == "parsed"
    assert verstat_of(raw, header_parameters={"Verstat": "parsed-header"}) == "parsed-header"
    assert verstat_of(raw, "+1212;verstat=user-field") == "user-field"
    assert verstat_of(raw) == "raw-user"
    assert verstat_of("<sip:+1212@h;verstat=raw-uri>;verstat=raw-header") == "raw-uri"


def test_names_match_exactly_and_case_insensitively() -> None:
    assert verstat_of(f"<sip:+1212;VERSTAT={FAILED}@h>") == FAILED
    assert verstat_of(f"<sip:+1212@h>;VerStat={FAILED}") == FAILED
    assert verstat_of(f"<sip:+1212@h;xverstat={FAILED};verstatx=1>") is None
    assert verstat_of(f"<sip:+1212@h;tag=verstat={FAILED}>") is None
    # A display name is not part of the URI, whatever it holds.
    assert verstat_of(f'"a;verstat={FAILED} <sip:x@y>" <sip:+1212@h>') is None
    assert verstat_of("<sip:+1212@h>", uri_parameters={"VERSTAT": FAILED}) == FAILED


def test_p_asserted_identity_is_the_fallback() -> None:
    pai = address(f"<sip:+12125551234;verstat={FAILED}@h>")
    call = PARSER.parse({"From": [address("<sip:+12125551234@h>")], "P-Asserted-Identity": [pai]})
    assert call.verstat == FAILED and call.attestation_failed
    first = address(f"<sip:+12125551234;verstat={PASSED}@h>")
    call = PARSER.parse({"From": [first], "P-Asserted-Identity": [pai]})
    assert call.verstat == PASSED and not call.attestation_failed


def test_hostile_input_gives_a_short_string_or_none_and_never_raises() -> None:
    long = "x" * 100_000
    for raw in (
        "sip:;verstat=@@@",
        "sip:@@@;verstat",
        ";;;;verstat=;;;;",
        "<<<>>>" * 1000,
        '"' * 5000,
        "sip:" + "@" * 5000,
        f"<sip:+1212;verstat={long}@h>",
        f"<sip:{long};verstat={FAILED}@h>",
        "<sip:+1212@h>;" + "a=b;" * 5000 + f"verstat={FAILED}",
        "\x00\ud800<sip:\n@\r>;verstat=\t",
    ):
        verstat = verstat_of(raw)
        assert verstat is None or (isinstance(verstat, str) and len(verstat) <= MAX_FIELD_CHARS)
    for odd in (None, 3, [FAILED], {"verstat": [FAILED]}):
        assert verstat_of(None, None, uri_parameters=odd, header_parameters=odd) is None
        assert PARSER.parse({"From": [{"raw": odd, "user": odd}]}).verstat is None
    assert verstat_of(user=f"+1212;verstat={long}") == "x" * MAX_FIELD_CHARS
    assert not PARSER.parse({"From": [address("sip:;verstat=@@@")]}).attestation_failed


# A real service with a SHAKEN rule, fed the From header CarrierX delivers.

SHAKEN_POLICY = {"default": {"rules": [{"name": "shaken", "match": "attestation_failed"}]}}


def shaken_body(verstat: str, user_with_params: bool) -> dict[str, Any]:
    body = copy.deepcopy(EXAMPLE_BODY)
    del body["Remote-Party-ID"]
    sender = body["From"][0]
    sender["raw"] = f"<sip:+12125551234;verstat={verstat}@10.0.0.1;user=phone>;tag=abc"
    sender["user"] = f"+12125551234;verstat={verstat}" if user_with_params else "+12125551234"
    sender["host"] = "10.0.0.1"
    sender["uri_parameters"] = {"user": "phone"}
    sender["header_parameters"] = {"tag": "abc"}
    return body


@pytest.fixture
def service(tmp_path: Path, redis_server: RedisProcess) -> Iterator[ServiceProcess]:
    process = ServiceProcess(tmp_path, redis_server.url, overrides={"policies": SHAKEN_POLICY})
    yield process
    process.stop()


async def test_a_running_service_rejects_failed_attestation_in_the_user_part(
    service: ServiceProcess,
) -> None:
    service.start()
    await service.ready()
    async with aiohttp.ClientSession() as session:
        for user_with_params in (True, False):
            failed = shaken_body(FAILED, user_with_params)
            async with session.post(f"{service.url}/tg/main", json=failed) as response:
                assert response.status == 200
                assert await response.json() == REJECT, user_with_params
            passed = shaken_body(PASSED, user_with_params)
            async with session.post(f"{service.url}/tg/main", json=passed) as response:
                assert await response.json() == [], user_with_params
            async with session.post(f"{service.url}/v1/explain/tg/main", json=failed) as response:
                assert response.status == 200
                explained = await response.json()
            assert explained["decision"] == "reject" and explained["rule"] == "shaken"
            assert explained["caller"]["verstat"] == FAILED
            assert explained["caller"]["number"] == "12125551234"
