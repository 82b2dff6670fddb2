"""The in-memory list copies every decision reads: right answers at any size."""

from __future__ import annotations

import random
from array import array

import numpy as np

from core import keys
from core.entries import canonical
from core.store import unpack_bucket
from service.lists import NameList, NumberList, PrefixList


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
