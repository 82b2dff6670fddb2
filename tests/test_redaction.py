"""Secrets never reach logs or API answers: the redaction functions, then real processes."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest
import yaml
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from core.connect import redact as redact_from_connect
from core.logs import LogFormat, configure_logging
from core.redact import RedactingFilter, redact, redact_text
from core.store import ListStore
from devtools.redis_server import RedisProcess
from tests.helpers import wait_for
from tests.procs import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent
SECRET = "hs-7Qx93LmZp"
USER = "carrierx"
PASSWORD = "pw-Vr83Kq1Tz"
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://u:pw@host/x.csv", "https://u:***@host/x.csv"),
        ("https://token@host/x.csv", "https://***@host/x.csv"),
        ("redis://user:p/w@h:6379/0", "redis://user:***@h:6379/0"),
        (
            "https://lists.example.com/x.csv?api_key=S1&token=S2",
            "https://lists.example.com/x.csv?api_key=***&token=***",
        ),
        (
            "https://h/x?format=csv&apikey=a&Access_Token=b&X-Amz-Signature=c&key=d&page=2",
            "https://h/x?format=csv&apikey=***&Access_Token=***&X-Amz-Signature=***&key=***&page=2",
        ),
        (
            "https://h/x?password=a;passwd=b;pwd=c&auth=d&sig=e&credential=f&sessionid=g",
            "https://h/x?password=***;passwd=***;pwd=***&auth=***&sig=***&credential=***"
            "&sessionid=***",
        ),
        ("https://h/x?client%5Fsecret=a&empty_key=", "https://h/x?client%5Fsecret=***&empty_key="),
        ("https://h/cb#access_token=a&state=1", "https://h/cb#access_token=***&state=1"),
        ("https://h/x.csv?version=3", "https://h/x.csv?version=3"),
        ("/srv/lists/blocklist.csv", "/srv/lists/blocklist.csv"),
    ],
)
def test_redact_hides_passwords_and_credential_parameters(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert redact(shown) == shown
    assert redact_from_connect(url) == shown  # still importable where it used to live


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (
            "synced blocklist: 5 entries from https://u:pw@h/x.csv?api_key=S1 (5 rows read)",
            "synced blocklist: 5 entries from https://u:***@h/x.csv?api_key=*** (5 rows read)",
        ),
        (
            "source unreachable: http://h/x.csv?token=S1: HTTP 503 (3 attempts)",
            "source unreachable: http://h/x.csv?token=***: HTTP 503 (3 attempts)",
        ),
        # As aiohttp's C parser quotes a bad request line, header line, method.
        (
            "b'GET /tg/main?key=S1 x HTTP/1.1'",
            "b'GET /tg/main?key=*** x HTTP/1.1'",
        ),
        ("b'GET /k/S1/tg/main\\x01 HTTP/1.1'", "b'GET /k/***/tg/main\\x01 HTTP/1.1'"),
        ("b'G\\x00T /k/S1?key=S2 HTTP/1.1'", "b'G\\x00T /k/***?key=*** HTTP/1.1'"),
        ("b'Authorization : Basic dTpw'", "b'Authorization : Basic ***'"),
        ("b'authorization:Basic\\tdTpw\\x7f'", "b'authorization:Basic\\t***'"),
        ("b'Authorization: Basic dTpw\\rX'", "b'Authorization: Basic ***'"),
        # As the pure-Python parser quotes a bad header: the value alone.
        ("Invalid HTTP header: b'Basic dTpw=\\x01'", "Invalid HTTP header: b'Basic ***\\x01'"),
        ("Authorization: Bearer abc.def\nnext line", "Authorization: Bearer ***\nnext line"),
        ("Proxy-Authorization: xyz", "Proxy-Authorization: ***"),
        ("call(api_key=S1, sentinel_password=S2)", "call(api_key=***, sentinel_password=***)"),
        # Nothing secret: left alone.
        (
            'WWW-Authenticate: Basic realm="callscreen"',
            'WWW-Authenticate: Basic realm="callscreen"',
        ),
        ("rows_read=5 version=3 /tg/main", "rows_read=5 version=3 /tg/main"),
    ],
)
def test_redact_text_hides_urls_secret_segments_parameters_and_credentials(
    text: str, shown: str
) -> None:
    assert redact_text(text) == shown
    assert redact_text(shown) == shown


def test_redact_text_takes_hostile_input() -> None:
    for text in ("a." * 50_000, "key=" * 50_000, "Basic " * 50_000, "/k/" * 50_000, "\x00\ud800"):
        redact_text(text)  # no exception, and (checked by hand) linear time


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo configure_logging's changes to the root logger and the logging module."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging._srcfile, logging.logThreads)
    yield
    root.handlers[:], level, logging._srcfile, logging.logThreads = saved
    root.setLevel(level)


def log_line(name: str, exc: BaseException | None, log_format: LogFormat) -> str:
    """What the service's logging writes for one record of logger ``name``."""
    stream = io.StringIO()
    configure_logging("DEBUG", log_format, stream)
    logger = logging.getLogger(name)
    if exc is None:
        logger.info("request %s", f"/k/{SECRET}/tg/main?key={SECRET}")
        return stream.getvalue()
    try:
        raise exc
    except type(exc):
        logger.exception("Error handling request from %s", "127.0.0.1")
    return stream.getvalue()


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_log_filter_rewrites_aiohttp_records_and_exceptions(log_format: LogFormat) -> None:
    error = ValueError(f"b'GET /k/{SECRET}/tg?key={SECRET} HTTP/1.1' Authorization: Basic {BASIC}")
    for name in ("aiohttp.server", "service.screening.screen"):
        text = log_line(name, error, log_format)
        assert "ValueError" in text and "/k/***" in text
        assert SECRET not in text and BASIC not in text
        if log_format == "json":
            assert "/k/***" in orjson.loads(text)["exception"]
    assert SECRET not in log_line("aiohttp.web", None, log_format)
    # The service's own lines without an exception are not rewritten (nor paid for).
    assert SECRET in log_line("service.screening.screen", None, log_format)


