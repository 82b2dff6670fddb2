"""The Redis key layout: every key the project reads or writes is named here.

Each list lives under one hash tag, ``{cs:<list>}`` (``meta``, ``base:<gen>``, ``adds``,
``dels``, ``overlay:*`` (the admin overlay, :mod:`core.overlay`), ``stage:<gen>:<b>``,
``lock``, staged admin changes), so a swap runs in one MULTI/EXEC on one Cluster slot;
a ``subscribers`` list spreads its data over ``SUBSCRIBER_BUCKETS`` tags
``{cs:<list>:<b>}``, each bucket carrying the :data:`SUBSCRIBER_MARKER` field (and its
admin overlay, ``{cs:<list>:<b>}:overlay``, in the same slot). Rate
counters, sequential dialing, STIR certificates, the audit trail and call history have
tags of their own. The full table: docs/design.md, "Redis key layout" (audit and
history: docs/audit.md, docs/history.md).
"""

from __future__ import annotations

import hashlib
import re
import zlib

LIST_NAME_RE = re.compile(r"[a-z0-9_-]{1,64}")
#: Numbers lists are split into this many buckets by ``number % NUMBER_BUCKETS``.
NUMBER_BUCKETS = 4096
#: Subscribers lists are split into this many buckets (hash tags) by
#: ``crc32(subscriber) % SUBSCRIBER_BUCKETS``: 16,384 tags land on ~16 k distinct Cluster
#: slots, spread evenly over the masters, and at 10 M subscribers a bucket holds ~610
#: of them (~40 kB), small enough to move in a resharding without a pause.
SUBSCRIBER_BUCKETS = 16384
#: The field every bucket hash of a subscribers generation carries (value: the
#: generation that wrote the bucket, which later generations may keep naming:
#: core/bucket_gens.py), whether or not it holds subscribers. Written when the generation is
#: built (or allocated by the admin API) and never removed: subscriber writes touch
#: their own field only. A call reads it with its subscriber (one HMGET), so a bucket
#: Redis lost while the list's ``meta`` survived (a Cluster master failed over to an
#: empty or lagging replica) shows as a missing marker, not as a subscriber without
#: entries. Never a subscriber: those are digits.
SUBSCRIBER_MARKER = "_gen"
#: Old generations stay readable this long after a swap, so a reader that saw the old
#: ``gen`` a moment before the swap can still fetch it whole.
OLD_GENERATION_GRACE_S = 120
#: A killed sync's staging keys vanish on their own after this long.
STAGING_TTL_S = 6 * 3600


class InvalidListName(ValueError):
    """A list name that may not become part of a Redis key."""


def check_list_name(name: str) -> str:
    """Return ``name`` if it is a valid list name (``[a-z0-9_-]{1,64}``), else raise."""
    if not LIST_NAME_RE.fullmatch(name):
        raise InvalidListName(f"invalid list name {name!r}: use 1-64 of a-z, 0-9, '_' or '-'")
    return name


def _tag(name: str) -> str:
    return "{cs:" + check_list_name(name) + "}"


def meta(name: str) -> str:
    return _tag(name) + ":meta"


def base(name: str, gen: int) -> str:
    return f"{_tag(name)}:base:{gen}"


def adds(name: str) -> str:
    return _tag(name) + ":adds"


def dels(name: str) -> str:
    return _tag(name) + ":dels"


def overlay_adds(name: str) -> str:
    return _tag(name) + ":overlay:add"


def overlay_dels(name: str) -> str:
    return _tag(name) + ":overlay:del"


def overlay_expiry(name: str) -> str:
    return _tag(name) + ":overlay:expiry"


def stage(name: str, gen: int, bucket: int) -> str:
    return f"{_tag(name)}:stage:{gen}:{bucket}"


def lock(name: str) -> str:
    return _tag(name) + ":lock"


def staged_change(name: str, what: str, token: str) -> str:
    """Part of a large admin change (``what``: add or remove) written before it applies."""
    return f"{adds(name)}:staged:{what}:{token}"


def subscriber_bucket_of(subscriber: str) -> int:
    """The bucket of a (canonical) subscriber number."""
    return zlib.crc32(subscriber.encode()) % SUBSCRIBER_BUCKETS


def subscribers(name: str, bucket: int, gen: int) -> str:
    """One bucket of generation ``gen`` of a subscribers list."""
    return f"{{cs:{check_list_name(name)}:{bucket}}}:sub:{gen}"


def subscriber_gens(name: str, gen: int) -> str:
    """Which generation holds each bucket of generation ``gen`` of a subscribers list
    (:mod:`core.bucket_gens`); in ``meta``'s slot."""
    return _tag(name) + f":subgens:{gen}"


def subscriber_overlay(name: str, bucket: int) -> str:
    """The admin overlay of one bucket of a subscribers list (:mod:`core.subscriber_overlay`):
    kept across generations, in the bucket's slot."""
    return f"{{cs:{check_list_name(name)}:{bucket}}}:overlay"


def subscriber_overlay_expiry(name: str) -> str:
    """Index of a subscribers list's expiring overlay fields (``<bucket> <field>``)."""
    return _tag(name) + ":overlay:expiry:subscribers"


def subscriber_changes(name: str) -> str:
    """Counter of a subscribers list's admin writes, bumped after each is acknowledged.

    Next to ``meta`` (same tag), not in it: a sync's swap WATCHes ``meta``, and a write
    landing meanwhile must not make that swap fail. Workers poll it with ``meta`` and
    drop the subscribers' entries they cached when it moves (service/screening/subscriber_cache.py).
    """
    return _tag(name) + ":changes"


def rate(caller: str, rule_key: str, window_index: int) -> str:
    """Counter of one caller's calls for one rule (``policy:rule``) in one time window."""
    return f"{{cs:rate:{caller}}}:{rule_key}:{window_index}"


def rate_by_head(kind: str, subject: str, rule_key: str) -> str:
    """Counters of one ``call_rate`` rule keyed by ``kind`` (not the caller): this, then
    the window's index (``...:<rule_key>:<index>``), names one window's counter."""
    return f"{{cs:rate:{kind}:{subject}}}:{rule_key}:"


def dialed(caller: str, rule_key: str) -> str:
    """The called numbers one caller dialled recently, for one sequential-dialing rule."""
    return f"{{cs:seq:{caller}}}:{rule_key}"


AUDIT_LOG = "{cs:audit}:log"
HISTORY_RECENT = "{cs:history}:recent"


def history_calls(number_key: str) -> str:
    """One number's recorded calls; ``number_key`` is digits or a hex digest."""
    return f"{{cs:hist:{number_key}}}:calls"


def bucket_of(number: int) -> int:
    return number % NUMBER_BUCKETS


def stir_cert(url: str) -> str:
    """A STIR/SHAKEN certificate (the x5u's PEM body) cached for the fleet; one tag each."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:32]
    return f"{{cs:stir:{digest}}}:cert"


def decoded(value: bytes | str | None) -> str:
    """A Redis reply as text (``None``, a missing field or key, is ``""``)."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value
