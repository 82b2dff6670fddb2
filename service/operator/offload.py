"""A bulk change's heavy work in a helper process, away from the calls' event loop.

Two bulk changes go through it: a list's entries (:func:`prepare`) and a subscribers
list's pairs (:func:`prepare_subscribers`); each keeps the refusals, statuses and
messages the admin API documents (docs/api.md).

A 100 k-entry body is about 2 MB of JSON. Parsing it (orjson), checking and
canonicalising every entry, and de-duplicating take tens of milliseconds of CPU in C
and Python code that holds the GIL the whole time: on the event loop, every call the
process answers meanwhile waits that long; in a thread, the same, since the thread
never lets go of the GIL inside one C call. So :func:`prepare` runs in a process of its
own (one per service process with the admin API on, started in the background as the
process starts, in a thread since starting it blocks its caller for tens of ms), and hands
back what is cheap to receive: the entries joined into strings of
:data:`CHUNK_ENTRIES` each, which the caller splits one chunk per event-loop turn.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from core.config import ListKind
from core.entries import BadEntry, canonical, new_entry
from core.subscribers import (
    BadSubscriberEntry,
    Side,
    canonical_entry,
    canonical_subscriber,
    code_of,
)
from service.operator import models as api

logger = logging.getLogger(__name__)
Model = TypeVar("Model", bound=BaseModel)

#: Entries per chunk handed back: splitting one takes well under a millisecond.
CHUNK_ENTRIES = 2000
#: The first bad entries reported (the count covers them all).
BAD_SHOWN = 100


@dataclass
class Refusal:
    """A bulk change refused: the HTTP status, the message, extra fields of the answer."""

    status: int
    message: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prepared:
    """A bulk change ready to write: canonical, de-duplicated, in the body's order."""

    add: list[str]
    remove: list[str]
    added: int
    removed: int
    #: The admin overlay's expiry asked for (lists with a source only).
    ttl_s: float | None = None


def _chunks(entries: list[str]) -> list[str]:
    return [
        "\n".join(entries[start : start + CHUNK_ENTRIES])
        for start in range(0, len(entries), CHUNK_ENTRIES)
    ]


def _canonical_all(
    kind: ListKind,
    items: list[Any],
    country: str,
    name: str,
    bad: list[dict[str, Any]],
    strict: bool,
) -> list[str]:
    """``strict``: numbers no numbering plan can dial are bad too (core.entries.new_entry)."""
    check = new_entry if strict else canonical
    entries = []
    for index, item in enumerate(items):
        if not isinstance(item, str):
            bad.append({"field": name, "index": index, "error": "not a string"})
            continue
        try:
            entries.append(check(kind, item, country))
        except BadEntry as exc:
            bad.append({"field": name, "index": index, "entry": item[:200], "error": str(exc)})
    return entries


def _refusal_of(errors: list[Any], items: str = "strings") -> Refusal:
    """The ``400`` for a body its model refused, in one plain sentence; ``items`` names
    what the ``add``/``remove`` arrays hold."""
    first = errors[0]
    if first["type"] == "nothing_to_change":
        return Refusal(400, first["msg"])
    if all(error["type"] == "list_type" for error in errors):
        return Refusal(400, f'"{first["loc"][0]}" must be an array of {items}')
    return Refusal(400, 'the body must be an object with "add" and/or "remove" arrays')


def _parsed(body: bytes, model: type[Model], items: str) -> Model | Refusal:
    """The body as ``model``, or the ``400`` that refuses it (``items``: see _refusal_of)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return Refusal(400, f"request body is not valid JSON: {exc}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        return _refusal_of(exc.errors(include_url=False), items)


def prepare(
    body: bytes, kind: ListKind, country: str, limit: int, strict_add: bool = False
) -> Refusal | Prepared:
    """Check and canonicalise a bulk change (runs in the helper process).

    ``strict_add``: the list does not ``allow_short_codes``, so added numbers must be
    dialable.
    """
    change = _parsed(body, api.BulkChange, "strings")
    if isinstance(change, Refusal):
        return change
    total = len(change.add) + len(change.remove)
    if total > limit:  # before any work on the entries: a huge body costs nothing more
        return Refusal(413, f"{total} entries in one request; at most {limit}")
    bad: list[dict[str, Any]] = []
    adds = _canonical_all(kind, change.add, country, "add", bad, strict_add)
    removes = _canonical_all(kind, change.remove, country, "remove", bad, False)
    if bad:
        message = f"{len(bad)} bad entries; nothing was changed"
        return Refusal(400, message, {"bad_entries": bad[:BAD_SHOWN]})
    both = sorted(set(adds) & set(removes))
    if both:
        message = "entries both added and removed; nothing was changed"
        return Refusal(400, message, {"entries": both})
    adds, removes = list(dict.fromkeys(adds)), list(dict.fromkeys(removes))
    return Prepared(_chunks(adds), _chunks(removes), len(adds), len(removes), change.ttl_s)


@dataclass
class PreparedSubscribers:
    """A subscribers bulk change ready to write: ``subscriber code 1|0`` lines (1: add),
    a subscriber's codes each once, joined :data:`CHUNK_ENTRIES` lines a string."""

    lines: list[str]
    added: int
    removed: int
    #: The admin overlay's expiry asked for (lists with a source only).
    ttl_s: float | None = None