def test_the_filter_never_drops_a_record_and_copes_with_a_broken_format() -> None:
    record = logging.LogRecord("aiohttp.server", logging.ERROR, "x", 1, "%d %s", ("x",), None)
    assert RedactingFilter().filter(record)
    everything = RedactingFilter(everything=True)
    plain = logging.LogRecord("loader", logging.INFO, "x", 1, "from %s", ("http://h/?key=a",), None)
    assert everything.filter(plain) and plain.getMessage() == "from http://h/?key=***"


# The service: aiohttp's own error lines for requests it cannot parse.

#: Malformed requests carrying the secret, in the path, the query and a Basic header.
BAD_REQUESTS = [
    f"GET /tg/main?key={SECRET} x HTTP/1.1\r\nHost: t\r\n\r\n",  # a space in the target
    f"GET /k/{SECRET}/tg/main\x01 HTTP/1.1\r\nHost: t\r\n\r\n",  # a control character
    f"GET /k/{SECRET}/tg/main?key={SECRET} HTTX/1.1\r\nHost: t\r\n\r\n",  # a bad version
    f"POST /tg/main?key={SECRET} HTTP/1.1\r\nHost: t\r\nAuthorization : Basic {BASIC}\r\n\r\n",
    f"POST /k/{SECRET}/tg/main HTTP/1.1\r\nAuthorization: Basic {BASIC}\x01\r\n\r\n",
    f"POST /tg/main HTTP/1.1\r\nauthorization:Basic\t{BASIC}\x7f\r\n\r\n",
    f"POST /tg/main HTTP/1.1\r\nAuthorization: Basic {BASIC}\rX\r\n\r\n",
    f"POST /k/{SECRET}/tg/main HTTP/1.1\r\nAuthorization: Basic {BASIC}\r\nBad Header\r\n\r\n",
    f"G\x00T /k/{SECRET}/tg/main?key={SECRET} HTTP/1.1\r\nAuthorization: Basic {BASIC}\r\n\r\n",
]
#: aiohttp logs an unknown method on a first request at DEBUG only.
DEBUG_ONLY = 1
AUTH_CONFIG = {"secret_env": "TEST_REDACT_SECRET", "basic_user": USER}
AUTH_CONFIG["basic_password_env"] = "TEST_REDACT_PASSWORD"
AUTH_ENV = {"TEST_REDACT_SECRET": SECRET, "TEST_REDACT_PASSWORD": PASSWORD}


async def send_raw(port: int, request: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request.encode("latin-1"))
        await writer.drain()
        return await reader.read()  # aiohttp answers 400 and closes
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.fixture(
    params=[("C", "INFO", "json"), ("C", "DEBUG", "text"), ("py", "DEBUG", "json")],
    ids=["c-parser-info-json", "c-parser-debug-text", "python-parser-debug-json"],
)
def guarded_service(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisProcess
) -> Iterator[ServiceProcess]:
    parser, level, log_format = request.param
    env = dict(AUTH_ENV)
    if parser == "py":
        env["AIOHTTP_NO_EXTENSIONS"] = "1"
    process = ServiceProcess(
        tmp_path,
        redis_server.url,
        args=("--log-level", level, "--log-format", log_format),
        overrides={"auth": AUTH_CONFIG},
        env=env,
    )
    yield process
    process.stop()


