"""The ``config.yaml`` schema, parsed once at start into a frozen, validated object.

Both the service and the loader read the same file. Any problem stops start-up with a
:class:`ConfigError` that names the file, the key path and the problem, e.g.
``config.yaml: policies.default.rules[0].list: unknown list 'blockist'``.

Environment overrides (secrets and deployment-specific values never live in the file):
``CALLSCREEN_REDIS_URL`` replaces ``redis.url``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    ValidationError,
    field_validator,
    model_validator,
)

from core.keys import LIST_NAME_RE

REDIS_URL_ENV = "CALLSCREEN_REDIS_URL"

#: CarrierX's reject reasons and the SIP status each one sends.
REJECT_REASONS = {
    "rejected": 403,
    "forbidden": 403,
    "busy-here": 486,
    "unavailable": 503,
    "decline": 603,
    "does-not-exist": 604,
    "unwanted": 607,
}
DEFAULT_OPERANDS = ("unavailable", "aniblock")
CallerSource = Literal["from", "p-asserted-identity", "remote-party-id"]
CALLER_SOURCES: tuple[CallerSource, ...] = ("from", "p-asserted-identity", "remote-party-id")

ListKind = Literal["numbers", "prefixes", "names", "subscribers"]
Action = Literal["allow", "reject"]


class ConfigError(Exception):
    """A config file that cannot be used; the message names file, key path and problem."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Operands = tuple[str, str]


def _check_operands(value: Operands) -> Operands:
    reason, tag = value
    if reason not in REJECT_REASONS:
        known = ", ".join(REJECT_REASONS)
        raise ValueError(f"unknown reject reason {reason!r}; use one of: {known}")
    if not tag or len(tag) > 64:
        raise ValueError("the reject tag must be 1-64 characters")
    return value


class RedisSettings(_Model):
    url: str = "redis://127.0.0.1:6379/0"
    #: Socket timeout for background work (list refresh, admin writes).
    socket_timeout_ms: Annotated[int, Field(gt=0)] = 2000


class ServerSettings(_Model):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    #: The operator listener: admin API, explain and /metrics (plus the probes), apart
    #: from the handler port CarrierX calls. ``admin_port: null`` serves them all on
    #: ``port`` instead.
    admin_host: str = "127.0.0.1"
    admin_port: Annotated[int, Field(ge=0, le=65535)] | None = 9180
    #: Worker processes; 0 (the default) means one per CPU core (service/procs/workers.py).
    workers: Annotated[int, Field(ge=0, le=256)] = 0
    max_body_bytes: Annotated[int, Field(gt=0)] = 64 * 1024
    log_format: Literal["text", "json"] = "text"
    #: Log callers as ``1516206****`` instead of the full number.
    mask_callers: bool = True
    #: Connections one process holds at most (lowered to fit the open-files limit); past
    #: it, those waiting longest for a request are closed (service/edge/connections.py).
    max_connections: Annotated[int, Field(gt=0, le=1_000_000)] = 4096
    #: A request must arrive whole within this long of its first byte.
    request_timeout_ms: Annotated[int, Field(gt=0, le=600_000)] = 5000
    #: An idle keep-alive connection is closed after this long.
    keepalive_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 75.0
    #: After this many requests a connection's answer says ``Connection: close``, so
    #: clients reconnect and the kernel spreads connections over the workers again.
    max_requests_per_connection: Annotated[int, Field(gt=0)] = 1000
    #: Use aiohttp's internals for the fast answer, dispatch and the connection guard:
    #: ``auto`` when this aiohttp's are the known ones, ``on`` (refuse to start without
    #: them) or ``off`` (public API only). ``CALLSCREEN_AIOHTTP_INTERNALS`` overrides it.
    aiohttp_internals: Literal["auto", "on", "off"] = "auto"

    @model_validator(mode="after")
    def _two_listeners(self) -> ServerSettings:
        if self.admin_port is not None and self.admin_port == self.port and self.port:
            raise ValueError(
                "admin_port must differ from port (or be null to serve the admin API, "
                "explain and /metrics on the handler port)"
            )
        return self


