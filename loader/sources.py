"""Reading list sources: CSV or plain text, plain or gzip-compressed, one entry per row.

Rows stream from a binary file (local, or what :mod:`loader.fetch` downloaded); the
file is never held in memory. gzip is recognised by its magic bytes. ``format: auto``
picks CSV from the name, content type or column settings. Plain text skips blank and
``#`` lines; CSV takes ``column`` (index or header name), skips a detected header and
a BOM, and exposes ``label_columns`` as :attr:`Rows.labels`. Details: docs/loader.md.
CSV parsing is strict: a quote that never closes, text after a closing quote, or an
entry cell spanning lines (a stray quote swallowing the rows after it) is a
:class:`SourceError` naming ``file:line`` where the bad row starts.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

Format = Literal["csv", "text"]
_GZIP_MAGIC = b"\x1f\x8b"
#: Rows read per chunk.
CHUNK_ROWS = 8192


class SourceError(Exception):
    """A source that cannot be read at all (missing file, unknown column, ...)."""


def choose_format(
    configured: str,
    name: str,
    column: int | str = 0,
    label_columns: tuple[int | str, ...] = (),
    content_type: str = "",
) -> Format:
    """The format of a source: ``configured`` unless it is ``auto`` (see module doc)."""
    if configured in ("csv", "text"):
        return "csv" if configured == "csv" else "text"
    lowered = name.lower().split("?", 1)[0]
    if lowered.endswith((".csv", ".csv.gz")) or content_type.lower().startswith("text/csv"):
        return "csv"
    if column != 0 or label_columns:
        return "csv"
    return "text"


def open_local(path: str | Path) -> IO[bytes]:
    """Open a local source file for :class:`Rows`; raise SourceError if it cannot be."""
    try:
        return open(path, "rb")
    except OSError as exc:
        raise SourceError(f"cannot open {path}: {exc.strerror}") from None


def _looks_like_header(cell: str) -> bool:
    return any(c.isalpha() for c in cell) and not any(c.isdigit() for c in cell)


def _index(header: list[str], column: int | str, where: str) -> int:
    if isinstance(column, int):
        return column
    names = [h.strip().lower() for h in header]
    try:
        return names.index(column.lower())
    except ValueError:
        raise SourceError(f"{where}: no column named {column!r} in header {header}") from None


class Rows:
    """The rows of one source, read once, in chunks (a per-row generator costs too much).

    :meth:`chunks` yields lists holding each row's entry cell (not stripped for CSV: the
    normaliser handles separators), ``None`` for a blank or comment row. While a chunk is
    current, :meth:`line_of` and :meth:`labels_of` tell about its rows;
    :meth:`position` says how far into the (compressed) file reading has got.
    """

    def __init__(
        self,
        raw: IO[bytes],
        fmt: Format,
        *,
        column: int | str = 0,
        label_columns: tuple[int | str, ...] = (),
        where: str = "source",
        detect_header: bool = True,
        delimiter: str = ",",
    ) -> None:
        if fmt == "text" and (column != 0 or label_columns):
            raise SourceError(f"{where}: a plain-text source has one column; use format csv")
        self.raw = raw
        self.fmt = fmt
        self.column = column
        self.label_columns = label_columns
        self.where = where
        self.detect_header = detect_header
        self.delimiter = delimiter
        self.header: list[str] | None = None
        self._reader: Any = None  # the csv reader, once reading a CSV
        self._label_index: list[int] = []
        # The current chunk: lines read before it, its CSV rows, one line per row?
        self._before = 0
        self._cells: list[list[str]] = []
        self._one_line_each = True
        try:
            raw.seek(0, io.SEEK_END)
            self.total_bytes = raw.tell()
            raw.seek(0)
            compressed = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
        except OSError as exc:
            raise SourceError(f"{where}: cannot read: {exc.strerror}") from None
        binary: IO[bytes] = raw
        if compressed:
            binary = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
        self._handle = io.TextIOWrapper(
            binary, encoding="utf-8-sig", errors="replace", newline="" if fmt == "csv" else None
        )

    def line_of(self, i: int) -> int:
        """The line (1-based) on which row ``i`` of the current chunk starts."""
        if self._one_line_each:
            return self._before + 1 + i
        # A quoted CSV cell spanned lines somewhere in this chunk: count them.
        return (
            self._before + 1 + sum(1 + sum(c.count("\n") for c in row) for row in self._cells[:i])
        )

    def labels_of(self, i: int) -> tuple[str, ...]:
        """The label cells of row ``i`` of the current chunk (CSV with label columns)."""
        cells = self._cells[i]
        width = len(cells)
        return tuple(cells[j].strip() if j < width else "" for j in self._label_index)

    def position(self) -> int:
        """Bytes of the source file consumed so far (compressed bytes for gzip)."""
        try:
            return self.raw.tell()
        except (OSError, ValueError):
            return 0

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> Rows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def chunks(self) -> Iterator[list[str | None]]:
        """The entry cells, up to ``CHUNK_ROWS`` rows at a time (see the class doc)."""
        try:
            if self.fmt == "text":
                yield from self._text_chunks()
            else:
                yield from self._csv_chunks()
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise SourceError(
                f"{self.where}: read failed near line {self._line()}: {exc}"
            ) from None
        except csv.Error as exc:
            raise SourceError(f"{self.where}: bad CSV at line {self._line()}: {exc}") from None

    def __iter__(self) -> Iterator[tuple[int, str]]:
        """``(line, entry cell)`` of every row but blank and comment ones."""
        for chunk in self.chunks():
            for i, value in enumerate(chunk):
                if value is not None:
                    yield self.line_of(i), value

    def _line(self) -> int:
        return int(self._reader.line_num) if self._reader is not None else self._before

    def _text_chunks(self) -> Iterator[list[str | None]]:
        handle = self._handle
        while lines := list(itertools.islice(handle, CHUNK_ROWS)):
            yield [v if (v := text.strip()) and v[0] != "#" else None for text in lines]
            self._before += len(lines)

    def _csv_chunks(self) -> Iterator[list[str | None]]:
        # strict: a quote that never closes is an error at the end of the file, not one
        # cell swallowing every row after it.
        reader = csv.reader(self._handle, delimiter=self.delimiter, strict=True)
        self._reader = reader
        found = self._csv_header(reader)
        if found is None:
            return
        index, before, first = found
        if first is not None:
            self._chunk(before, [first], reader.line_num - before == 1)
            self._check_entries([first], index)
            yield [first[index] if index < len(first) else ""]
        while True:
            before = reader.line_num
            rows: list[list[str]] = []
            try:
                # extend keeps the rows read before an error: they tell its first line
                rows.extend(itertools.islice(reader, CHUNK_ROWS))
            except csv.Error as exc:
                self._chunk(before, rows, False)
                raise SourceError(self._csv_error(self.line_of(len(rows)), exc)) from None
            if not rows:
                return
            self._chunk(before, rows, reader.line_num - before == len(rows))
            if not self._one_line_each:
                self._check_entries(rows, index)
            yield [
                (c[index] if len(c) > index else "") if c and c[0][:1] != "#" else None
                for c in rows
            ]

    def _csv_error(self, line: int, exc: csv.Error) -> str:
        """The message of a CSV syntax error in the row that starts on ``line``."""
        detail = str(exc)
        if "unexpected end of data" in detail:
            return (
                f"{self.where}:{line}: unterminated quote: the quoted cell opened on line "
                f"{line} never closes (the file ends at line {self._reader.line_num}); "
                "nothing after it can be read"
            )
        return f"{self.where}:{line}: bad CSV: {detail}"

    def _check_entries(self, rows: list[list[str]], index: int) -> None:
        """Refuse an entry cell spanning lines: a stray quote that swallowed rows."""
        for i, cells in enumerate(rows):
            if index < len(cells) and "\n" in cells[index]:
                spans = cells[index].count("\n") + 1
                raise SourceError(
                    f"{self.where}:{self.line_of(i)}: the entry cell is a quoted text over "
                    f"{spans} lines (a stray quote?); the rows inside it would be lost"
                )

    def _chunk(self, before: int, rows: list[list[str]], one_line_each: bool) -> None:
        self._before = before
        self._cells = rows
        self._one_line_each = one_line_each

    def _csv_header(self, reader: Iterator[list[str]]) -> tuple[int, int, list[str] | None] | None:
        """Entry column, and the first row (with the lines before it) unless a header."""
        while True:
            before = self._reader.line_num
            try:
                cells = next(reader, None)
            except csv.Error as exc:
                raise SourceError(self._csv_error(before + 1, exc)) from None
            if cells is None:
                return None
            if cells and cells[0][:1] != "#":
                break
        column = self.column
        is_header = isinstance(column, str) or (
            self.detect_header and column < len(cells) and _looks_like_header(cells[column])
        )
        if is_header:
            self.header = cells
            self._label_index = [_index(cells, c, self.where) for c in self.label_columns]
            return _index(cells, column, self.where), before, None
        names = [c for c in self.label_columns if isinstance(c, str)]
        if names:
            raise SourceError(f"{self.where}: label columns {names} need a header row")
        assert isinstance(column, int)
        self._label_index = [c for c in self.label_columns if isinstance(c, int)]
        return column, before, cells
