"""The admin routes' side of the audit trail (:mod:`core.audit`): one call per change.

A change is recorded after Redis acknowledged it, with the token's name (never its
secret), the client's address (through ``auth.trusted_proxies`` as for the screening
endpoints), the list and entry or counts, the version before and after, and the
``reason`` the request gave (``?reason=``, at most :data:`MAX_REASON_CHARS`).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from core.audit import AuditLog, AuditRecord
from service.appkeys import AUTH, CONFIG, REDIS
from service.operator.tokens import token_of

MAX_REASON_CHARS = 500


def client_of(request: web.Request) -> str:
    """The client's address as the audit trail names it."""
    address = request.app[AUTH].default.client_address(request)
    return str(address) if address is not None else (request.remote or "unknown")


def reason_of(request: web.Request) -> str | None:
    reason = request.query.get("reason", "").strip()
    return reason[:MAX_REASON_CHARS] or None


def audit_log(app: web.Application) -> AuditLog:
    return AuditLog(app[REDIS], app[CONFIG].audit)


async def audit_change(
    request: web.Request,
    action: str,
    list_name: str | None,
    version_after: int | None,
    *,
    version_step: int = 1,
    **fields: Any,
) -> None:
    """Record one change the request made; ``version_after - version_step`` was before.

    Every list write bumps the list's ``version`` by exactly one (core/store.py); a
    subscribers write reports its generation instead (``version_step=0``).
    """
    token = token_of(request)
    before = None if version_after is None else version_after - version_step
    record = AuditRecord(
        action=action,
        actor=token.name if token is not None else "-",
        client=client_of(request),
        list=list_name,
        version_before=before,
        version_after=version_after,
        reason=reason_of(request),
        **fields,
    )
    await audit_log(request.app).append(record)
