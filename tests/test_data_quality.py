"""Data quality: bad CSV syntax reported with file:line, the rejected-rows guard, and
numbers no numbering plan can dial refused by the loader and the admin API."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from core.config import Config
from core.entries import BadEntry, new_entry
from core.numbers import undialable_reason
from core.store import ListStore
from loader.sources import Rows, SourceError
from loader.sync import SyncError, SyncOptions, SyncRefused, sync_list

QUIET = SyncOptions(progress="off")
TOKEN = "tok-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Client = TestClient[Any, Any]


def config_for(make_config: Callable[..., Config], folder: Path, **spec: Any) -> Config:
    lists = {"blocklist": {"kind": "numbers", "source": "blocklist.csv", **spec}}
    return make_config({"lists": lists}, base_dir=folder)


async def entries(redis: Redis, name: str = "blocklist") -> set[str]:
    store = ListStore(redis)
    state = (await store.states([name]))[name]
    return {str(n) for bucket in await store.number_base(name, state.gen) for n in bucket}


# --- the CSV reader ---------------------------------------------------------------------
def read(data: bytes, **options: Any) -> list[tuple[int, str]]:
    with Rows(io.BytesIO(data), "csv", where="f.csv", **options) as rows:
        return list(rows)


def test_an_unterminated_quote_is_reported_where_it_opens() -> None:
    data = b'number\n5162065613\n"5162065614\n5162065615\n5162065616\n'
    with pytest.raises(SourceError, match=r"^f\.csv:3: unterminated quote"):
        read(data)
    # in a label cell, after a first chunk of good rows
    data = b"number,note\n" + b"5162065613,x\n" * 9000 + b'5162065614,"oops\n5162065615,y\n'
    with pytest.raises(SourceError, match=r"^f\.csv:9002: unterminated quote"):
        read(data)


def test_a_quoted_entry_over_several_lines_and_text_after_a_quote_are_refused() -> None:
    data = b'number,note\n5162065613,a\n"5162065614\n5162065615",b\n5162065616,c\n'
    with pytest.raises(SourceError, match=r"^f\.csv:3: the entry cell .* over 2 lines"):
        read(data)
    with pytest.raises(SourceError, match=r"^f\.csv:2: bad CSV"):
        read(b'number\n"516"x,y\n')
    # a label over two lines is fine and keeps the line numbers right
    assert read(b'number,note\n5162065613,"a\nb"\n5162065614,c\n') == [
        (2, "5162065613"),
        (4, "5162065614"),
    ]


# No "\r": Python's csv.writer leaves a lone "\r" unquoted when the line ends "\n".
_CELL = st.text(alphabet='0123456789+ ,"\n#ab', max_size=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(_CELL, min_size=1, max_size=3), max_size=30))
def test_well_quoted_csv_reads_back_every_row_on_its_line(table: list[list[str]]) -> None:
    """Whatever the cells hold, rows written by a CSV writer come back in order and on
    the line they start on, or (an entry over several lines) the file is refused."""
    out = io.StringIO(newline="")
    csv.writer(out, lineterminator="\n").writerows(table)
    data = out.getvalue()
    expected: list[tuple[int, str]] = []
    line = 1
    for cells in table:
        text = io.StringIO(newline="")
        csv.writer(text, lineterminator="\n").writerow(cells)
        written = text.getvalue()
        first = cells[0]
        skipped = first[:1] == "#"  # a lone empty cell is written as ""
        if not skipped:
            expected.append((line, first))
        line += written.count("\n")
    spans = any("\n" in c[0] for c in table)
    try:
        got = read(data.encode(), detect_header=False)
    except SourceError:
        assert spans, "refused a file without an entry over several lines"
        return
    assert got == expected


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.from_regex(r"[0-9]{10}", fullmatch=True), min_size=1, max_size=40),
    st.lists(st.tuples(st.integers(0, 39), st.integers(0, 10)), max_size=3),
)
def test_a_stray_quote_never_swallows_rows_silently(
    numbers: list[str], quotes: list[tuple[int, int]]
) -> None:
    """Quotes dropped into a plain list: either refused, or every untouched row is read."""
    lines = list(numbers)
    touched = set()
    for row, at in quotes:
        if row < len(lines):
            lines[row] = lines[row][:at] + '"' + lines[row][at:]
            touched.add(row)
    data = ("\n".join(lines) + "\n").encode()
    try:
        got = dict(read(data, detect_header=False))
    except SourceError as exc:
        assert str(exc).startswith("f.csv:")
        return
    for row, number in enumerate(lines):
        if row not in touched:
            assert got.get(row + 1) == number


# --- numbers no plan can dial -----------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "why"),
    [("911", "3 digits: too short"), ("1", "1 digit: too short"), ("+44", "2 digits")],
)
def test_short_codes_are_refused_with_the_reason_unless_the_list_allows_them(
    raw: str, why: str
) -> None:
    with pytest.raises(BadEntry, match=rf"not a dialable number: '{re.escape(raw)}'.*{why}"):
        new_entry("numbers", raw)
    assert new_entry("numbers", raw, allow_short_codes=True) == raw.lstrip("+")
    assert new_entry("prefixes", raw) == raw.lstrip("+")  # prefixes are short on purpose


def test_right_shaped_numbers_pass_even_unassigned_ones() -> None:
    assert undialable_reason("15165550101") is None  # fictional 555-01xx: a spoofer's
    assert undialable_reason("442079460018") is None
    assert undialable_reason("3361234567890") == (
        "13 digits, but numbers under +33 have 11 digits with the code"
    )
    assert "no country" in (undialable_reason("99912345678") or "")


async def test_loader_rejects_short_codes_with_file_line_and_the_guard_refuses(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    good = [f"51620656{i:02d}" for i in range(20)]
    (tmp_path / "blocklist.csv").write_text("\n".join([*good, "911", "+44"]) + "\n")
    config = config_for(make_config, tmp_path)
    with pytest.raises(SyncRefused, match=r"2 of 22 rows .* rejected \(9%, more than "):
        await sync_list(redis, config, "blocklist", QUIET)
    assert await ListStore(redis).meta("blocklist") is None  # nothing written
    forced = await sync_list(redis, config, "blocklist", SyncOptions(force=True, progress="off"))
    assert forced.outcome == "success"
    assert forced.bad_rows == [
        f"{tmp_path}/blocklist.csv:21: not a dialable number: '911' (3 digits: too short "
        "for a dialable number (at least 8 digits with the country code))",
        f"{tmp_path}/blocklist.csv:22: not a dialable number: '+44' (2 digits: too short "
        "for a dialable number (at least 8 digits with the country code))",
    ]
    assert await entries(redis) == {"1" + n for n in good}
    allowing = config_for(make_config, tmp_path, allow_short_codes=True)
    report = await sync_list(redis, allowing, "blocklist", QUIET)
    assert (report.outcome, report.rows_rejected) == ("success", 0)
    assert {"911", "44"} <= await entries(redis)


async def test_a_sync_rejecting_most_rows_is_refused_and_the_old_list_kept(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    source = tmp_path / "blocklist.csv"
    source.write_text("5162065613\n5162065614\n5162065615\n")
    config = config_for(make_config, tmp_path)
    assert (await sync_list(redis, config, "blocklist", QUIET)).outcome == "success"
    source.write_text("5162065613\nspam\nnot-a-number\n")  # 67 % rejected
    with pytest.raises(SyncRefused, match=r"2 of 3 rows .* \(67%, more than max_rejected_share"):
        await sync_list(redis, config, "blocklist", QUIET)
    assert await entries(redis) == {"15162065613", "15162065614", "15162065615"}
    lenient = config_for(make_config, tmp_path, max_rejected_share=0.7, max_removal_share=1)
    assert (await sync_list(redis, lenient, "blocklist", QUIET)).outcome == "success"
    assert await entries(redis) == {"15162065613"}


async def test_a_sync_of_a_csv_with_an_unterminated_quote_fails_and_keeps_the_list(
    redis: Redis, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    source = tmp_path / "blocklist.csv"
    source.write_text("5162065613\n5162065614\n")
    config = config_for(make_config, tmp_path)
    await sync_list(redis, config, "blocklist", QUIET)
    source.write_text('5162065613\n"5162065699\n5162065614\n5162065615\n')
    with pytest.raises(SyncError, match=rf"{source}:2: unterminated quote"):
        await sync_list(redis, config, "blocklist", SyncOptions(force=True, progress="off"))
    assert await entries(redis) == {"15162065613", "15162065614"}


async def test_admin_api_refuses_short_codes_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
) -> None:
    monkeypatch.setenv("CALLSCREEN_ADMIN_TOKENS", TOKEN)
    lists = {"blocklist": {"kind": "numbers"}, "short": {"allow_short_codes": True}}
    client: Client = await make_client(make_config({"lists": lists}), redis_client=redis)
    for raw in ("911", "1", "+44"):
        response = await client.put(f"/v1/lists/blocklist/entries/{raw}", headers=AUTH)
        assert response.status == 400
        assert "not a dialable number" in (await response.json())["error"]
    bulk = await client.post(
        "/v1/lists/blocklist/entries", headers=AUTH, json={"add": ["5162065613", "911"]}
    )
    assert bulk.status == 400
    bad = (await bulk.json())["bad_entries"]
    assert [(b["index"], "too short" in b["error"]) for b in bad] == [(1, True)]
    assert not await ListStore(redis).contains("blocklist", "numbers", "15162065613")
    ok = await client.put("/v1/lists/short/entries/911", headers=AUTH)
    assert (ok.status, (await ok.json())["entry"]) == (200, "911")
    # removing one that got in before (or on an opted-in list) is always allowed
    gone = await client.delete("/v1/lists/blocklist/entries/911", headers=AUTH)
    assert gone.status == 200
