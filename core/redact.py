"""Hiding secrets in URLs and free text, for logs, error messages and API answers.

:func:`redact` hides a URL's userinfo password (or the whole userinfo when it has none)
and credential-named parameters (:data:`CREDENTIAL_NAME`); :func:`redact_text` does
that for every URL in any text, plus ``/k/<secret>`` segments, ``name=value`` secrets
and ``Authorization`` values; :class:`RedactingFilter` applies it to aiohttp's records
and to records carrying an exception. Both err on the side of hiding and never raise.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote

MASK = "***"

#: Parameter names that hold credentials: a case-insensitive search, so ``api_key``,
#: ``apikey``, ``access_token``, ``X-Amz-Signature``, ``sentinel_password`` all match.
CREDENTIAL_NAME = re.compile(r"key|token|secret|pass|pwd|auth|sig|credential|session", re.I)

# A parameter separator is kept as it was, so the redacted URL reads like the original.
_PARAM_SEPARATOR = re.compile(r"([&;])")

# Header lines (``Authorization : Basic x``, or quoted by aiohttp as
# ``b'authorization:Basic\tx\x01'``): the value up to the end of the line is hidden,
# keeping its scheme word and a closing quote. A backslash-t is a tab as repr() writes it.
_SECRET_HEADER = re.compile(
    r"(?i)\b((?:proxy-)?authorization|cookie|set-cookie|x-api-key|x-auth-token)"
    r"((?:[ \t]|\\t)*:(?:[ \t]|\\t)*)"
    r"(?:([a-z][\w-]*)((?:[ \t]|\\t)+))?"
    r"[^\r\n]*?(['\"]?)(?=[\r\n]|\Z)"
)
# ``Basic <credentials>`` on its own: aiohttp's pure-Python parser quotes just the value
# of a bad header line. The look-ahead spares ``Basic realm="x"`` challenges.
_SCHEME_CREDENTIAL = re.compile(
    r"(?i)\b(basic|bearer)((?:[ \t]|\\t)+)[A-Za-z0-9._~+/-]+=*(?![\w=\"~+/.-])"
)
# The scheme's length is bounded so that text like "a.b.c.d..." costs linear time.
_URL = re.compile(r"(?i)\b[a-z][a-z0-9+.-]{0,31}://[^\s'\"<>`]+")
_SECRET_SEGMENT = re.compile(r"/k/[^/\s?#'\"<>]+")
# Punctuation closing a sentence ("... from https://h/x?key=v: HTTP 503") stays shown.
_TRAILING = ".,:;)!?"
# Every name=value pair, each name taken whole (the look-behind starts it at the start
# of its run of name characters), so matching stays linear on hostile input; whether
# the name is a credential's is decided outside the expression.
_PARAM = re.compile(r"(?<![\w.%-])([\w.%-]+)=([^&\s'\"<>#]+)")


def _is_credential(name: str) -> bool:
    return CREDENTIAL_NAME.search(unquote(name)) is not None


def _redact_params(text: str) -> str:
    """``a=1&api_key=x`` -> ``a=1&api_key=***`` (``;`` separates as well)."""
    parts = _PARAM_SEPARATOR.split(text)
    for i in range(0, len(parts), 2):
        name, eq, value = parts[i].partition("=")
        if eq and value and _is_credential(name):
            parts[i] = f"{name}={MASK}"
    return "".join(parts)


def redact(url: str) -> str:
    """``url`` with its userinfo password and credential parameters replaced by ``***``."""
    head, sep, rest = url.partition("://")
    if not sep:
        head, rest = "", url
    main, hash_, fragment = rest.partition("#")
    before_query, question, query = main.partition("?")
    # The last "@" ends the userinfo even when an unencoded password holds a "/".
    if sep and "@" in before_query:
        creds, _, tail = before_query.rpartition("@")
        user, colon, _ = creds.partition(":")
        before_query = f"{user}:{MASK}@{tail}" if colon else f"{MASK}@{tail}"
    if query:
        query = _redact_params(query)
    if fragment:  # OAuth implicit grants put access_token=... here
        fragment = _redact_params(fragment)
    return f"{head}{sep}{before_query}{question}{query}{hash_}{fragment}"


def _header(match: re.Match[str]) -> str:
    name, colon, scheme, gap, quote = match.groups()
    return f"{name}{colon}{scheme or ''}{gap or ''}{MASK}{quote}"


def _url(match: re.Match[str]) -> str:
    url = match.group()
    bare = url.rstrip(_TRAILING)
    return redact(bare) + url[len(bare) :]


def _param(match: re.Match[str]) -> str:
    name, value = match.groups()
    if not _is_credential(name):
        return match.group()
    bare = value.rstrip(_TRAILING)
    return f"{name}={MASK}{value[len(bare) :]}" if bare else match.group()


def redact_text(text: str) -> str:
    """``text`` with URLs, ``/k/<secret>``, ``key=...`` and auth header values hidden."""
    text = _SECRET_HEADER.sub(_header, text)
    text = _SCHEME_CREDENTIAL.sub(rf"\1\2{MASK}", text)
    text = _URL.sub(_url, text)
    text = _SECRET_SEGMENT.sub(f"/k/{MASK}", text)
    return _PARAM.sub(_param, text)


_EXCEPTION_FORMATTER = logging.Formatter()


class RedactingFilter(logging.Filter):
    """Passes log records through :func:`redact_text`; never drops one.

    By default only records of aiohttp's loggers and records carrying an exception are
    rewritten: the service logs a line per rejected call, and those lines hold nothing
    secret, so they skip the regular expressions. ``everything=True`` rewrites all
    records (the loader, whose few lines quote sources and their errors).
    """

    def __init__(self, *, everything: bool = False) -> None:
        super().__init__()
        self.everything = everything

    def filter(self, record: logging.LogRecord) -> bool:
        carries_exception = bool(record.exc_info or record.exc_text)
        name = record.name
        if self.everything or carries_exception or name.startswith("aiohttp"):
            _redact_record(record)
        return True


def _redact_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a broken format string: the handler reports it as usual
        message = None
    if message is not None:
        record.msg = redact_text(message)
        record.args = None
    # Standard formatters print exc_text when it is set instead of formatting exc_info.
    if record.exc_info:
        record.exc_text = redact_text(_EXCEPTION_FORMATTER.formatException(record.exc_info))
    elif record.exc_text:
        record.exc_text = redact_text(record.exc_text)
    if record.stack_info:
        record.stack_info = redact_text(record.stack_info)