async def test_malformed_requests_never_log_the_secret_or_the_password(
    guarded_service: ServiceProcess,
) -> None:
    service = guarded_service
    service.start()
    await service.ready()
    for bad in BAD_REQUESTS:
        answer = await send_raw(service.port, bad)
        assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400"), bad
    # Well-formed requests with the secret too: answered, and logged without it.
    async with ClientSession() as session:
        for path in (f"/k/{SECRET}/tg/nope", f"/tg/main?key={SECRET}x", "/tg/main"):
            async with session.post(f"{service.url}{path}", data=b"{") as response:
                assert response.status in (400, 401, 404), path
    debug = "--log-level" in service.args and "DEBUG" in service.args
    expected = len(BAD_REQUESTS) - (0 if debug else DEBUG_ONLY)

    async def all_logged() -> bool:
        return service.log_text().count("Error handling request") >= expected

    await wait_for(all_logged, timeout_s=20.0)
    service.stop()
    log = service.log_text()
    assert "Bad status line" in log or "BadStatusLine" in log  # the errors are there...
    assert "/k/***" in log and "key=***" in log  # ...with the request lines redacted
    for secret in (SECRET, PASSWORD, BASIC, BASIC.rstrip("=")):
        assert secret not in log
    if "json" in service.args:
        assert all("time" in record for record in service.log_records())


# The admin API: list sources as configured.

LIST_URL = "https://lists.example.com/x.csv?api_key=SECRET1&token=SECRET2"


@pytest.fixture
def admin_service(
    tmp_path: Path, redis_server: RedisProcess, redis: Redis
) -> Iterator[ServiceProcess]:
    lists = {"blocklist": {"kind": "numbers", "source": LIST_URL}}
    # No rule uses the list, so the service is ready before any sync (see /readyz).
    policies = {"default": {"rules": [{"name": "shaken", "match": "attestation_failed"}]}}
    process = ServiceProcess(
        tmp_path,
        redis_server.url,
        overrides={"lists": lists, "policies": policies},
        env={"CALLSCREEN_ADMIN_TOKENS": "admin-token-1"},
    )
    yield process
    process.stop()


async def test_the_admin_api_shows_list_sources_redacted(admin_service: ServiceProcess) -> None:
    admin_service.start()
    await admin_service.ready()
    headers = {"Authorization": "Bearer admin-token-1"}
    async with ClientSession(headers=headers) as session:
        for path in ("/v1/lists", "/v1/lists/blocklist"):
            async with session.get(f"{admin_service.url}{path}") as response:
                assert response.status == 200, path
                text = await response.text()
            assert "lists.example.com/x.csv?api_key=***&token=***" in text
            assert "SECRET1" not in text and "SECRET2" not in text


# The loader: its log lines, its output, and the source it records in Redis.

CSV = b"number\n5162065613\n5162065614\n5162065615\n5162065616\n"


@pytest.fixture
async def list_server() -> AsyncIterator[TestServer]:
    async def serve(request: web.Request) -> web.Response:
        if request.match_info["name"] == "down.csv":
            return web.Response(status=503, text="busy")
        return web.Response(body=CSV, content_type="text/csv")

    app = web.Application()
    app.router.add_get("/{name}", serve)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


async def run_loader(config_file: Path, *args: str) -> tuple[int, str]:
    """Exit status and stdout + stderr of ``python -m loader``."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loader", "--config", str(config_file), *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode()


def loader_config(folder: Path, redis_url: str, source: str) -> Path:
    data = {
        "redis": {"url": redis_url},
        "loader": {"retry_backoff_s": 0.01},
        "lists": {"blocklist": {"kind": "numbers", "source": source, "retries": 1}},
        "policies": {
            "default": {"rules": [{"name": "bl", "match": "caller_in_list", "list": "blocklist"}]}
        },
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def test_the_loader_never_shows_source_credentials(
    redis: Redis, redis_server: RedisProcess, list_server: TestServer, tmp_path: Path
) -> None:
    base = str(list_server.make_url("/")).replace("http://", f"http://{USER}:{PASSWORD}@")
    query = f"?api_key=SECRET3&token=SECRET4&key={SECRET}"
    config = loader_config(tmp_path, redis_server.url, f"{base}list.csv{query}")
    outputs = []
    status, out = await run_loader(config, "--log-level", "DEBUG", "sync", "--dry-run")
    assert status == 0, out
    outputs.append(out)
    status, out = await run_loader(config, "sync")
    assert status == 0, out
    assert "synced blocklist: 4 entries from" in out and "api_key=***&token=***" in out
    outputs.append(out)
    assert await ListStore(redis).meta_fields("blocklist", "source") == {
        "source": f"{base.replace(PASSWORD, '***')}list.csv?api_key=***&token=***&key=***"
    }

    down = loader_config(tmp_path, redis_server.url, f"{base}down.csv{query}")
    status, out = await run_loader(down, "--log-level", "DEBUG", "sync")
    assert status == 1, out
    assert "source unreachable" in out and "HTTP 503" in out
    outputs.append(out)
    for text in outputs:
        for secret in ("SECRET3", "SECRET4", SECRET, PASSWORD):
            assert secret not in text, text
