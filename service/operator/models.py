"""The bodies of the HTTP API as pydantic models, which are also its OpenAPI schemas.

:mod:`service.operator.openapi` builds the document from them; the admin API validates
its bulk changes with them and builds its answers from them, so it answers what the
document says. The screening, explain and single-subscriber answers are built without
them on the hot path and checked against them by schemathesis. A docstring becomes the
schema's ``description``; a field left ``None`` is dropped from the answer
(:func:`answer`), not sent as ``null``.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import inspect
import itertools
import textwrap
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_type_hints

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    create_model,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema, WithJsonSchema
from pydantic_core import PydanticCustomError

from core import store
from core.config import Action, Attestation, CallerSource, ListKind, StirReason, StirResult
from core.keys import LIST_NAME_RE

ListName = Annotated[str, Field(pattern=f"^{LIST_NAME_RE.pattern}$")]
#: An optional field of an error: absent from the answer when not set.
Absent = SkipJsonSchema[None]
#: Longest expiry an admin overlay entry may be given (a year).
MAX_OVERLAY_TTL_S = 31_536_000
#: An entry of a bulk change: a string, checked one by one with its canonical form
#: (service/operator/admin.py), so every bad one is reported by its index. Were the model to check
#: the type, a body of 100 k numbers would cost 100 k error objects built in one go, a
#: stall of about 0.15 s for every call the worker is answering.
BulkEntry = Annotated[Any, WithJsonSchema({"type": "string"})]
NOTHING_TO_CHANGE = 'nothing to change: give "add" and/or "remove" entries'


class _Body(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)


def answer(body: BaseModel) -> bytes:
    """``body`` as JSON, without the optional fields it did not set."""
    return body.model_dump_json(exclude_unset=True).encode()


# --- screening and explain --------------------------------------------------------------
class SipHeaders(RootModel[dict[str, list[Any]]]):
    """The call's SIP headers as CarrierX sends them: header name -> values."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "From": [{"user": "15162065613", "host": "10.1.10.190", "name": "John Smith"}],
                    "To": [{"user": "19512623062", "host": "10.1.10.190:5060"}],
                }
            ]
        }
    )


class RejectAction(_Body):
    action: Literal["reject"]
    operands: tuple[str, str]
    """[reason, tag], e.g. ["unavailable", "aniblock"]."""


class Actions(RootModel[Annotated[list[RejectAction], Field(max_length=1)]]):
    """`[]` lets the call continue; a reject action blocks it."""


class DryRunMatch(_Body):
    rule: str
    list: str | None
    matched: str


class Caller(_Body):
    """The caller as parsed and normalised."""

    number: str | None
    """Canonical digits (E.164 without "+"); null: no usable number."""
    source: CallerSource | None
    """The header the number came from."""
    user: str | None
    """The user part as sent."""
    name: str | None
    anonymous: bool
    invalid_number: bool
    verstat: str | None


class StirCheck(_Body):
    check: str
    """decode, certificate, signature, freshness, orig.tn, dest.tn, tn_auth, verstat."""
    outcome: Literal["ok", "failed", "skipped"]
    detail: str | None


class StirPassport(_Body):
    """The PASSporT as decoded (its signature may not have verified)."""

    header: dict[str, Any]
    payload: dict[str, Any]


class Stir(_Body):
    """The call's STIR/SHAKEN verification (docs/stir-shaken.md)."""

    result: StirResult
    reason: StirReason | None
    attest: Attestation | None
    origid: str | None
    basis: Literal["signature", "verstat"]
    """``verstat``: the policy trusted the upstream's verstat instead of the signature."""
    passport: StirPassport | None
    checks: builtins.list[StirCheck]


class Explanation(_Body):
    """Why a call would be blocked or allowed."""

    decision: Action
    answer: Actions
    """What the screening endpoint would answer."""
    trunk_group: str | None
    policy: str
    rule: str
    """The rule that decided, or "default" / "on_error"."""
    list: str | None
    matched: str | None
    """The list entry or fact that matched."""
    overlay: bool | None
    """On a list with a source: true when the matched entry is an admin overlay add
    (kept across syncs), false when it came from the source; null otherwise."""
    on_error: str | None
    """Why `on_error` answered instead of the lists; null when the lists decided."""
    dry_run_matches: builtins.list[DryRunMatch]  # builtins: "list" is a field here
    caller: Caller
    called: str | None
    stir: Stir | None
    """Null when verification is not set up (no ``stir.trust_anchors``, no stir rule)."""
    call_id: str | None


