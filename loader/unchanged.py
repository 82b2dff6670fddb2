"""Telling cheaply that a sync would change nothing, so it skips reading and building.

A sync that committed (or found nothing to change) records in the list's ``meta`` the
*source digest*: SHA-256 of the source's bytes and of everything else that decides
what the rows become (the list's config, the default country, this build's version),
with the list's ``version`` (and, for a subscribers list, its admin-write count) right
after. The next sync hashes the source again (a few hundred MB/s, on a thread) and,
when digest, ``version`` and count are all as recorded, stamps the list "checked,
unchanged" (``synced_at``) without reading a row. Any admin change since moves
``version`` or the count, so a sync still undoes it as before; ``--force`` and the
self-healing (a lost bucket or base is not seen in ``meta``) always build.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import IO

from core import keys
from core.config import Config
from core.store import RedisClient
from core.version import VERSION

#: Bytes hashed per read.
CHUNK_BYTES = 1 << 20
#: The ``meta`` field the digest is kept in: ``<digest> <version> <changes>``.
DIGEST_FIELD = "source_digest"


def _hash_file(raw: IO[bytes]) -> str:
    digest = hashlib.sha256()
    raw.seek(0)
    while chunk := raw.read(CHUNK_BYTES):
        digest.update(chunk)
    raw.seek(0)
    return digest.hexdigest()


async def source_digest(raw: IO[bytes], config: Config, name: str, source: str) -> str:
    """The digest of a source (a seekable file, left at its start) as list ``name``."""
    content = await asyncio.to_thread(_hash_file, raw)
    spec = config.lists[name].model_dump(mode="json")
    how = json.dumps(
        [spec, source, config.caller.default_country, VERSION], sort_keys=True, default=str
    )
    return "sha256:" + hashlib.sha256(f"{content}|{how}".encode()).hexdigest()


async def unchanged(redis: RedisClient, name: str, digest: str) -> tuple[bool, int]:
    """Whether the list is exactly what the last sync of a source with ``digest`` made,
    and its admin-write count now (for :func:`record`, read before the build)."""
    async with redis.pipeline(transaction=True) as pipe:  # one tag: one slot
        pipe.hmget(keys.meta(name), [DIGEST_FIELD, "version"])
        pipe.get(keys.subscriber_changes(name))
        (recorded, version), changes = await pipe.execute()
    now = int(changes or 0)
    expected = f"{digest} {int(version or 0)} {now}"
    return recorded is not None and recorded.decode() == expected, now


async def record(redis: RedisClient, name: str, digest: str, version: int, changes: int) -> None:
    """Note that the list at ``version`` is what a source with ``digest`` makes.

    ``version`` is the one the commit (or touch) returned and ``changes`` the count
    read before the build: a change landing since makes either differ from the list's
    now, and the next sync builds.
    """
    await redis.hset(keys.meta(name), DIGEST_FIELD, f"{digest} {version} {changes}")