class HandlerSettings(_Model):
    #: Internal deadline for one decision; keep it below the trunk group's ``timeout``.
    deadline_ms: Annotated[int, Field(gt=0, le=10_000)] = 100
    #: What to answer when the lists cannot be trusted (Redis down, slow, not loaded).
    on_error: Action = "allow"
    on_error_operands: Operands = DEFAULT_OPERANDS

    _operands = field_validator("on_error_operands")(_check_operands)


class CacheSettings(_Model):
    #: How often each worker asks Redis whether a list changed.
    refresh_ms: Annotated[int, Field(gt=0, le=60_000)] = 250
    #: Lists not confirmed with Redis for this long are treated as unavailable and
    #: answers follow ``handler.on_error``. Raise it to serve slightly stale lists
    #: through short Redis outages instead.
    max_stale_ms: Annotated[int, Field(gt=0)] = 1000
    #: Numbers lists are indexed once per host into a file every worker maps, instead of
    #: one copy per worker (service/screening/shared_lists.py). ``false``: each keeps its own.
    share_lists: bool = True
    #: Subscribers whose entries each worker keeps after reading them from Redis (an
    #: LRU; 0: none, every call reaches Redis). Valid while the list's generation and
    #: admin-write count, as polled every ``refresh_ms``, stay the same
    #: (service/screening/subscriber_cache.py).
    subscriber_entries: Annotated[int, Field(ge=0, le=10_000_000)] = 10_000
    #: A cached subscriber is read again after this long whatever the polls say: the
    #: bound for writes that bypass the count (a hand edit in Redis) and for noticing
    #: a lost bucket of a subscriber answered from the cache.
    subscriber_max_age_ms: Annotated[int, Field(gt=0, le=3_600_000)] = 5_000
    #: Where the shared files' folder (one per service instance, mode 0700) is made;
    #: ``null``: ``/dev/shm`` (memory) when usable, else the temp folder.
    share_dir: str | None = None

    @model_validator(mode="after")
    def _stale_after_refresh(self) -> CacheSettings:
        if self.max_stale_ms < self.refresh_ms:
            raise ValueError("max_stale_ms must be at least refresh_ms")
        return self


class CallerSettings(_Model):
    #: Headers tried in order for the caller number and name.
    sources: tuple[CallerSource, ...] = CALLER_SOURCES
    #: Country code added to national numbers (``1`` = NANP).
    default_country: Annotated[str, Field(pattern=r"^[1-9][0-9]{0,2}$")] = "1"

    @field_validator("sources")
    @classmethod
    def _non_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or len(set(value)) != len(value):
            raise ValueError("give one or more distinct headers")
        return value


class ListSpec(_Model):
    kind: ListKind = "numbers"
    description: str = ""
    #: CSV or plain-text file (relative to the config file) or http(s):// URL; ``None``
    #: for a list kept only through the admin API.
    source: str | None = None
    #: The column holding the entry: a 0-based index or a header name.
    column: int | str = 0
    #: Columns kept as labels next to each entry (reported, not used for decisions).
    label_columns: tuple[int | str, ...] = ()
    #: Sync interval for ``python -m loader run``; ``None`` means only on demand.
    interval_s: Annotated[int, Field(gt=0)] | None = None
    #: A sync that would remove more than this share of the list is refused.
    max_removal_share: Annotated[float, Field(ge=0, le=1)] = 0.5
    #: A sync rejecting more than this share of the rows it read is refused.
    max_rejected_share: Annotated[float, Field(ge=0, le=1)] = 0.05
    #: ``numbers`` lists: accept numbers no numbering plan can dial (``911``, ``611``).
    allow_short_codes: bool = False
    #: URL sources: give up on an attempt when connecting, or waiting for data, takes
    #: longer than this; then retry up to ``retries`` times with growing pauses.
    timeout_s: Annotated[float, Field(gt=0)] = 30.0
    retries: Annotated[int, Field(ge=0, le=10)] = 3
    #: ``csv``, ``text`` (one entry a line) or ``auto`` (from the name; see loader/sources.py).
    format: Literal["auto", "csv", "text"] = "auto"
    #: The CSV field separator; another than ``,`` (``"\t"`` for NANPA's tab-separated
    #: code reports) makes the source CSV whatever ``format`` says.
    delimiter: Annotated[str, Field(min_length=1, max_length=1)] = ","
    #: ``prefixes`` lists: digits put before every entry read from the source, e.g.
    #: ``"1"`` for NANP codes published as NPA-NXX without the country code.
    entry_prefix: Annotated[str, Field(pattern=r"^[0-9]{0,3}$")] = ""

    @model_validator(mode="after")
    def _entry_prefix_for_prefixes(self) -> ListSpec:
        if self.entry_prefix and self.kind != "prefixes":
            raise ValueError("'entry_prefix' is for lists of kind 'prefixes'")
        return self