def prepare_subscribers(body: bytes, country: str, limit: int) -> Refusal | PreparedSubscribers:
    """Check and canonicalise a subscribers bulk change (runs in the helper process).

    The guards in order: JSON, shape, item count (before any item is looked at), every
    item (all bad ones reported by field and index), then pairs both added and removed
    on the same side.
    """
    change = _parsed(body, api.SubscriberBulkChange, "objects")
    if isinstance(change, Refusal):
        return change
    total = len(change.add) + len(change.remove)
    if total > limit:
        return Refusal(413, f"{total} items in one request; at most {limit}")
    bad: list[dict[str, Any]] = []
    pairs = _pairs(api.SubscriberAdd, change.add, "add", country, bad)
    pairs += _pairs(api.SubscriberRemove, change.remove, "remove", country, bad)
    if bad:
        return Refusal(
            400, f"{len(bad)} bad items; nothing was changed", {"bad_entries": bad[:BAD_SHOWN]}
        )
    changes: dict[tuple[str, str], bool] = {}
    twice: set[str] = set()
    for subscriber, entry, side, add in pairs:
        key = (subscriber, code_of(entry, side))
        if changes.get(key, add) != add:
            twice.add(f"{subscriber}:{entry} ({side})")
        changes[key] = add
    if twice:
        message = "pairs both added and removed on the same side; nothing was changed"
        return Refusal(400, message, {"entries": sorted(twice)[:BAD_SHOWN]})
    added = sum(changes.values())
    lines = [f"{s} {code} {int(add)}" for (s, code), add in changes.items()]
    return PreparedSubscribers(_chunks(lines), added, len(changes) - added, change.ttl_s)


def _pairs(
    model: type[api.SubscriberAdd | api.SubscriberRemove],
    items: list[Any],
    field: str,
    country: str,
    bad: list[dict[str, Any]],
) -> list[tuple[str, str, Side, bool]]:
    """``(subscriber, entry, side, add?)`` of each item; bad ones go to ``bad``."""
    found: list[tuple[str, str, Side, bool]] = []
    adding = model is api.SubscriberAdd
    for index, item in enumerate(items):
        try:
            parsed = model.model_validate(item)
            subscriber = canonical_subscriber(parsed.subscriber, country)
            entry = canonical_entry(parsed.entry, country)
        except ValidationError as exc:
            bad.append(_item_report(field, index, item, _first_error(item, exc)))
        except BadSubscriberEntry as exc:
            bad.append(_item_report(field, index, item, str(exc)))
        else:
            found.append((subscriber, entry, parsed.side, adding))
    return found


def _first_error(item: Any, exc: ValidationError) -> str:
    if not isinstance(item, dict):
        return "not an object"
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]


def _item_report(field: str, index: int, item: Any, error: str) -> dict[str, Any]:
    report: dict[str, Any] = {"field": field, "index": index, "error": error}
    if isinstance(item, dict):
        for key in ("subscriber", "entry"):
            if isinstance(item.get(key), str):
                report[key] = item[key][:200]
    return report


async def subscriber_changes(chunks: list[str]) -> dict[str, dict[str, bool]]:
    """The changes of :attr:`PreparedSubscribers.lines` as
    :data:`core.subscribers.Changes`, a chunk per loop turn."""
    changes: dict[str, dict[str, bool]] = {}
    for chunk in chunks:
        for line in chunk.split("\n"):
            subscriber, code, add = line.split(" ")
            changes.setdefault(subscriber, {})[code] = add == "1"
        await asyncio.sleep(0)
    return changes


async def entries(chunks: list[str]) -> list[str]:
    """The entries of :attr:`Prepared.add` or ``remove``, split a chunk per loop turn."""
    found: list[str] = []
    for chunk in chunks:
        found += chunk.split("\n")
        await asyncio.sleep(0)
    return found


def _ready() -> bool:
    return True


class Offloader:
    """The helper process of one serving process (see the module docstring)."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        #: Start the helper when the app starts (a service process), not at the first
        #: bulk change (in-process test apps, which mostly never make one).
        self.start_early = False

    def _started(self) -> ProcessPoolExecutor:
        """The pool, with its process started (blocks: call it in a thread)."""
        with self._lock:
            if self._pool is None:
                # spawn: a fresh interpreter; forking a process with an event loop and
                # threads copies their state half-way.
                context = multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(1, mp_context=context)
                self._pool.submit(_ready).result()  # the process starts on a first task
            return self._pool

    async def start(self) -> None:
        """Start the helper process, off the event loop."""
        await asyncio.to_thread(self._started)

    async def prepare(
        self, body: bytes, kind: ListKind, country: str, limit: int, *, strict_add: bool = False
    ) -> Refusal | Prepared:
        """:func:`prepare` in the helper process."""
        prepared: Refusal | Prepared = await self._run(
            prepare, body, kind, country, limit, strict_add
        )
        return prepared

    async def prepare_subscribers(
        self, body: bytes, country: str, limit: int
    ) -> Refusal | PreparedSubscribers:
        """:func:`prepare_subscribers` in the helper process."""
        prepared: Refusal | PreparedSubscribers = await self._run(
            prepare_subscribers, body, country, limit
        )
        return prepared

    async def _run(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` in the helper process; a helper that died is replaced once."""
        for attempt in range(2):
            pool = self._pool if self._pool is not None else await asyncio.to_thread(self._started)
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(pool, function, *args)
            except BrokenProcessPool:
                logger.warning("the bulk-change helper process died; starting another")
                self._close_now()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _close_now(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    async def close(self) -> None:
        """Stop the helper process (at the app's cleanup)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown)


OFFLOAD = web.AppKey("offload", Offloader)
