"""A list as CSV, streamed: the admin export route, ``loader export`` and snapshots.

:func:`export_csv` yields the list in pieces (numbers a few buckets at a time, sets by
SSCAN, subscribers bucket by bucket, formatting cut into
:class:`core.subscribers.Slices`), so no piece holds the event loop for more than a few
milliseconds. Invariants: the CSV is what ``python -m loader sync`` reads back unchanged
(formats per kind: docs/api.md, export); a numbers list is read at one ``version``; the
last line, ``# end of export: ...``, is written only for a complete export (one that
outlives the old base's grace raises :class:`ExportError` without it).
"""

from __future__ import annotations

import csv
import io
import time
from array import array
from collections.abc import AsyncIterator

from core import bucket_gens, keys, overlay, subscriber_overlay
from core.config import ListKind
from core.entries import EXACT_MARK
from core.store import Deltas, ListStore, RedisClient, unpack_bucket
from core.subscribers import Slices, entry_of, unpack_codes

#: Numbers buckets per HMGET (~2.5 k numbers each at 10 M entries).
NUMBER_BUCKETS_PER_READ = 16
#: Subscriber buckets per pipelined round: fewer round trips for a sparse list, while a
#: round at 10 M subscribers (~40 kB a bucket, ~5 MB) stays a short parse for the loop.
SUBSCRIBER_BUCKETS_PER_READ = 128
#: Admin overlay comment lines of a subscribers list per piece yielded.
NOTES_PER_PIECE = 2000
#: SSCAN page size for prefixes and names.
SCAN_COUNT = 1000
END_MARK = "# end of export: "


class ExportError(Exception):
    """The list changed under a long export in a way it cannot follow."""


def header_of(kind: ListKind) -> str:
    return {
        "numbers": "number\n",
        "prefixes": "prefix\n",
        "names": "",
        "subscribers": "subscriber,entry,side\n",
    }[kind]


async def export_csv(redis: RedisClient, name: str, kind: ListKind) -> AsyncIterator[str]:
    """The list as CSV text, in pieces of up to a few hundred kB (see the module doc)."""
    store = ListStore(redis)
    deltas = await store.deltas(name)
    yield header_of(kind)
    count = 0
    slices = Slices()
    if kind == "numbers":
        pieces = _numbers(redis, name, deltas, slices)
    elif kind == "subscribers":
        pieces = _subscribers(redis, name, deltas.gen, slices)
    else:
        pieces = _set_entries(redis, name, kind, deltas, slices)
    async for text, rows in pieces:
        count += rows
        yield text
    if kind != "subscribers":
        kept = await overlay.read(redis, name)
        notes = [f"# admin overlay: add {e}\n" for e in sorted(kept.adds)]
        notes += [f"# admin overlay: remove {e}\n" for e in sorted(kept.dels)]
        if notes:
            yield "".join(notes)
    yield f"{END_MARK}{count} entries of {name} gen {deltas.gen} version {deltas.version}\n"


async def _numbers(
    redis: RedisClient, name: str, deltas: Deltas, slices: Slices
) -> AsyncIterator[tuple[str, int]]:
    adds: dict[int, set[int]] = {}
    for entry in deltas.adds:
        number = int(entry)
        adds.setdefault(keys.bucket_of(number), set()).add(number)
    dels = {int(entry) for entry in deltas.dels}
    base = keys.base(name, deltas.gen)
    for start in range(0, keys.NUMBER_BUCKETS, NUMBER_BUCKETS_PER_READ):
        ids = list(range(start, min(start + NUMBER_BUCKETS_PER_READ, keys.NUMBER_BUCKETS)))
        if deltas.gen:
            if not await redis.exists(base):
                raise ExportError(f"list {name!r}: base {deltas.gen} was swapped out mid-export")
            blobs = await redis.hmget(base, ids)
        else:
            blobs = [None] * len(ids)
        for bucket, blob in zip(ids, blobs, strict=True):
            numbers: array[int] | set[int] = (
                unpack_bucket(blob) if isinstance(blob, bytes) else array("Q")
            )
            extra = adds.get(bucket)
            if dels or extra:
                numbers = sorted((set(numbers) - dels) | (extra or set()))  # type: ignore[assignment]
            if numbers:
                yield "".join([f"+{n}\n" for n in numbers]), len(numbers)
            await slices.tick()