class LoadedCopy(_Body):
    """A list as this instance holds it."""

    entries: int
    gen: int
    version: int


class Health(_Body):
    status: Literal["ok"]


class Ready(_Body):
    """The handler port's readiness, beside an operator listener: the details are there."""

    ready: bool


class ReloadStarted(_Body):
    reloading: Literal[True]
    file: str
    """The config file being re-read."""


class ReloadRefused(_Body):
    error: str
    problems: list[str]
    """Each problem: file, key path and message."""


class Readiness(_Body):
    ready: bool
    reasons: list[str]
    """Why not ready; empty when ready."""
    lists: dict[str, LoadedCopy]


# --- admin ------------------------------------------------------------------------------
class BulkChange(_Body):
    """Entries to add and to remove in one step, all or nothing; at least one entry."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "minProperties": 1,
            "examples": [{"add": ["+1 516 206 5617"], "remove": ["15162065613"]}],
        },
    )

    add: list[BulkEntry] = []
    remove: list[BulkEntry] = []
    ttl_s: Annotated[float, Field(gt=0, le=MAX_OVERLAY_TTL_S)] | Absent = None
    """On a list with a source: the admin overlay entries expire after this long (they
    survive syncs until then); none: they last until changed."""

    @model_validator(mode="after")
    def _not_empty(self) -> BulkChange:
        if not self.add and not self.remove:
            raise PydanticCustomError("nothing_to_change", NOTHING_TO_CHANGE)
        return self


class BulkResult(_Body):
    list: ListName
    added: int
    removed: int
    version: int
    """The list's version after the change."""


class EntryState(_Body):
    """The entry (canonical form) and whether it is on the list."""

    list: ListName
    entry: str
    listed: bool
    version: int | Absent = None
    """After a write: the list's version."""
    overlay: Literal["add", "remove"] | None = None
    """A list with a source: the entry is kept across syncs as an admin add or removal
    (the admin overlay); null: the source decides it."""
    expires_at: float | None = None
    """When the overlay entry expires (Unix time); null: never."""


class NotListed(EntryState):
    """The entry (canonical form) is not on the list."""

    listed: Literal[False]
    error: Literal["not on the list"]


def _view_of(stored: type[Any], omit: frozenset[str], doc: str) -> type[_Body]:
    """A model of the dataclass ``stored``'s fields less ``omit``: one declaration, in core."""
    hints = get_type_hints(stored)
    described = _attribute_docstrings(stored)
    fields: dict[str, Any] = {
        field.name: (hints[field.name], Field(description=described.get(field.name)))
        for field in dataclasses.fields(stored)
        if field.name not in omit
    }
    model: type[_Body] = create_model(stored.__name__, __base__=_Body, __doc__=doc, **fields)
    return model


def _attribute_docstrings(cls: type[Any]) -> dict[str, str]:
    """``{field: docstring}`` for the fields of ``cls`` followed by a string literal."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    assert isinstance(body, ast.ClassDef)
    found = {}
    for field, after in itertools.pairwise(body.body):
        if (
            isinstance(field, ast.AnnAssign)
            and isinstance(field.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            found[field.target.id] = inspect.cleandoc(after.value.value)
    return found


if TYPE_CHECKING:

    class ListMeta(_Body):
        """Fields as in :class:`core.store.ListMeta` (made from it below, at run time)."""

        def __init__(self, **fields: Any) -> None: ...
else:
    ListMeta = _view_of(
        store.ListMeta,
        frozenset({"name", "kind"}),  # in ListInfo already
        "As stored in Redis by the last sync and changes.",
    )


class OverlayCounts(_Body):
    """The admin overlay of a list with a source: entries kept across syncs."""

    adds: int
    dels: int


class ListInfo(_Body):
    name: ListName
    kind: ListKind
    description: str
    source: str | None
    interval_s: int | None
    meta: ListMeta | None
    """null: never written."""
    loaded: LoadedCopy | None
    """This instance's copy; null: not loaded."""
    overlay: OverlayCounts | Absent = None
    """A list with a source: its admin overlay."""


class Lists(_Body):
    lists: list[ListInfo]


