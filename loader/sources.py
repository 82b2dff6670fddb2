"""Reading list sources: CSV or plain-text files, one entry per row.

Plain text (any extension but ``.csv``/``.csv.gz``): one entry a line; blank lines and
lines starting with ``#`` are skipped. CSV: the entry is in ``column`` (a 0-based index,
or a header name, which makes the first row a header). With an index, a first row whose
entry cell has letters but no digits is taken as a header too.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO


class SourceError(Exception):
    """A source that cannot be read at all (missing file, unknown column, ...)."""


@dataclass(frozen=True, slots=True)
class Row:
    line: int
    value: str
    labels: tuple[str, ...] = ()


def _looks_like_header(cell: str) -> bool:
    return any(c.isalpha() for c in cell) and not any(c.isdigit() for c in cell)


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return path.open(encoding="utf-8", errors="replace", newline="")


def _is_csv(path: Path) -> bool:
    suffixes = path.suffixes
    return bool(suffixes) and (suffixes[-1] == ".csv" or suffixes[-2:] == [".csv", ".gz"])


def read_rows(
    path: str | Path,
    column: int | str = 0,
    label_columns: tuple[int | str, ...] = (),
    *,
    detect_header: bool = True,
) -> Iterator[Row]:
    """Yield the rows of a local source; blank and comment lines are skipped.

    ``detect_header=False`` (names lists, whose entries are words) only treats the first
    row as a header when ``column`` is a name.
    """
    path = Path(path)
    try:
        handle = _open_text(path)
    except OSError as exc:
        raise SourceError(f"cannot open {path}: {exc.strerror}") from None
    with handle:
        if _is_csv(path):
            yield from _csv_rows(handle, column, label_columns, str(path), detect_header)
        else:
            for number, line in enumerate(handle, start=1):
                value = line.strip()
                if value and not value.startswith("#"):
                    yield Row(number, value)


def _index(header: list[str], column: int | str, where: str) -> int:
    if isinstance(column, int):
        return column
    names = [h.strip().lower() for h in header]
    try:
        return names.index(column.lower())
    except ValueError:
        raise SourceError(f"{where}: no column named {column!r} in header {header}") from None


def _csv_rows(
    handle: IO[str],
    column: int | str,
    label_columns: tuple[int | str, ...],
    where: str,
    detect_header: bool,
) -> Iterator[Row]:
    reader = csv.reader(handle)
    index: int | None = None if isinstance(column, str) else column
    labels: list[int] = [c for c in label_columns if isinstance(c, int)]
    for cells in reader:
        line = reader.line_num
        if not cells or (len(cells) == 1 and not cells[0].strip()):
            continue
        if cells[0].lstrip().startswith("#"):
            continue
        if index is None or (line == 1 and detect_header):
            is_header = index is None or (index < len(cells) and _looks_like_header(cells[index]))
            if is_header:
                index = _index(cells, column, where)
                labels = [_index(cells, c, where) for c in label_columns]
                continue
        assert index is not None
        value = cells[index].strip() if index < len(cells) else ""
        yield Row(line, value, tuple(cells[i].strip() for i in labels if i < len(cells)))
