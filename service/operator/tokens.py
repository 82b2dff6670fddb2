"""Named admin tokens and their roles (docs/security.md, "Admin tokens").

Entries come from ``admin.tokens_env`` (comma-separated) and ``admin.tokens_file`` (one
a line): ``name:role:secret`` with ``role`` one of ``read``, ``admin`` or
``editor=SCOPE[+SCOPE...]`` (a list name or ``tg/<trunk group>``), or a bare secret (an
``admin`` token named ``admin-<n>``). Roles rank ``read`` < ``editor`` < ``admin``.
Secrets are kept as SHA-256 digests and compared in constant time with every token;
:meth:`AdminTokens.reload` reads both sources again, and a bad entry keeps the old set.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from aiohttp import web

from core.config import Config, ConfigError
from core.keys import LIST_NAME_RE

logger = logging.getLogger(__name__)

Role = Literal["read", "editor", "admin"]
RANK: dict[str, int] = {"read": 0, "editor": 1, "admin": 2}
_NAME_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
#: Tokens shorter than this are accepted but logged as weak.
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True, slots=True)
class Token:
    """One admin token: its name, role, editor scope and the digest of its secret."""

    name: str
    role: Role
    digest: bytes
    #: Lists an ``editor`` may change (trunk group scopes already expanded).
    lists: frozenset[str] = frozenset()
    #: The scope as written, for answers and the console.
    scope: tuple[str, ...] = ()

    def may(self, need: Role, list_name: str | None = None) -> bool:
        """May this token do what needs role ``need`` (on ``list_name``, for an edit)?"""
        if RANK[self.role] < RANK[need]:
            return False
        if self.role == "editor" and need == "editor":
            return list_name is not None and list_name in self.lists
        return True


#: Where the admin guard puts the token that passed (read by the audit trail).
REQUEST_TOKEN = web.RequestKey("admin_token", Token)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _scope_lists(config: Config, scope: str, where: str) -> frozenset[str]:
    if scope.startswith("tg/"):
        group = config.trunk_groups.get(scope[3:])
        if group is None:
            raise ConfigError(f"{where}: editor scope {scope!r}: unknown trunk group")
        rules = config.policies[group.policy].rules
        return frozenset(rule.list for rule in rules if rule.list)
    if not LIST_NAME_RE.fullmatch(scope) or scope not in config.lists:
        raise ConfigError(f"{where}: editor scope {scope!r}: unknown list")
    return frozenset([scope])


def _fields(entry: str) -> tuple[str, Role, str, str] | None:
    """``(name, role, scope, secret)`` of a named entry; None for a bare secret."""
    name, _, rest = entry.partition(":")
    role, _, secret = rest.partition(":")
    role, _, scope = role.partition("=")
    if not secret or _NAME_RE.fullmatch(name) is None or role not in RANK:
        return None
    return name, role, scope, secret  # type: ignore[return-value]


def parse_entry(config: Config, entry: str, where: str, bare_index: int) -> Token:
    """One token entry (see the module docstring); ``where`` names it in errors.

    An entry whose first two fields are not a name and a role is a bare secret, so that
    tokens made before roles keep working whatever they hold.
    """
    fields = _fields(entry)
    if fields is None:
        return Token(f"admin-{bare_index}", "admin", _digest(entry))
    name, role, scope_text, secret = fields
    if role == "editor" and not scope_text:
        raise ConfigError(f"{where}: token {name!r}: editor needs a scope, editor=LIST[+LIST]")
    if role != "editor" and scope_text:
        raise ConfigError(f"{where}: token {name!r}: only an editor takes a scope")
    scope = tuple(s for s in scope_text.split("+") if s)
    lists = frozenset().union(*(_scope_lists(config, s, f"{where}: token {name!r}") for s in scope))
    return Token(name, role, _digest(secret), lists, scope)


def _entries(text: str, separator: str) -> list[str]:
    lines = (line.split("#", 1)[0] if separator == "\n" else line for line in text.split(separator))
    return [entry.strip() for entry in lines if entry.strip()]


def read_tokens(config: Config, environ: Mapping[str, str] | None = None) -> tuple[Token, ...]:
    """Every token of the variable and the file; ConfigError for a bad entry or file."""
    env = os.environ if environ is None else environ
    sources: list[tuple[str, list[str]]] = [
        (config.admin.tokens_env, _entries(env.get(config.admin.tokens_env, ""), ","))
    ]
    if config.admin.tokens_file:
        path = Path(config.admin.tokens_file)
        if not path.is_absolute():
            path = config.base_dir / path
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"admin.tokens_file: cannot read {path}: {exc.strerror}") from None
        sources.append((str(path), _entries(text, "\n")))
    tokens: list[Token] = []
    bare = 0  # numbered across sources, so that names stay unique
    for where, entries in sources:
        for index, entry in enumerate(entries, 1):
            fields = _fields(entry)
            bare += fields is None
            tokens.append(parse_entry(config, entry, f"{where} entry {index}", bare))
            if len(entry if fields is None else fields[3]) < MIN_TOKEN_CHARS:
                logger.warning(
                    "admin token %r (%s) is shorter than %d characters; use long random tokens",
                    tokens[-1].name, where, MIN_TOKEN_CHARS,
                )  # fmt: skip
    names = [t.name for t in tokens]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"admin tokens: names must be unique, repeated: {', '.join(repeated)}")
    return tuple(tokens)


class AdminTokens:
    """The current token set, replaced whole by :meth:`reload`."""

    def __init__(self, config: Config, environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.tokens = read_tokens(config, environ)

    def reload(self, environ: Mapping[str, str] | None = None) -> tuple[Token, ...]:
        """Read the tokens again; on a bad entry or file keep the old ones and raise."""
        self.tokens = read_tokens(self.config, environ)
        logger.info("admin tokens reloaded: %d tokens", len(self.tokens))
        return self.tokens

    def find(self, credential: str) -> Token | None:
        """The token whose secret is ``credential``; every token is compared."""
        digest = _digest(credential)
        found = None
        for token in self.tokens:
            if hmac.compare_digest(digest, token.digest):
                found = token
        return found


def required(request: web.Request) -> tuple[Role, str | None]:
    """The role a request needs and the list it changes: reads need ``read``, a write
    to a list ``editor`` for that list, any other write ``admin``."""
    if request.method in ("GET", "HEAD"):
        return "read", None
    name = request.match_info.get("name")
    return ("editor", name) if name else ("admin", None)


def missing_role(token: Token, need: Role, list_name: str | None) -> str:
    """The 403 message for a token that may not do what needs ``need``."""
    if token.role == "editor" and need == "editor":
        scope = "+".join(token.scope)
        return (
            f"token {token.name!r} is an editor of {scope} only; list {list_name!r} needs "
            f"role 'editor' for it, or 'admin'"
        )
    wanted = " or ".join(repr(r) for r in RANK if RANK[r] >= RANK[need])
    return f"token {token.name!r} has role {token.role!r}; this needs role {wanted}"


def token_of(request: web.Request) -> Token | None:
    """The admin token a guarded request came with (None: not guarded)."""
    return request.get(REQUEST_TOKEN)
