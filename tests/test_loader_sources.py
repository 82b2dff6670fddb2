"""Reading list sources: CSV and text, headers, labels, comments, gzip, line numbers."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import pytest

from loader.sources import Rows, SourceError, choose_format, open_local


def read(data: bytes, fmt: str = "csv", **options: object) -> list[tuple[int, str]]:
    with Rows(io.BytesIO(data), fmt, **options) as rows:  # type: ignore[arg-type]
        return list(rows)


def test_csv_column_by_header_name_with_labels() -> None:
    data = b"id,number,reason\n1,5162065613,robocall\n2,+1 (516) 206-5614,spam\n"
    with Rows(io.BytesIO(data), "csv", column="Number", label_columns=("reason",)) as rows:
        seen = []
        for chunk in rows.chunks():
            seen += [(rows.line_of(i), v, rows.labels_of(i)) for i, v in enumerate(chunk)]
        assert rows.header == ["id", "number", "reason"]
    assert seen == [
        (2, "5162065613", ("robocall",)),
        (3, "+1 (516) 206-5614", ("spam",)),
    ]


def test_csv_header_is_detected_for_an_index_column_and_data_is_not() -> None:
    assert read(b"number\n5162065613\n") == [(2, "5162065613")]
    assert read(b"5162065613\n5162065614\n") == [(1, "5162065613"), (2, "5162065614")]
    # names lists keep a first row of words: it is an entry, not a header
    assert read(b"Spam Caller\n", detect_header=False) == [(1, "Spam Caller")]


def test_comments_blank_lines_and_multiline_cells_keep_line_numbers_right() -> None:
    data = b'# exported 2024-05-01\n\nnumber,note\n5162065613,"two\nlines"\nbad,x\n# end\n'
    assert read(data, column="number") == [(4, "5162065613"), (6, "bad")]
    text = b"# header comment\n\n 5162065613 \n#x\n+44 20 7946 0958\n"
    assert read(text, "text") == [(3, "5162065613"), (5, "+44 20 7946 0958")]


def test_short_rows_give_an_empty_entry_to_reject() -> None:
    assert read(b"name,number\nalice\n", column=1) == [(2, "")]


def test_gzip_is_recognised_by_its_magic_bytes_and_a_bom_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"  # no .gz in the name
    path.write_bytes(gzip.compress("\ufeff5162065613\n5162065614\n".encode()))
    with open_local(path) as raw, Rows(raw, "text") as rows:
        assert list(rows) == [(1, "5162065613"), (2, "5162065614")]
        assert rows.position() == path.stat().st_size


def test_unknown_column_or_unreadable_file_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no column named 'phone'"):
        read(b"number\n5162065613\n", column="phone")
    with pytest.raises(SourceError, match=r"label columns \['reason'\] need a header"):
        read(b"5162065613,x\n", label_columns=("reason",))
    with pytest.raises(SourceError, match="cannot open"):
        open_local(tmp_path / "missing.csv")
    with pytest.raises(SourceError, match="one column"):
        Rows(io.BytesIO(b""), "text", column=2)


def test_format_follows_the_name_the_content_type_and_the_columns() -> None:
    assert choose_format("auto", "lists/a.csv") == "csv"
    assert choose_format("auto", "https://x.example/a.csv.gz?token=1") == "csv"
    assert choose_format("auto", "https://x.example/export", content_type="text/csv") == "csv"
    assert choose_format("auto", "lists/a.txt") == "text"
    assert choose_format("auto", "lists/a.txt", column="number") == "csv"
    assert choose_format("auto", "lists/a", label_columns=(1,)) == "csv"
    assert choose_format("text", "lists/a.csv") == "text"