Match = Literal[
    "caller_in_list",
    "caller_prefix_in_list",
    "caller_name_matches_list",
    "called_in_list",
    "anonymous",
    "invalid_number",
    "attestation_failed",
    "call_rate",
    "caller_in_subscriber_list",
    "sequential_dialing",
    "neighbour_spoofing",
    "stir_result",
    "stir_attestation",
]
#: What a ``call_rate`` rule counts calls by (core/fraud.py).
RateKey = Literal["caller", "called", "trunk_group", "caller_prefix", "caller_called"]
#: Keys a rule may set only for these matches (besides the fields every rule has).
MATCH_ONLY_FIELDS: dict[str, frozenset[str]] = {
    "call_rate": frozenset({"limit", "window_s", "key", "prefix_digits"}),
    "sequential_dialing": frozenset({"window_s", "run_length", "max_gap", "track"}),
    "neighbour_spoofing": frozenset({"digits", "unless_list", "unless_verstat"}),
    "stir_result": frozenset({"results", "reasons"}),
    "stir_attestation": frozenset({"attest"}),
}
#: STIR/SHAKEN verification results (service/screening/stir/) and why one is invalid.
StirResult = Literal["valid", "invalid", "absent"]
StirReason = Literal[
    "bad_signature",
    "stale",
    "tn_mismatch",
    "untrusted_chain",
    "cert_unavailable",
    "malformed",
    "verstat_failed",
]
Attestation = Literal["A", "B", "C"]
#: The list kind each list-based condition needs.
MATCH_LIST_KIND: dict[str, ListKind] = {
    "caller_in_list": "numbers",
    "caller_prefix_in_list": "prefixes",
    "caller_name_matches_list": "names",
    "called_in_list": "numbers",
    "caller_in_subscriber_list": "subscribers",
}


