"""The audit trail: who changed what, when, from where (docs/audit.md).

Every admin change, sync, accept and reload becomes one :class:`AuditRecord`, written
twice: a line on the ``callscreen.audit`` logger, whose level :func:`core.logs.configure_logging`
keeps at INFO whatever ``--log-level`` says, and an entry of the Redis stream
:data:`core.keys.AUDIT_LOG`, trimmed to ``audit.max_entries`` and ``audit.retention_days``
(both approximately, ``~``). A record names the token by its name, never its secret.
The change it describes has already been acknowledged by Redis when it is written; a
stream write that fails is logged and does not undo or fail the change.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from redis.exceptions import RedisError

from core import keys
from core.config import AuditSettings
from core.logs import AUDIT_LOGGER, log_fields
from core.store import RedisClient

audit_logger = logging.getLogger(AUDIT_LOGGER)
logger = logging.getLogger(__name__)
#: Stream entries read per round trip while a query walks back through a stream.
QUERY_PAGE = 1000


async def newest_first(
    redis: RedisClient, key: str, max_pages: int | None = None
) -> AsyncIterator[dict[str, Any]]:
    """The JSON records (field ``r``) of a stream, newest first, with their ``id``."""
    upper = "+"
    pages = 0
    while max_pages is None or pages < max_pages:
        page: Any = await redis.xrevrange(key, max=upper, min="-", count=QUERY_PAGE)
        pages += 1
        for stream_id, values in page:
            record: dict[str, Any] = orjson.loads(values.get(b"r") or values.get("r") or b"{}")
            record["id"] = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
            yield record
        if len(page) < QUERY_PAGE:
            return
        last = page[-1][0]
        upper = "(" + (last.decode() if isinstance(last, bytes) else last)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One change. ``actor`` is a token name (or ``loader``); ``client`` an address or host."""

    action: str
    actor: str
    client: str
    list: str | None = None
    entry: str | None = None
    subscriber: str | None = None
    added: int | None = None
    removed: int | None = None
    version_before: int | None = None
    version_after: int | None = None
    reason: str | None = None
    outcome: str = "ok"
    detail: str | None = None
    time: float = dataclasses.field(default_factory=time.time)

    def fields(self) -> dict[str, Any]:
        """The record without its unset fields."""
        return {
            name: value
            for name in self.__dataclass_fields__
            if (value := getattr(self, name)) is not None
        }


def loader_record(
    action: str,
    list_name: str,
    before: int | None,
    after: int | None,
    outcome: str,
    detail: str,
) -> AuditRecord:
    """A record of the loader's own (``sync``, ``accept``): actor ``loader``, its host."""
    return AuditRecord(
        action=action,
        actor="loader",
        client=socket.gethostname(),
        list=list_name,
        version_before=before,
        version_after=after,
        outcome=outcome,
        detail=detail,
    )


def _line(record: AuditRecord) -> str:
    parts = [f"{record.action} by {record.actor} from {record.client}"]
    for name in ("list", "subscriber", "entry", "added", "removed", "outcome"):
        value = getattr(record, name)
        if value is not None and not (name == "outcome" and value == "ok"):
            parts.append(f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}")
    if record.version_before is not None or record.version_after is not None:
        parts.append(f"version={record.version_before}->{record.version_after}")
    if record.reason:
        parts.append(f"reason={record.reason!r}")
    if record.detail:
        parts.append(f"detail={record.detail!r}")
    return " ".join(parts)


class AuditLog:
    """Writes and reads the audit trail in Redis; one per process or app."""

    def __init__(self, redis: RedisClient, settings: AuditSettings) -> None:
        self.redis = redis
        self.settings = settings

    async def append(self, record: AuditRecord) -> None:
        """Log ``record`` and add it to the stream; a Redis failure is logged, not raised."""
        fields = record.fields()
        log_fields(audit_logger, logging.INFO, "audit: %s", (_line(record),), fields)
        oldest_ms = int((record.time - self.settings.retention_days * 86_400) * 1000)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(
                    keys.AUDIT_LOG,
                    {"r": orjson.dumps(fields)},
                    maxlen=self.settings.max_entries,
                    approximate=True,
                )
                pipe.xtrim(keys.AUDIT_LOG, minid=oldest_ms, approximate=True)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            logger.warning("audit record not stored in Redis (it is in the log): %r", exc)

    async def version_of(self, list_name: str) -> int | None:
        """The list's ``version`` now (None: no list, or Redis did not answer)."""
        try:
            value = await self.redis.hget(keys.meta(list_name), "version")
        except (RedisError, OSError):
            return None
        return None if value is None else int(value)

    async def query(
        self,
        *,
        list_name: str | None = None,
        entries: frozenset[str] = frozenset(),
        action: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """The newest records matching every filter given, newest first, at most ``limit``.

        ``entries``: a record matches when its entry or subscriber is one of them.
        Walks back through the whole (capped) stream when few records match.
        """
        found: list[dict[str, Any]] = []
        async for record in newest_first(self.redis, keys.AUDIT_LOG):
            if list_name and record.get("list") != list_name:
                continue
            if action and record.get("action") != action:
                continue
            if entries and not ({record.get("entry"), record.get("subscriber")} & entries):
                continue
            found.append(record)
            if len(found) >= limit:
                break
        return found
