"""The in-memory list copies every decision reads: right answers at any size."""

from __future__ import annotations

import random
from array import array

import numpy as np
import pytest

from core import keys
from core.entries import BadEntry, canonical
from core.store import unpack_bucket
from service.screening import lists as lists_module
from service.screening.lists import NameList, NumberList, PrefixList


def stored_buckets(numbers: list[int]) -> list[array[int]]:
    """The buckets as the store hands them over: by ``number % NUMBER_BUCKETS``, sorted."""
    values = np.unique(np.array(numbers, dtype="<u8"))
    ids = values % keys.NUMBER_BUCKETS
    return [unpack_bucket(values[ids == b].tobytes()) for b in range(keys.NUMBER_BUCKETS)]


def test_numbers_found_and_not_found_at_several_sizes() -> None:
    rng = random.Random(5)
    for size in (0, 1, 50, 20_000, 100_000):
        pool = rng.sample(range(12_000_000_000, 19_999_999_999), size + 2_000)
        listed, unlisted = pool[:size], pool[size:]
        numbers = NumberList(stored_buckets(listed))
        assert numbers.size == size
        assert all(n in numbers for n in listed)
        assert not any(n in numbers for n in unlisted)


def test_numbers_next_to_each_other_and_sharing_a_group() -> None:
    # Neighbours, and numbers that fall in the same look-up group, all kept apart.
    listed = [15162065613 + i * keys.NUMBER_BUCKETS for i in range(40)] + [15162065614]
    numbers = NumberList(stored_buckets(listed))
    assert all(n in numbers for n in listed)
    assert 15162065615 not in numbers
    assert 15162065613 + 40 * keys.NUMBER_BUCKETS not in numbers


def test_admin_changes_on_top_of_the_base() -> None:
    base = NumberList(stored_buckets([15162065613, 15162065614]))
    changed = base.with_deltas(adds=["15162065699"], dels=["15162065613", "15169999999"])
    assert 15162065699 in changed and 15162065614 in changed
    assert 15162065613 not in changed
    assert changed.size == 2  # +1 added, -1 removed (removing an absent number changes nothing)
    assert 15162065613 in base  # the base itself is untouched and shared


def test_prefixes_match_the_shortest_entry() -> None:
    prefixes = PrefixList(frozenset({"1900", "1900555", "44870", "882"}))
    assert prefixes.match("19005550100") == "1900"
    assert prefixes.match("448701234567") == "44870"
    assert prefixes.match("8821234567") == "882"
    assert prefixes.match("15162065613") is None
    assert prefixes.match("4487") is None  # shorter than the entry
    assert PrefixList(frozenset()).match("15162065613") is None


def test_names_exact_contains_and_patterns_case_insensitively() -> None:
    entries = ("Spam Likely", "contains:Warranty", "contains:Straße", r"re:^v\d{6,}$")
    names = NameList(frozenset(canonical("names", e) for e in entries))
    assert names.match("SPAM LIKELY") == "spam likely"
    assert names.match("Auto WARRANTY Dept") == "contains:warranty"
    assert names.match("HAUPTSTRASSE 1") == "contains:strasse"  # ß and SS fold alike
    assert names.match("V1234567") == r"re:^v\d{6,}$"
    assert names.match("John Smith") is None
    assert names.match("") is None


def test_many_substrings_sharing_beginnings() -> None:
    needles = ["auto warranty", "auto", "debt relief 01", "debt relief 07", "deb"]
    names = NameList(frozenset(canonical("names", f"contains:{n}") for n in needles))
    assert names.match("AUTOMATIC") == "contains:auto"
    assert names.match("DEBT RELIEF 07") == "contains:deb"  # the first entry, sorted
    assert names.match("X DEBT RELIEF 09") == "contains:deb"
    assert names.match("AUT") is None
    assert names.match("DE B") is None


def test_a_bad_pattern_is_skipped_not_fatal() -> None:
    names = NameList(frozenset({"re:(unclosed", "contains:robo"}))
    assert names.match("ROBO CALLER") == "contains:robo"
    assert names.match("(unclosed") is None