class Rule(_Model):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    match: Match
    list: str | None = None
    action: Action = "reject"
    operands: Operands = DEFAULT_OPERANDS
    dry_run: bool = False
    #: ``call_rate``: more than ``limit`` calls with the same ``key`` in ``window_s``
    #: seconds; ``sequential_dialing``: the window the called numbers are kept for.
    limit: Annotated[int, Field(gt=0)] | None = None
    window_s: Annotated[int, Field(gt=0, le=86_400)] | None = None
    #: ``call_rate``: what calls are counted by; ``caller_prefix`` counts by the caller's
    #: first ``prefix_digits`` digits.
    key: RateKey = "caller"
    prefix_digits: Annotated[int, Field(ge=1, le=15)] | None = None
    #: ``sequential_dialing``: ``run_length`` or more called numbers, each within
    #: ``max_gap`` of the next, from one caller in ``window_s``; the newest ``track``
    #: called numbers per caller are kept.
    run_length: Annotated[int, Field(ge=2, le=128)] = 5
    max_gap: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    #: At most 128: Redis keeps a sorted set that small compact (docs/fraud.md).
    track: Annotated[int, Field(ge=2, le=128)] = 64
    #: ``neighbour_spoofing``: caller and called share their first ``digits`` digits,
    #: the caller is not on the numbers list ``unless_list`` and the call's verstat is
    #: not one of ``unless_verstat`` (compared without case).
    digits: Annotated[int, Field(ge=1, le=15)] = 7
    unless_list: str | None = None
    unless_verstat: tuple[str, ...] = ()
    #: ``stir_result``: the verification results that match, and (for ``invalid``)
    #: the reasons; no reasons given means any.
    results: tuple[StirResult, ...] = ()
    reasons: tuple[StirReason, ...] = ()
    #: ``stir_attestation``: the attestation levels of a valid PASSporT that match.
    attest: tuple[Attestation, ...] = ()

    _operands = field_validator("operands")(_check_operands)

    @model_validator(mode="after")
    def _fields_for_match(self) -> Rule:
        needs_list = self.match in MATCH_LIST_KIND
        if needs_list and self.list is None:
            raise ValueError(f"match {self.match!r} needs 'list'")
        if not needs_list and self.list is not None:
            raise ValueError(f"match {self.match!r} takes no 'list'")
        is_rate = self.match == "call_rate"
        if is_rate and (self.limit is None or self.window_s is None):
            raise ValueError("match 'call_rate' needs 'limit' and 'window_s'")
        if not is_rate and self.limit is not None:
            raise ValueError("'limit' belongs to match 'call_rate' only")
        if self.match == "sequential_dialing" and self.window_s is None:
            raise ValueError("match 'sequential_dialing' needs 'window_s'")
        # A key at its default is no stray: a dumped config validates again.
        allowed = MATCH_ONLY_FIELDS.get(self.match, frozenset())
        stray = sorted(
            {
                f
                for fields in MATCH_ONLY_FIELDS.values()
                for f in fields - allowed
                if getattr(self, f) != Rule.model_fields[f].default
            }
        )
        if stray:
            raise ValueError(f"match {self.match!r} takes no {', '.join(map(repr, stray))}")
        if (self.key == "caller_prefix") != (self.prefix_digits is not None):
            raise ValueError("'prefix_digits' goes with key 'caller_prefix', and only with it")
        if self.run_length > self.track:
            raise ValueError("'track' must be at least 'run_length'")
        if self.match == "stir_result" and not self.results:
            raise ValueError("match 'stir_result' needs 'results'")
        if self.reasons and "invalid" not in self.results:
            raise ValueError("'reasons' needs 'invalid' among the 'results'")
        if self.match == "stir_attestation" and not self.attest:
            raise ValueError("match 'stir_attestation' needs 'attest'")
        return self


class Policy(_Model):
    default: Action = "allow"
    default_operands: Operands = DEFAULT_OPERANDS
    rules: tuple[Rule, ...] = ()
    #: STIR/SHAKEN rules take an upstream ``verstat`` (TN-Validation-Passed/-Failed) as
    #: the result instead of checking the signature themselves.
    trust_verstat: bool = False

    _operands = field_validator("default_operands")(_check_operands)

    @field_validator("rules")
    @classmethod
    def _unique_rule_names(cls, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
        names = [rule.name for rule in rules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"rule names must be unique, repeated: {', '.join(duplicates)}")
        return rules


ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
EnvName = Annotated[str, Field(pattern=ENV_NAME_PATTERN)]


class AuthSettings(_Model):
    """Who may call the screening endpoints. Nothing set (the default) lets anyone in.

    Secrets never live in the file: each ``*_env`` key names the environment variable
    that holds them (comma-separated values for rotation). Either a shared secret or
    Basic credentials authenticate; ``allow_cidrs`` is checked on top of them.
    """

    #: Variable holding the shared secret, sent as ``/k/<secret>/...`` or ``?key=<secret>``.
    secret_env: EnvName | None = None
    #: HTTP Basic user, and the variable holding its password.
    basic_user: Annotated[str, Field(pattern=r"^[^:\s]{1,128}$")] | None = None
    basic_password_env: EnvName | None = None
    #: Source networks allowed to call; empty allows any address.
    allow_cidrs: tuple[IPvAnyNetwork, ...] = ()
    #: Proxies whose ``X-Forwarded-For`` is believed when checking ``allow_cidrs``.
    trusted_proxies: tuple[IPvAnyNetwork, ...] = ()

    @model_validator(mode="after")
    def _basic_pair(self) -> AuthSettings:
        if (self.basic_user is None) != (self.basic_password_env is None):
            raise ValueError("give both basic_user and basic_password_env, or neither")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.secret_env or self.basic_user or self.allow_cidrs)