class SubscriberOverlayEntry(_Body):
    """One admin write of a subscriber kept across syncs of a list with a source."""

    entry: str
    side: Literal["block", "allow"]
    change: Literal["add", "remove"]
    expires_at: float | None = None
    """When it expires (Unix time); null: never."""


class SubscriberEntries(_Body):
    """One subscriber's entries: numbers, then prefixes ending in `*`."""

    list: ListName
    subscriber: str
    """The subscriber, normalised."""
    gen: int
    """The list's live generation; 0: nothing was ever written."""
    block: builtins.list[str]  # builtins: "list" is a field here
    allow: builtins.list[str]
    lost: bool
    """True when Redis lost the subscriber's bucket (its marker is missing): the entries
    shown are only those written since, and calls to it are answered by on_error until
    a full sync (or `loader run`'s self-healing) writes the bucket again."""
    overlay: builtins.list[SubscriberOverlayEntry] | Absent = None
    """A list with a source: the subscriber's admin writes kept across syncs (the admin
    overlay), each an entry put on (`add`) or taken off (`remove`) a side."""


class SubscriberAdd(_Body):
    """Put `entry` on a side of `subscriber` (the other side is left alone)."""

    model_config = ConfigDict(extra="forbid")

    subscriber: str
    """The subscriber (a called number), in any common format."""
    entry: str
    """A number (any common format) or a prefix ending in `*`."""
    side: Literal["block", "allow"] = "block"


class SubscriberRemove(_Body):
    """Remove `entry` from one side of `subscriber` (the other side is left alone)."""

    model_config = ConfigDict(extra="forbid")

    subscriber: str
    entry: str
    side: Literal["block", "allow"] = "block"


#: An item of a subscribers bulk change: checked one by one against its model
#: (service/operator/subscribers.py), like :data:`BulkEntry`, so that every bad item is
#: reported by its index and a body of 100 k items is not validated in one stall.
SubscriberAddItem = Annotated[Any, WithJsonSchema({"$ref": "#/components/schemas/SubscriberAdd"})]
SubscriberRemoveItem = Annotated[
    Any, WithJsonSchema({"$ref": "#/components/schemas/SubscriberRemove"})
]


class SubscriberBulkChange(_Body):
    """Entries of many subscribers to add and to remove in one request; at least one.

    Checked whole before anything is written: any bad item, a pair both added and
    removed, or a subscriber taken past 100 entries, and nothing changes.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "minProperties": 1,
            "examples": [
                {
                    "add": [
                        {"subscriber": "19512623062", "entry": "1900*"},
                        {"subscriber": "19512623062", "entry": "911", "side": "allow"},
                    ],
                    "remove": [{"subscriber": "19512623063", "entry": "15165550102"}],
                }
            ],
        },
    )

    add: list[SubscriberAddItem] = []
    remove: list[SubscriberRemoveItem] = []
    ttl_s: Annotated[float, Field(gt=0, le=MAX_OVERLAY_TTL_S)] | Absent = None
    """On a list with a source: the admin overlay pairs expire after this long (they
    survive syncs until then); none: they last until changed."""

    @model_validator(mode="after")
    def _not_empty(self) -> SubscriberBulkChange:
        if not self.add and not self.remove:
            raise PydanticCustomError("nothing_to_change", NOTHING_TO_CHANGE)
        return self


class SubscriberBulkResult(_Body):
    list: ListName
    gen: int
    """The generation written (0: nothing was ever written to the list)."""
    added: int
    """Pairs (subscriber, entry) put on a side, duplicates counted once."""
    removed: int
    """Pairs asked to be removed, duplicates counted once."""
    subscribers: int
    """Distinct subscribers the change named."""


class BadEntryReport(_Body):
    field: Literal["add", "remove"]
    index: Annotated[int, Field(ge=0)]
    entry: str | Absent = None
    """Absent when the item is not a string (or, for subscribers, has no string entry)."""
    subscriber: str | Absent = None
    """A subscribers bulk change: the item's subscriber, when a string."""
    error: str


class Error(_Body):
    error: str
    entry: str | Absent = None
    """The bad entry as given (at most 200 characters)."""
    entries: list[str] | Absent = None
    """Entries both added and removed (`subscriber:entry` for a subscribers list)."""
    bad_entries: list[BadEntryReport] | Absent = None
    """Each bad entry of a bulk change (the first 100)."""
