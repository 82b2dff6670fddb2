"""Number normalisation and validity: every form a caller or a list row may take.

Validity is checked against ``phonenumbers`` itself, on numbers drawn from its own
patterns and example numbers, mutated, and from random digits.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phonenumbers import (
    COUNTRY_CODE_TO_REGION_CODE,
    REGION_CODE_FOR_NON_GEO_ENTITY,
    PhoneMetadata,
)

from core import numbering_plan
from core.entries import BadEntry, canonical
from core.numbers import is_dialable, normalise, normalise_prefix
from devtools import phone_metadata


@pytest.mark.parametrize(
    "raw",
    [
        "5162065613",
        "15162065613",
        "+15162065613",
        "+1 (516) 206-5613",
        "1-516-206-5613",
        "516.206.5613",
        "(516) 206 5613",
        "tel:+15162065613",
        "tel:+1-516-206-5613;phone-context=example.com",
        "sip:15162065613@10.1.10.190",
        "sips:+15162065613@carrier.example;user=phone",
        "0015162065613",
        "01115162065613",
        " 15162065613 ",
    ],
)
def test_nanp_forms_become_one_key(raw: str) -> None:
    assert normalise(raw) == "15162065613"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+442079460018", "442079460018"),
        ("00442079460018", "442079460018"),
        ("011 44 20 7946 0018", "442079460018"),
        ("+49 30 901820", "4930901820"),
        ("493090182000", "493090182000"),  # not 10 digits: taken as already E.164
    ],
)
def test_international_numbers_keep_their_country_code(raw: str, expected: str) -> None:
    assert normalise(raw) == expected


def test_other_default_country_replaces_the_trunk_zero() -> None:
    assert normalise("020 7946 0018", default_country="44") == "442079460018"
    assert normalise("+1 516 206 5613", default_country="44") == "15162065613"
    assert normalise("0044 20 7946 0018", default_country="44") == "442079460018"


@pytest.mark.parametrize(
    ("raw", "country", "expected"),
    [
        ("06 1234 5678", "39", "390612345678"),  # Italy has no trunk prefix: the 0 stays
        ("0039 06 1234 5678", "39", "390612345678"),
        ("020 7946 0018", "44", "442079460018"),
        ("030 901820", "49", "4930901820"),
        ("01 42 68 53 00", "33", "33142685300"),
        ("03-1234-5678", "81", "81312345678"),
        ("02 1234 5678", "61", "61212345678"),
        ("044 668 18 00", "41", "41446681800"),
        ("8 495 123-45-67", "7", "74951234567"),  # Russia's trunk prefix is 8
        ("06 1 234 5678", "36", "3612345678"),  # Hungary's is 06
        ("0123 4567", "7", None),  # no trunk prefix, and E.164 cannot start with 0
        ("0201 2345", "999", "9992012345"),  # a code unknown to the data: trunk 0
    ],
)
def test_national_numbers_use_the_countrys_trunk_prefix(
    raw: str, country: str, expected: str | None
) -> None:
    assert normalise(raw, default_country=country) == expected


@pytest.mark.parametrize(
    "raw", ["anonymous", "", "+", "abc123", "1-800-FLOWERS", "+0123456789", "1" * 16, "٣٣٣"]
)
def test_non_numbers_are_rejected(raw: str) -> None:
    assert normalise(raw) is None


@pytest.mark.parametrize(
    ("number", "dialable"),
    [
        ("15162065613", True),
        ("19512623062", True),
        ("1516206561", False),  # too short
        ("105162065613", False),  # too long for NANP
        ("10162065613", False),  # NPA starts with 0
        ("11162065613", False),  # NPA starts with 1
        ("15160065613", False),  # NXX starts with 0
        ("15161065613", False),  # NXX starts with 1
        ("19112065613", False),  # N11 NPA
        ("15164112345", False),  # N11 NXX
        ("12125550142", False),  # 555-01xx fictional
        ("12125550200", True),  # 555-02xx is assignable
        ("442079460018", True),
        ("4420", False),  # too short anywhere
        ("5550123", False),  # 7 digits: a local number, not E.164
        ("6834002", False),  # a 7-digit Niue number: valid, but read as a local one
        ("19992623062", False),  # area code 999 is not assigned
        ("15555550100", False),  # nor is 555
        ("12125550142", False),  # 555-01xx, which libphonenumber accepts
        ("15164112345", False),  # N11 exchange, which libphonenumber accepts
        ("13101234", False),  # libphonenumber's 7-digit Canadian 310 numbers
        ("112125550200", False),  # a trunk 1 inside: not E.164
        ("999123456789", False),  # no country code 999
        ("41123456789", False),  # Swiss national numbers do not start with 1
        ("41446681800", True),  # CH Zurich
        ("41781234567", True),  # CH mobile
        ("447400123456", True),  # GB mobile
        ("4402079460018", False),  # GB with its trunk 0 inside
        ("4930901820", True),  # DE Berlin
        ("4915123456789", True),  # DE mobile
        ("390612345678", True),  # IT Rome: the 0 is part of the number
        ("393123456789", True),  # IT mobile
        ("33142685300", True),  # FR Paris
        ("33612345678", True),  # FR mobile
        ("81312345678", True),  # JP Tokyo
        ("819012345678", True),  # JP mobile
        ("61212345678", True),  # AU Sydney
        ("61412345678", True),  # AU mobile
        ("80012345678", True),  # international freephone, no region
        ("73412345678", True),  # RU (area code 341) ...
        ("77012345678", True),  # ... and KZ (7) share +7
        ("441624512345", True),  # IM shares +44 with GB
        ("12682345678", False),  # +1 268 is Antigua, which has no 234 exchange
        ("12684601234", True),  # but has 460
        ("4477001234567", False),  # one digit too many for a GB mobile
        ("", False),
        ("1", False),
        ("1212555020\u0660", False),  # an Arabic-Indic zero: not ASCII
    ],
)
def test_dialable_numbers(number: str, dialable: bool) -> None:
    assert is_dialable(number) is dialable


# --- Agreement with phonenumbers -------------------------------------------------------

_NANP_REJECTS = re.compile(r"1(?:\d11|\d{3}\d11|\d{3}55501)")
_NUMBER_TYPES = (*phone_metadata.NUMBER_TYPES, "general_desc")


def _metadata(code: int, region: str) -> PhoneMetadata:
    if region == REGION_CODE_FOR_NON_GEO_ENTITY:
        found = PhoneMetadata.metadata_for_nongeo_region(code)
    else:
        found = PhoneMetadata.metadata_for_region(region)
    assert found is not None
    return found


def _descriptions() -> list[tuple[str, str, str | None]]:
    """(country code, national-number pattern, example) of every type of every region."""
    found = []
    for code, regions in sorted(COUNTRY_CODE_TO_REGION_CODE.items()):
        for region in regions:
            metadata = _metadata(code, region)
            for name in _NUMBER_TYPES:
                desc = getattr(metadata, name)
                if desc is not None and desc.national_number_pattern:
                    found.append((str(code), desc.national_number_pattern, desc.example_number))
    return found


_DESCRIPTIONS = _descriptions()
_EXAMPLES = sorted({code + example for code, _, example in _DESCRIPTIONS if example})
_CODES = sorted(str(code) for code in COUNTRY_CODE_TO_REGION_CODE)
_DIGITS = st.text("0123456789", min_size=1, max_size=14)


@functools.cache
def _from_pattern(index: int) -> st.SearchStrategy[str]:
    code, pattern, _ = _DESCRIPTIONS[index]
    national = st.from_regex(re.compile(pattern, re.ASCII), fullmatch=True)
    return national.map(lambda digits: code + digits)


def _mutated(number: str, data: st.DataObject) -> str:
    """``number`` with one digit changed, added or dropped, or as it is."""
    how = data.draw(st.sampled_from(("same", "change", "add", "drop")))
    if how == "same" or not number:
        return number
    at = data.draw(st.integers(0, len(number) - 1))
    if how == "drop":
        return number[:at] + number[at + 1 :]
    digit = data.draw(st.sampled_from("0123456789"))
    return number[:at] + digit + number[at + (how == "change") :]


@st.composite
def numbers(draw: st.DrawFn) -> str:
    """E.164 digit strings, about half of them valid: near the valid ones is where a
    pattern that is slightly off shows."""
    source = draw(st.sampled_from(("pattern", "example", "code", "random")))
    if source == "pattern":
        number = draw(st.integers(0, len(_DESCRIPTIONS) - 1).flatmap(_from_pattern))
    elif source == "example":
        number = draw(st.sampled_from(_EXAMPLES))
    elif source == "code":
        number = draw(st.sampled_from(_CODES)) + draw(_DIGITS)
    else:
        number = draw(st.sampled_from("123456789")) + draw(_DIGITS)
    return _mutated(number, draw(st.data()))


def _valid_as_given(digits: str) -> bool:
    """``is_valid_number`` of the PhoneNumber these digits spell, without ``parse``."""
    if not digits or digits[0] == "0":
        return False
    for size in (1, 2, 3):
        code = int(digits[:size])
        if code in COUNTRY_CODE_TO_REGION_CODE:
            national = digits[size:]
            if not national:
                return False
            number = phonenumbers.PhoneNumber(country_code=code, national_number=int(national))
            zeros = len(national) - len(national.lstrip("0"))
            if zeros and len(national) > 1:  # how parse() keeps Italy's leading 0
                number.italian_leading_zero = True
                number.number_of_leading_zeros = min(zeros, len(national) - 1)
            return bool(phonenumbers.is_valid_number(number))
    return False


def _project_rule(digits: str) -> bool:
    """The project's own rejections (see is_dialable): short numbers, NANP specifics."""
    if not 8 <= len(digits) <= 15:
        return True
    return digits[0] == "1" and (len(digits) != 11 or _NANP_REJECTS.match(digits) is not None)


