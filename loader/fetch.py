"""Downloading ``http(s)://`` list sources, conditionally and with retries.

The body streams to a temporary file; a retry starts afresh, so a dropped connection
never becomes a half list. ``ETag``/``Last-Modified`` are sent back and a ``304`` ends
the sync; ``timeout_s`` bounds each wait, not the download; connection errors,
timeouts, ``408``, ``429`` and ``5xx`` are retried with doubling pauses, other
statuses fail at once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import IO

import aiohttp

from core.connect import redact
from core.redact import redact_text

logger = logging.getLogger(__name__)
CHUNK_BYTES = 256 * 1024
MAX_BACKOFF_S = 30.0
_RETRY_STATUSES = frozenset({408, 429})


class FetchError(Exception):
    """A source that could not be downloaded (after any retries)."""


@dataclass(frozen=True, slots=True)
class Validators:
    """What the server said identifies the version of the list it sent."""

    etag: str = ""
    last_modified: str = ""

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.etag:
            headers["If-None-Match"] = self.etag
        if self.last_modified:
            headers["If-Modified-Since"] = self.last_modified
        return headers


@dataclass(frozen=True, slots=True)
class Fetched:
    not_modified: bool
    validators: Validators
    content_type: str = ""
    size_bytes: int = 0
    attempts: int = 1


class _Retryable(Exception):
    pass


async def fetch(
    url: str,
    dest: IO[bytes],
    *,
    validators: Validators = Validators(),
    timeout_s: float = 30.0,
    retries: int = 3,
    backoff_s: float = 1.0,
    session: aiohttp.ClientSession | None = None,
) -> Fetched:
    """Download ``url`` into ``dest`` (truncated first); see the module doc for the rules."""
    timeout = aiohttp.ClientTimeout(
        total=None, connect=timeout_s, sock_connect=timeout_s, sock_read=timeout_s
    )
    own = session is None
    client = session or aiohttp.ClientSession(timeout=timeout)
    shown = redact(url)
    try:
        for attempt in range(1, retries + 2):
            try:
                return await _attempt(
                    client, url, dest, validators, limits=timeout, attempt=attempt
                )
            except _Retryable as exc:
                if attempt > retries:
                    tries = "1 attempt" if attempt == 1 else f"{attempt} attempts"
                    raise FetchError(f"{shown}: {exc} ({tries})") from None
                pause_s = min(backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
                logger.warning(
                    "%s: %s; retry %d of %d in %.1f s", shown, exc, attempt, retries, pause_s
                )
                await asyncio.sleep(pause_s)
        raise AssertionError("unreachable")
    finally:
        if own:
            await client.close()


async def _attempt(
    client: aiohttp.ClientSession,
    url: str,
    dest: IO[bytes],
    validators: Validators,
    *,
    limits: aiohttp.ClientTimeout,
    attempt: int,
) -> Fetched:
    dest.seek(0)
    dest.truncate()
    try:
        async with client.get(url, headers=validators.headers(), timeout=limits) as response:
            if response.status == 304:
                if not (validators.etag or validators.last_modified):
                    raise FetchError(f"{redact(url)}: 304 Not Modified to an unconditional GET")
                return Fetched(True, validators, attempts=attempt)
            if response.status >= 500 or response.status in _RETRY_STATUSES:
                raise _Retryable(f"HTTP {response.status} {response.reason or ''}".strip())
            if response.status != 200:
                raise FetchError(
                    f"{redact(url)}: HTTP {response.status} {response.reason or ''}".strip()
                )
            size = 0
            async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                dest.write(chunk)
                size += len(chunk)
            dest.flush()
            fresh = Validators(
                etag=response.headers.get("ETag", ""),
                last_modified=response.headers.get("Last-Modified", ""),
            )
            return Fetched(False, fresh, response.headers.get("Content-Type", ""), size, attempt)
    except TimeoutError:
        raise _Retryable(f"no answer within {limits.sock_read:g} s") from None
    except aiohttp.ClientError as exc:
        # Some (ClientResponseError, InvalidURL, redirects) quote the URL, secrets and all.
        raise _Retryable(f"{type(exc).__name__}: {redact_text(str(exc))}") from None
    except OSError as exc:  # connection reset and the like
        raise _Retryable(f"{type(exc).__name__}: {exc}") from None