class TrunkGroup(_Model):
    policy: str
    #: Replaces the top-level ``auth`` for this trunk group (``{}`` opens it).
    auth: AuthSettings | None = None


class AdminSettings(_Model):
    #: Environment variable holding the admin bearer tokens: comma-separated entries,
    #: each ``name:role:secret`` or a bare secret (an ``admin`` token); see docs/security.md.
    tokens_env: str = "CALLSCREEN_ADMIN_TOKENS"
    #: A secrets file with one token entry a line (same format, ``#`` comments), read
    #: with the variable and again on every reload; ``null``: none.
    tokens_file: str | None = None
    #: Largest admin request body (bulk changes), and most entries in one bulk change.
    max_body_bytes: Annotated[int, Field(gt=0)] = 8 * 1024 * 1024
    max_bulk_entries: Annotated[int, Field(gt=0)] = 100_000


class AuditSettings(_Model):
    """The audit trail of admin changes, syncs and reloads (docs/audit.md)."""

    #: Records kept in Redis at most (approximately: the stream is trimmed with ``~``).
    max_entries: Annotated[int, Field(gt=0)] = 100_000
    #: Records older than this are trimmed from Redis.
    retention_days: Annotated[float, Field(gt=0)] = 90.0


class HistorySettings(_Model):
    """Call history: rejected calls, dry-run matches and a sample of allowed calls."""

    enabled: bool = False
    #: Share of allowed calls (without a dry-run match) recorded, 0 to 1.
    sample_allowed: Annotated[float, Field(ge=0, le=1)] = 0.0
    #: How long a call stays findable.
    retention_s: Annotated[int, Field(gt=0)] = 7 * 86_400
    #: Calls kept in the recent-calls stream (all numbers), approximately.
    max_entries: Annotated[int, Field(gt=0)] = 100_000
    #: Calls kept per number, the newest (about: see docs/history.md).
    max_per_number: Annotated[int, Field(gt=0, le=100_000)] = 1000
    #: Store full numbers even when ``server.mask_callers`` is on.
    unmasked: bool = False
    #: Variable holding the key of the HMAC that names each number's index while
    #: numbers are masked (the index must not hold the number in clear).
    hash_key_env: EnvName = "CALLSCREEN_HISTORY_KEY"
    #: Records waiting in memory are written this often (in slices; see
    #: service/screening/history.py).
    flush_ms: Annotated[int, Field(gt=0, le=10_000)] = 50
    #: Records waiting at most; past it new ones are dropped and counted.
    queue_max: Annotated[int, Field(gt=0)] = 20_000
    #: A batch write taking longer is given up and its records counted as dropped.
    write_timeout_ms: Annotated[int, Field(gt=0)] = 1000


class LoaderSettings(_Model):
    metrics_host: str = "127.0.0.1"
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9108
    #: Numbers written to Redis per pipelined batch (8 bytes each in loader memory).
    batch_size: Annotated[int, Field(gt=0)] = 1_000_000
    #: A full sync holds the list's lock with this TTL, refreshed while it works; a
    #: killed loader's lock frees itself after this long.
    lock_ttl_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    #: First pause before retrying a failed URL fetch; doubles each retry (max 30 s).
    retry_backoff_s: Annotated[float, Field(ge=0, le=60)] = 1.0
    #: ``loader run`` and ``loader apply`` fold a list's single-entry changes into a new
    #: base once there are more than this many (0: never).
    compact_over: Annotated[int, Field(ge=0)] = 100_000
    #: A subscribers sync whose changed buckets cost Redis more than this share of what
    #: the new list costs swaps them in by steps of at most this share, waiting
    #: ``subscriber_step_wait_s`` after each step before deleting the buckets it
    #: replaced: Redis then peaks at about (1 + share) times the list. 1: one swap.
    subscriber_step_share: Annotated[float, Field(gt=0, le=1)] = 0.5
    #: ...unless their entries take less than this many MB (packed): a small change
    #: goes in one swap.
    subscriber_step_min_mb: Annotated[float, Field(ge=0)] = 16.0
    #: How long a step of a subscribers sync keeps the buckets it replaced: workers
    #: may read them until their next ``meta`` poll (the old generation's grace).
    subscriber_step_wait_s: Annotated[float, Field(ge=0, le=3600)] = 120.0
    #: Lists ``loader run`` syncs at the same time.
    max_concurrent_syncs: Annotated[int, Field(gt=0, le=64)] = 2
    #: How often ``loader run`` checks every list's health (meta, version, bucket
    #: markers) and re-syncs one Redis lost.
    health_check_s: Annotated[float, Field(gt=0, le=3600)] = 2.0
    #: Folder (relative to the config file) where ``loader run`` writes each list's
    #: export as ``<name>.csv`` every ``snapshot_interval_s``; ``None``: no snapshots.
    #: A list without a source is healed from its snapshot.
    snapshot_dir: str | None = None
    snapshot_interval_s: Annotated[int, Field(gt=0)] = 300


