"""Write core/numbering_plan.py: libphonenumber's validity data, shaped for core.numbers.

    python -m devtools.phone_metadata           # rewrite core/numbering_plan.py
    python -m devtools.phone_metadata --check   # exit 1 if the file is out of date

Run it after changing the ``phonenumbers`` pin in pyproject.toml (tests/test_numbers.py
fails until then). The output depends only on the installed ``phonenumbers``.

What libphonenumber's ``is_valid_number`` does for ``+<code><national number>``, and how
this file keeps it:

- The regions sharing the calling code are tried in their metadata order. A region with
  ``leading_digits`` is picked when the national number starts with them, and then
  decides alone, valid or not. A region without them is picked only if the number is
  valid there. Unknown code, or no region picked: invalid.
- Valid for a region: the national number matches the region's general pattern, and
  one number type (fixed line, mobile, toll free, premium rate, shared cost, VoIP,
  personal, pager, UAN, voicemail) both allows its length and matches its pattern.

Each region becomes one pattern per national-number length: a lookahead for the general
pattern, then the alternation of the types allowing that length (mobile and fixed line
first: they are what callers mostly have, and an alternation stops at its first match).
The regions of one code chain up in order: a region without leading digits is an
alternative (``valid here | try the next``), one with them is a conditional on them
(``(?>(?=(?P<r1>leading))|)(?(r1)valid here|try the next)``, atomic so that leading
digits, once matched, are final). Python's ``re`` supports all of this.

Where several regions share a code, the chain is cut down for each possible first
digit(s) of the national number, up to three E.164 digits in all (the key
:mod:`core.numbers` looks numbers up by): a region whose leading digits cannot start
that way is dropped, one whose leading digits always do ends the chain. So ``+1 212``
tries US and Canada only, not 23 Caribbean area codes one after the other.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import phonenumbers
from phonenumbers import (
    COUNTRY_CODE_TO_REGION_CODE,
    REGION_CODE_FOR_NON_GEO_ENTITY,
    PhoneMetadata,
    PhoneNumberDesc,
)

OUTPUT = Path(__file__).resolve().parent.parent / "core" / "numbering_plan.py"
#: Every number type ``is_valid_number`` accepts, most common callers first.
NUMBER_TYPES = (
    "mobile",
    "fixed_line",
    "toll_free",
    "premium_rate",
    "shared_cost",
    "voip",
    "personal_number",
    "pager",
    "uan",
    "voicemail",
)
#: E.164 digits (code and national) that pick a dispatch entry; core.numbers uses the same.
KEY_DIGITS = 3
FAIL = "(?!)"

HEADER = '''\
"""libphonenumber's number validity data, in the shape core.numbers uses. Generated.

