"""The operator console in a real browser: Debian's headless Chromium driven by Playwright.

Playwright drives ``/usr/bin/chromium`` (``executable_path``); its own browser downloads
are never used. Without Chromium the tests are skipped, except in CI (``CI`` set), where
``.ci/run`` installs it and a missing browser fails. ``CALLSCREEN_SCREENSHOTS=docs``
writes each page's screenshot to docs/console-*.png (how those files are made).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import Page, async_playwright, expect
from redis.asyncio import Redis

from core.config import Config
from loader.sync import SyncOptions, sync_list
from service.operator.admin import ADMIN_TOKENS
from tests.helpers import REJECT, body_from, wait_for

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN = "console-admin-secret-0123456789"
EDITOR = "console-editor-secret-0123456789"
READER = "console-reader-secret-0123456789"
DOCS = Path(__file__).parents[1] / "docs"
CONFIG: dict[str, Any] = {
    "lists": {
        "blocklist": {"kind": "numbers", "source": "blocklist.csv"},
        "allowlist": {"kind": "numbers"},
    },
    "policies": {
        "default": {
            "rules": [
                {
                    "name": "allowlist",
                    "match": "caller_in_list",
                    "list": "allowlist",
                    "action": "allow",
                },
                {"name": "blocklist", "match": "caller_in_list", "list": "blocklist"},
                {"name": "anonymous", "match": "anonymous", "operands": ["decline", "anon"]},
            ]
        }
    },
    "trunk_groups": {"main": {"policy": "default"}},
    "history": {"enabled": True, "unmasked": True, "flush_ms": 50},
}
Client = TestClient[Any, Any]

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium")
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)


@pytest.fixture
async def page(tmp_path: Path) -> AsyncIterator[Page]:
    """A browser of its own for each test, with a fresh profile (``--user-data-dir``)."""
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1200, "height": 800},
        )
        yield context.pages[0] if context.pages else await context.new_page()
        await context.close()


@pytest.fixture
async def service(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
) -> Client:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ops:admin:{ADMIN}\nsupport:editor=blocklist:{EDITOR}\nnoc:read:{READER}\n")
    monkeypatch.delenv("CALLSCREEN_ADMIN_TOKENS", raising=False)
    config = make_config({**CONFIG, "admin": {"tokens_file": str(tokens)}}, base_dir=tmp_path)
    write_blocklist(tmp_path)
    await sync_list(redis, config, "blocklist", SyncOptions(progress="off"))  # audited
    client: Client = await make_client(config, redis_client=redis)
    body = body_from("15162065613")
    body["Call-ID"] = ["c-1@pbx"]
    call = await client.post("/tg/main", json=body)
    assert await call.json() == REJECT
    return client


def write_blocklist(folder: Path) -> None:
    (folder / "blocklist.csv").write_text("number\n15162065613\n15162065614\n")


def withdraw_all_but_admin(tokens_file: Path) -> None:
    tokens_file.write_text(f"ops:admin:{ADMIN}\n")


async def snap(page: Page, name: str, tmp_path: Path) -> None:
    folder = DOCS if os.environ.get("CALLSCREEN_SCREENSHOTS") == "docs" else tmp_path
    await page.screenshot(path=str(folder / f"console-{name}.png"), full_page=True)


async def sign_in(page: Page, service: Client, token: str) -> None:
    await page.goto(str(service.make_url("/console")))
    await page.fill("#token", token)
    await page.click("#login-form button")
    await expect(page.locator("#whoami")).not_to_be_empty()


async def look_up(page: Page, number: str) -> None:
    await page.fill("#number", number)
    await page.click("#lookup-form button")
    await expect(page.locator("#lookup-number")).to_be_visible()


async def test_look_up_add_and_remove_with_an_editor_token(
    page: Page, service: Client, tmp_path: Path
) -> None:
    await page.goto(str(service.make_url("/console")))
    await expect(page.locator("#login")).to_be_visible()
    await snap(page, "login", tmp_path)
    await sign_in(page, service, EDITOR)
    await expect(page.locator("#whoami")).to_have_text("support (editor)")
    await look_up(page, "+1 (516) 206-5613")
    await expect(page.locator("#lookup-number")).to_have_text("15162065613")
    decisions = page.locator("#decisions tbody tr")
    await expect(decisions.filter(has_text="main")).to_contain_text("reject")
    # The rejected call is in its history (written within a second).
    await expect(page.locator("#calls tbody tr")).to_contain_text("c-1@pbx", timeout=2000)

    # Add a number that is on no list, with a reason.
    await look_up(page, "5162065699")
    await expect(
        page.locator("#lists-table tbody tr").filter(has_text="blocklist")
    ).to_contain_text("no")
    await expect(page.locator("#add-list option")).to_have_text(["blocklist"])  # its scope only
    await page.fill("#reason", "ticket 4711")
    await page.click("#add-button")
    await expect(page.locator("#message")).to_contain_text("Added 15162065699 to blocklist")
    row = page.locator("#lists-table tbody tr").filter(has_text="blocklist")
    await expect(row).to_contain_text("yes")
    audit = page.locator("#audit tbody tr").first
    await expect(audit).to_contain_text("support")
    await expect(audit).to_contain_text("ticket 4711")
    await expect(audit).to_contain_text("127.0.0.1")

    # A call from it is now rejected by the service, and the console can remove it.
    blocked = await service.post("/tg/main", json=body_from("15162065699"))

    async def rejected() -> bool:
        answer = await service.post("/tg/main", json=body_from("15162065699"))
        return bool(await answer.json() == REJECT)

    assert blocked.status == 200
    await wait_for(rejected)
    await page.fill("#reason", "ticket 4711: customer asked")
    await row.locator("button.remove").click()
    await expect(page.locator("#message")).to_contain_text("Removed 15162065699 from blocklist")
    await expect(
        page.locator("#lists-table tbody tr").filter(has_text="blocklist")
    ).to_contain_text("no")
    await expect(page.locator("#audit tbody tr").first).to_contain_text("remove")
    await snap(page, "lookup", tmp_path)


async def test_a_read_only_token_sees_no_edit_controls(
    page: Page, service: Client, tmp_path: Path
) -> None:
    await sign_in(page, service, READER)
    await expect(page.locator("#whoami")).to_have_text("noc (read)")
    await look_up(page, "15162065613")
    await expect(page.locator("#decisions")).to_be_visible()
    await expect(page.locator("#lists-table")).to_contain_text("blocklist")
    assert await page.locator("#edit").count() == 0
    assert await page.locator("button.remove").count() == 0
    await page.click("a[data-page=status]")
    await expect(page.locator("#ready")).to_be_visible()
    assert await page.locator("#reload").count() == 0  # reload is for admins


async def test_lists_rejections_and_status_pages(
    page: Page, service: Client, tmp_path: Path
) -> None:
    await service.post("/tg/main", json=body_from("anonymous"))  # rejected as anonymous
    await sign_in(page, service, ADMIN)
    await page.click("a[data-page=lists]")
    overview = page.locator("#lists-table-overview tbody tr")
    await expect(overview.filter(has_text="blocklist")).to_contain_text("loaded")
    await expect(overview.filter(has_text="blocklist")).to_contain_text("ok: blocklist: 2 entries")
    await expect(overview.filter(has_text="allowlist")).to_contain_text("(admin API only)")
    await snap(page, "lists", tmp_path)
    await page.click("a[data-page=rejections]")
    by_rule = page.locator("#by-rule tbody")
    await expect(by_rule).to_contain_text("blocklist", timeout=2000)
    await expect(by_rule).to_contain_text("anonymous", timeout=2000)
    await snap(page, "rejections", tmp_path)
    await page.click("a[data-page=status]")
    await expect(page.locator("#reload")).to_be_visible()
    await expect(page.locator("#syncs tbody tr").first).to_contain_text("loader")
    await snap(page, "status", tmp_path)


async def test_a_wrong_or_withdrawn_token_is_sent_back_to_sign_in(
    page: Page, service: Client, tmp_path: Path
) -> None:
    await page.goto(str(service.make_url("/console")))
    await page.fill("#token", "wrong-token-0123456789")
    await page.click("#login-form button")
    await expect(page.locator("#login-error")).to_have_text(
        "Your token was refused: invalid admin token"
    )
    assert await page.locator("#nav").is_hidden()
    # A token withdrawn while signed in (the secrets file changed, then a reload).
    await sign_in(page, service, READER)
    withdraw_all_but_admin(Path(service.app[ADMIN_TOKENS].config.admin.tokens_file or ""))
    service.app[ADMIN_TOKENS].reload()
    await page.fill("#number", "15162065613")
    await page.click("#lookup-form button")
    await expect(page.locator("#login-error")).to_have_text(
        "Your token was refused: invalid admin token"
    )
    assert await page.evaluate("sessionStorage.getItem('callscreen.token')") is None