class StirSettings(_Model):
    """Verification of STIR/SHAKEN ``Identity`` headers (docs/stir-shaken.md)."""

    #: PEM bundle of the STI-CA trust anchors (from the STI-PA trust list), relative to
    #: the config file; re-read when it changes. ``null``: every chain is untrusted.
    trust_anchors: str | None = None
    #: Optional PEM/DER CRL files checked against each certificate of a chain.
    crl_files: tuple[str, ...] = ()
    #: A PASSporT older (``iat``) than this is ``stale``; one this far in the future too.
    max_age_s: Annotated[int, Field(gt=0, le=3600)] = 60
    clock_skew_s: Annotated[int, Field(ge=0, le=300)] = 5
    #: Certificate (x5u) fetches: plain http allowed, the private/loopback/link-local
    #: networks allowed as targets (an attacker writes the URL: keep both off in
    #: production), a size cap and the fetch's own time limit (it goes on in the
    #: background when a call stops waiting for it).
    allow_http: bool = False
    allow_networks: tuple[IPvAnyNetwork, ...] = ()
    max_cert_bytes: Annotated[int, Field(gt=0, le=1_048_576)] = 16 * 1024
    fetch_timeout_ms: Annotated[int, Field(gt=0, le=60_000)] = 2000
    #: Extra CA file for the TLS of certificate servers (besides the system's).
    fetch_ca_file: str | None = None
    #: Certificate cache lifetime when the server sends no Cache-Control/Expires, and
    #: the bounds put on what it sends.
    cache_default_s: Annotated[int, Field(gt=0)] = 3600
    cache_min_s: Annotated[int, Field(ge=0)] = 60
    cache_max_s: Annotated[int, Field(gt=0)] = 86_400
    #: A failed fetch is not retried for this long (the call answers cert_unavailable).
    negative_cache_s: Annotated[int, Field(ge=0, le=3600)] = 30
    #: Verification results kept per worker, by Identity header value (retries).
    results_cache_size: Annotated[int, Field(ge=0, le=1_000_000)] = 4096
    #: Signature checks in a helper process beside each worker (core/es256.py):
    #: ``auto`` when this host has more cores than workers, ``always`` or ``never``.
    signature_helper: Literal["auto", "always", "never"] = "auto"

    @model_validator(mode="after")
    def _cache_bounds(self) -> StirSettings:
        if not self.cache_min_s <= self.cache_default_s <= self.cache_max_s:
            raise ValueError("need cache_min_s <= cache_default_s <= cache_max_s")
        return self