def test_a_catastrophic_pattern_answers_at_once_and_rightly() -> None:
    # (a+)+$ against many a's then a non-match takes a backtracking engine ~2^n steps.
    names = NameList(frozenset({canonical("names", "re:(a+)+$")}))
    assert names.match("a" * 40 + "!") is None
    # Cut to MAX_NAME_CHARS first: the "!" falls off, what is left is all a's.
    assert names.match("a" * 5_000 + "!") == "re:(a+)+$"
    assert names.match("x" + "a" * 40) == "re:(a+)+$"
    nested = NameList(frozenset({canonical("names", r"re:^(\w+\s?)*$")}))
    assert nested.match("word " * 20 + "!") is None
    assert nested.match("Word word") == r"re:^(\w+\s?)*$"


def test_patterns_are_case_insensitive_and_name_the_first_match() -> None:
    entries = ("re:^robo", r"re:CALLER \d+$", "re:(?-i)Exact", "re:o")
    names = NameList(frozenset(canonical("names", e) for e in entries))
    assert names.match("ROBOCALL") == "re:^robo"  # "re:o" also matches; sorted first wins
    assert names.match("wireless caller 42") == r"re:CALLER \d+$"
    assert names.match("EXACT") is None  # the entry turned case-sensitivity back on
    assert names.match("Exact") == "re:(?-i)Exact"
    assert names.match("Jim") is None


def test_many_patterns_find_the_one_that_matched() -> None:
    entries = [rf"re:^caller{i:03d}\d*$" for i in range(100)]
    names = NameList(frozenset(canonical("names", e) for e in entries))
    assert names.match("CALLER0427") == r"re:^caller042\d*$"
    assert names.match("caller0999") == r"re:^caller099\d*$"
    assert names.match("caller1") is None


def test_a_pattern_re2_cannot_use_is_skipped_and_refused() -> None:
    # Stored before the RE2 check (or written to Redis directly): skipped, the rest works.
    names = NameList(frozenset({r"re:(a)\1", "re:(?=x)y", "re:^spam"}))
    assert names.match("aa") is None
    assert names.match("SPAM CALLER") == "re:^spam"
    for pattern in (r"(a)\1", "(?=x)y", "(?<!a)b"):
        with pytest.raises(BadEntry, match=r"RE2 does not support backreferences or lookaround"):
            canonical("names", f"re:{pattern}")
    with pytest.raises(BadEntry) as refused:
        canonical("names", r"re:(a)\1")
    assert str(refused.value) == (
        r"bad regular expression '(a)\\1': RE2 does not support backreferences or lookaround"
        r" (invalid escape sequence: \1)"
    )
    with pytest.raises(BadEntry, match=r"RE2 cannot compile it \(missing \)"):
        canonical("names", "re:(unclosed")


def test_patterns_too_big_for_one_set_are_tried_one_by_one() -> None:
    # Each of these compiles alone, but together they pass RE2's memory budget for a set.
    entries = [f"re:^caller{i:02d}$|x[a-z]{{1000}}" for i in range(30)]
    names = NameList(frozenset(canonical("names", e) for e in entries))
    assert names.pattern_set is None
    assert names.match("Caller07") == "re:^caller07$|x[a-z]{1000}"
    assert names.match("caller99") is None


def test_a_names_list_remembers_answers_without_changing_them() -> None:
    names = NameList(frozenset({"contains:warranty", "re:^v[0-9]{6}$", "robo caller"}))
    calls = ["Car Warranty Dept", "V123456", "Jane Doe", "ROBO CALLER"] * 3
    expected = ["contains:warranty", "re:^v[0-9]{6}$", None, "robo caller"] * 3
    assert [names.match(name) for name in calls] == expected  # second and third: remembered
    assert len(names.memo) == 4
    # A changed list is a new object: nothing remembered carries over.
    changed = NameList(frozenset({"contains:warranty"}))
    assert changed.match("V123456") is None and changed.match("Car Warranty Dept")


def test_the_names_memo_stays_under_its_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lists_module, "MEMO_NAMES", 10)
    names = NameList(frozenset({"contains:warranty"}))
    for i in range(35):
        names.match(f"caller {i}")
        assert len(names.memo) <= 10
    assert names.match("warranty 9") == "contains:warranty"
