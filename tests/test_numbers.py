"""Number normalisation (SPEC §2): every form a caller or a list row may take."""

from __future__ import annotations

import pytest

from core.entries import BadEntry, canonical
from core.numbers import is_dialable, normalise, normalise_prefix


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
    ],
)
def test_dialable_numbers(number: str, dialable: bool) -> None:
    assert is_dialable(number) is dialable


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