def _parsed(digits: str) -> tuple[bool, bool]:
    """``is_valid_number(parse("+" + digits))``, and whether parse changed the digits."""
    try:
        number = phonenumbers.parse("+" + digits)
    except phonenumbers.NumberParseException:
        return False, False
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return bool(phonenumbers.is_valid_number(number)), e164 != "+" + digits


@settings(max_examples=2000, deadline=None)
@given(numbers())
def test_dialable_agrees_with_phonenumbers(digits: str) -> None:
    expected = _valid_as_given(digits) and not _project_rule(digits)
    assert is_dialable(digits) is expected
    # And against parse(): any difference is parse rewriting the digits (a trunk
    # prefix it strips) or one of the project's rules.
    valid, rewritten = _parsed(digits)
    if valid is not expected:
        assert rewritten or (valid and _project_rule(digits))


def test_the_data_file_matches_the_installed_phonenumbers() -> None:
    assert phonenumbers.__version__ == numbering_plan.PHONENUMBERS_VERSION
    text = Path(numbering_plan.__file__).read_text(encoding="utf-8")
    assert text == phone_metadata.render(), "run: python -m devtools.phone_metadata"


def test_national_prefixes_are_the_main_regions() -> None:
    assert numbering_plan.NATIONAL_PREFIXES["44"] == "0"
    assert numbering_plan.NATIONAL_PREFIXES["39"] == ""
    assert numbering_plan.NATIONAL_PREFIXES["7"] == "8"
    assert numbering_plan.NATIONAL_PREFIXES["1"] == "1"


def test_prefixes_keep_country_code_first() -> None:
    assert normalise_prefix("+1 900") == "1900"
    assert normalise_prefix("0044870") == "44870"
    assert normalise_prefix("1-516-206") == "1516206"
    assert normalise_prefix("abc") is None
    assert normalise_prefix("") is None


def test_canonical_entries_per_kind() -> None:
    assert canonical("numbers", "(516) 206-5613") == "15162065613"
    assert canonical("prefixes", "+1 900") == "1900"
    assert canonical("names", "  SPAM Likely ") == "spam likely"
    assert canonical("names", "exact:Spam") == "spam"
    assert canonical("names", "Contains:WARRANTY") == "contains:warranty"
    assert canonical("names", r"re:^V\d{6}$") == r"re:^V\d{6}$"
    with pytest.raises(BadEntry, match="not a telephone number"):
        canonical("numbers", "robocaller")
    with pytest.raises(BadEntry, match="regular expression"):
        canonical("names", "re:([unclosed")
    with pytest.raises(BadEntry, match="empty"):
        canonical("names", "   ")