Do not edit: ``python -m devtools.phone_metadata`` writes this file from the installed
``phonenumbers`` package (its docstring says how the patterns are built). Regenerate it
after changing the ``phonenumbers`` pin; tests/test_numbers.py fails while the two differ.
"""

# ruff: noqa: E501
# fmt: off

'''


@dataclass(frozen=True)
class Region:
    """One region of a calling code, as far as validity goes."""

    leading_digits: str | None
    general: str
    #: National-number length -> patterns of the number types that allow it.
    by_length: dict[int, list[str]]


def _metadata(code: int, region: str) -> PhoneMetadata:
    if region == REGION_CODE_FOR_NON_GEO_ENTITY:
        found = PhoneMetadata.metadata_for_nongeo_region(code)
    else:
        found = PhoneMetadata.metadata_for_region(region)
    if found is None:
        raise SystemExit(f"phonenumbers has no metadata for +{code} {region}")
    return found


def _region(code: int, region: str) -> Region:
    metadata = _metadata(code, region)
    general = metadata.general_desc
    if general is None or not general.national_number_pattern or not general.possible_length:
        raise SystemExit(f"+{code} {region}: no general pattern or lengths")
    by_length: dict[int, list[str]] = {}
    for name in NUMBER_TYPES:
        if name == "mobile" and metadata.same_mobile_and_fixed_line_pattern:
            continue  # is_valid_number does not look at it either (it equals fixed_line)
        desc: PhoneNumberDesc | None = getattr(metadata, name)
        if desc is None or not desc.national_number_pattern:
            continue
        # No lengths of its own: the type takes the general ones (already checked first).
        for length in desc.possible_length or general.possible_length:
            if length > 0:  # -1 marks a type that does not exist in the region
                by_length.setdefault(length, []).append(desc.national_number_pattern)
    return Region(metadata.leading_digits, general.national_number_pattern, by_length)


def _max_width(pattern: str) -> int:
    """Longest string ``pattern`` can match (leading-digit patterns are all bounded)."""
    parser: Any = importlib.import_module("re._parser")
    width = int(parser.parse(pattern).getwidth()[1])
    if width > 8:
        raise SystemExit(f"unbounded leading digits {pattern!r}")
    return width


def leading_status(leading: str, start: str) -> str:
    """Whether national numbers beginning with ``start`` begin with ``leading``.

    ``"always"``, ``"never"`` or ``"depends"`` (on later digits). Leading-digit patterns
    match at most a few digits, so trying every continuation up to that width decides.
    """
    pattern = re.compile(leading)
    rest = max(_max_width(leading) - len(start), 0)
    outcomes = {
        pattern.match(start + "".join(tail)) is not None
        for tail in itertools.product("0123456789", repeat=rest)
    }
    if outcomes == {True}:
        return "always"
    return "never" if outcomes == {False} else "depends"


def _alternation(patterns: list[str]) -> str:
    unique = list(dict.fromkeys(patterns))
    return "|".join(f"(?:{pattern})" for pattern in unique) if unique else FAIL


def _region_pattern(region: Region, length: int) -> str:
    types = region.by_length.get(length)
    if not types:
        return FAIL
    return rf"(?=(?:{region.general})\Z)(?:{_alternation(types)})"


def chain_pattern(chain: list[tuple[str | None, Region]], length: int) -> str:
    """The pattern for national numbers of ``length`` under ``chain`` (see the docstring).

    ``chain`` holds (leading digits still to test, or None, region); a region whose
    leading digits always match ends the chain and comes with None.
    """
    tail = FAIL
    for index in range(len(chain) - 1, -1, -1):
        leading, region = chain[index]
        here = _region_pattern(region, length)
        if leading is None:
            if here != FAIL:
                tail = here if tail == FAIL else f"(?:{here}|{tail})"
        else:
            tail = f"(?>(?=(?P<r{index}>{leading}))|)(?(r{index}){here}|{tail})"
    return tail


def _chain(regions: list[Region], start: str) -> list[tuple[str | None, Region]]:
    chain: list[tuple[str | None, Region]] = []
    for region in regions:
        if region.leading_digits is None:
            chain.append((None, region))
            continue
        status = leading_status(region.leading_digits, start)
        if status == "always":
            chain.append((None, region))
            break
        if status == "depends":
            chain.append((region.leading_digits, region))
    return chain


def build() -> tuple[dict[str, str], dict[str, tuple[str, dict[int, int]]], list[str]]:
    """National prefixes, dispatch entries and patterns, as written to the file."""
    prefixes: dict[str, str] = {}
    plans: dict[str, tuple[str, dict[int, int]]] = {}
    patterns: list[str] = []
    index_of: dict[str, int] = {}
    for code in sorted(COUNTRY_CODE_TO_REGION_CODE, key=str):
        names = COUNTRY_CODE_TO_REGION_CODE[code]
        digits = str(code)
        prefixes[digits] = _metadata(code, names[0]).national_prefix or ""
        regions = [_region(code, name) for name in names]
        if len(regions) == 1:
            starts = [""]
        else:
            free = max(KEY_DIGITS - len(digits), 0)
            starts = ["".join(tail) for tail in itertools.product("0123456789", repeat=free)]
        for start in starts:
            chain = _chain(regions, start)
            lengths = sorted({n for _, region in chain for n in region.by_length})
            table: dict[int, int] = {}
            for length in lengths:
                pattern = chain_pattern(chain, length)
                if pattern == FAIL:
                    continue
                if pattern not in index_of:
                    index_of[pattern] = len(patterns)
                    patterns.append(pattern)
                table[length] = index_of[pattern]
            plans[digits + start] = (digits, table)
    return prefixes, plans, patterns


def render() -> str:
    """The text of core/numbering_plan.py."""
    prefixes, plans, patterns = build()
    lines = [HEADER.rstrip("\n"), ""]
    lines.append(f"PHONENUMBERS_VERSION = {json.dumps(phonenumbers.__version__)}")
    lines += [
        "",
        "#: Country calling code -> national (trunk) prefix of its main region, '' if none.",
        "NATIONAL_PREFIXES: dict[str, str] = {",
    ]
    lines += [f"    {json.dumps(code)}: {json.dumps(prefix)}," for code, prefix in prefixes.items()]
    lines += [
        "}",
        "",
        "#: Leading E.164 digits (a calling code, or a code shared by several regions and the",
        "#: national digits that tell them apart) -> (calling code, {national number length:",
        "#: index in PATTERNS}).",
        "PLANS: dict[str, tuple[str, dict[int, int]]] = {",
    ]
    for key, (code, table) in plans.items():
        inner = ", ".join(f"{length}: {index}" for length, index in table.items())
        lines.append(f"    {json.dumps(key)}: ({json.dumps(code)}, {{{inner}}}),")
    lines += [
        "}",
        "",
        "#: Patterns a national number must fullmatch to be valid.",
        "PATTERNS: tuple[str, ...] = (",
    ]
    lines += [f"    {json.dumps(pattern)}," for pattern in patterns]
    lines += [")", "# fmt: on", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="only say if the file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is out of date: run python -m devtools.phone_metadata")
            return 1
        print(f"{OUTPUT} is up to date (phonenumbers {phonenumbers.__version__})")
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT} ({len(text.encode()):,} bytes, phonenumbers {phonenumbers.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