class Config(_Model):
    redis: RedisSettings = RedisSettings()
    server: ServerSettings = ServerSettings()
    handler: HandlerSettings = HandlerSettings()
    cache: CacheSettings = CacheSettings()
    caller: CallerSettings = CallerSettings()
    admin: AdminSettings = AdminSettings()
    audit: AuditSettings = AuditSettings()
    history: HistorySettings = HistorySettings()
    #: Authentication of the screening endpoints (off unless set).
    auth: AuthSettings = AuthSettings()
    loader: LoaderSettings = LoaderSettings()
    stir: StirSettings = StirSettings()
    lists: dict[str, ListSpec] = {}
    policies: dict[str, Policy] = {"default": Policy()}
    #: Policy for ``POST /``.
    default_policy: str = "default"
    trunk_groups: dict[str, TrunkGroup] = {}
    #: Folder that relative list sources are resolved against (the config file's).
    base_dir: Path = Path(".")

    @field_validator("lists")
    @classmethod
    def _list_names(cls, lists: dict[str, ListSpec]) -> dict[str, ListSpec]:
        for name in lists:
            if not LIST_NAME_RE.fullmatch(name):
                raise ValueError(f"list name {name!r}: use 1-64 of a-z, 0-9, '_' or '-'")
        return lists

    @field_validator("trunk_groups")
    @classmethod
    def _trunk_group_names(cls, groups: dict[str, TrunkGroup]) -> dict[str, TrunkGroup]:
        for name in groups:
            if not LIST_NAME_RE.fullmatch(name):
                raise ValueError(f"trunk group name {name!r}: use 1-64 of a-z, 0-9, '_' or '-'")
        return groups

    def resolve_source(self, source: str) -> str:
        """A list source as a URL or an absolute path."""
        if "://" in source:
            return source
        path = Path(source)
        return str(path if path.is_absolute() else self.base_dir / path)


def _cross_check(config: Config) -> list[tuple[str, str]]:
    """References between sections, which field validators cannot see."""
    problems: list[tuple[str, str]] = []
    if config.default_policy not in config.policies:
        problems.append(("default_policy", f"unknown policy {config.default_policy!r}"))
    for name, group in config.trunk_groups.items():
        if group.policy not in config.policies:
            problems.append((f"trunk_groups.{name}.policy", f"unknown policy {group.policy!r}"))
    for pname, policy in config.policies.items():
        for i, rule in enumerate(policy.rules):
            if rule.unless_list is not None:
                spec = config.lists.get(rule.unless_list)
                where = f"policies.{pname}.rules[{i}].unless_list"
                if spec is None:
                    problems.append((where, f"unknown list {rule.unless_list!r}"))
                elif spec.kind != "numbers":
                    problems.append(
                        (
                            where,
                            f"list {rule.unless_list!r} is {spec.kind!r}; "
                            "unless_list needs 'numbers'",
                        )
                    )
            if rule.list is None:
                continue
            where = f"policies.{pname}.rules[{i}].list"
            spec = config.lists.get(rule.list)
            if spec is None:
                problems.append((where, f"unknown list {rule.list!r}"))
            elif spec.kind != MATCH_LIST_KIND[rule.match]:
                want = MATCH_LIST_KIND[rule.match]
                problems.append(
                    (where, f"list {rule.list!r} is {spec.kind!r}; {rule.match} needs {want!r}")
                )
    return problems


def _key_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + part
    return path or "(top level)"


def parse_config(data: Any, *, source: str = "config", base_dir: Path | None = None) -> Config:
    """Validate a decoded config mapping; raise :class:`ConfigError` naming each problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: (top level): expected a mapping of settings")
    data = dict(data)
    env_url = os.environ.get(REDIS_URL_ENV)
    if env_url:
        data["redis"] = {**(data.get("redis") or {}), "url": env_url}
    if base_dir is not None:
        data["base_dir"] = base_dir
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: {_key_path(tuple(err['loc']))}: {err['msg']}" for err in exc.errors()]
        raise ConfigError("\n".join(lines)) from None
    problems = _cross_check(config)
    if problems:
        raise ConfigError("\n".join(f"{source}: {path}: {msg}" for path, msg in problems))
    return config


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    # The folder of the path given, symlinks kept: a Kubernetes ConfigMap's config.yaml
    # is a symlink into a folder the kubelet replaces at each change, and a base_dir
    # moving with it would read as a change of every list (a worker restart).
    return parse_config(data, source=str(path), base_dir=path.absolute().parent)