async def _set_entries(
    redis: RedisClient, name: str, kind: ListKind, deltas: Deltas, slices: Slices
) -> AsyncIterator[tuple[str, int]]:
    """Base members (SSCAN: a page at a time), less ``dels``, then ``adds``.

    SSCAN may repeat a member, so the members written are remembered: memory grows with
    the list, which for prefixes and names lists is small.
    """
    seen: set[str] = set()
    rows: list[str] = []
    if deltas.gen:
        key = keys.base(name, deltas.gen)
        if not await redis.exists(key):
            raise ExportError(f"list {name!r}: base {deltas.gen} is missing")
        async for member in redis.sscan_iter(key, count=SCAN_COUNT):
            entry = member.decode() if isinstance(member, bytes) else str(member)
            if entry in seen or entry in deltas.dels:
                continue
            seen.add(entry)
            rows.append(_set_row(kind, entry))
            if len(rows) >= SCAN_COUNT:
                yield "".join(rows), len(rows)
                rows = []
                await slices.tick()
    rows += [_set_row(kind, entry) for entry in sorted(deltas.adds - seen)]
    if rows:
        yield "".join(rows), len(rows)


def _set_row(kind: ListKind, entry: str) -> str:
    if kind == "names" and entry.startswith("#"):
        entry = EXACT_MARK + entry
    if any(c in entry for c in ',"\n\r') or entry != entry.strip():
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerow([entry])
        return out.getvalue()
    return entry + "\n"


async def _subscribers(
    redis: RedisClient, name: str, gen: int, slices: Slices
) -> AsyncIterator[tuple[str, int]]:
    if not gen:
        return
    marker = keys.SUBSCRIBER_MARKER.encode()
    lost = 0
    notes: list[str] = []
    now_s = time.time()
    gens = await bucket_gens.read(redis, name, gen)
    for first in range(0, keys.SUBSCRIBER_BUCKETS, SUBSCRIBER_BUCKETS_PER_READ):
        last = min(first + SUBSCRIBER_BUCKETS_PER_READ, keys.SUBSCRIBER_BUCKETS)
        async with redis.pipeline(transaction=False) as pipe:
            for bucket in range(first, last):
                pipe.hgetall(gens.key(name, bucket))
                pipe.hgetall(keys.subscriber_overlay(name, bucket))
            replies = await pipe.execute()
        lines: list[str] = []
        for kept in replies[1::2]:
            notes += _overlay_notes(subscriber_overlay.live(kept, now_s))
        for fields in replies[::2]:
            if marker not in fields:
                lost += 1
            for subscriber, blob in sorted(fields.items()):
                if subscriber == marker:
                    continue
                who = subscriber.decode()
                for code in unpack_codes(blob):
                    entry, side = entry_of(code)
                    shown = entry if entry.endswith("*") else "+" + entry
                    lines.append(f"+{who},{shown},{side}\n")
            await slices.tick()
        if lines:
            yield "".join(lines), len(lines)
    for start in range(0, len(notes), NOTES_PER_PIECE):  # in bucket order, sorted in each
        yield "".join(notes[start : start + NOTES_PER_PIECE]), 0
        await slices.tick()
    if lost:
        yield f"# warning: {lost} buckets of gen {gen} were lost from Redis\n", 0


def _overlay_notes(kept: dict[str, dict[str, bool]]) -> list[str]:
    """Comment lines naming a bucket's admin overlay (a sync skips comments, so the
    export reads back as the list it is, overlay included)."""
    notes = []
    for subscriber, codes in sorted(kept.items()):
        for code, add in sorted(codes.items()):
            entry, side = entry_of(code)
            shown = entry if entry.endswith("*") else "+" + entry
            change = "add" if add else "remove"
            notes.append(f"# admin overlay: {change} +{subscriber},{shown},{side}\n")
    return notes
