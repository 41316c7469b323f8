"""The live map in a real browser: Debian's chromium driven by Playwright's sync API.

Needs `apt-get install chromium` and `pip install playwright` (its own browser
download, `playwright install`, is neither needed nor possible here). Skipped with that
reason when either is missing; CI (HERD_REQUIRE_ALL=1) fails instead.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio

from tests.e2e.herd import REQUIRE_ALL, Herd, running

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium calls Google's hosts at start-up.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 10_000


def require_browser() -> None:
    """Skip (or, under HERD_REQUIRE_ALL=1, fail) unless chromium and playwright are here."""
    missing = []
    if shutil.which("chromium") is None and not Path(CHROMIUM).exists():
        missing.append("apt-get install chromium")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("pip install playwright")
    if not missing:
        return
    reason = f"needs a browser: {' and '.join(missing)}"
    if os.environ.get(REQUIRE_ALL) == "1":
        pytest.fail(f"{reason}; {REQUIRE_ALL}=1 forbids skipping", pytrace=False)
    pytest.skip(reason)


def artifact_dir(tmp_path: Path) -> Path:
    """Where the screenshot goes: $HERD_ARTIFACT_DIR (CI keeps it) or the test's tmp dir."""
    folder = Path(os.environ.get("HERD_ARTIFACT_DIR", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def send_iamat(port: int, line: bytes) -> bytes:
    """One IAMAT over a plain blocking socket (this runs in the browser's thread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(line + b"\n")
        sock.shutdown(socket.SHUT_WR)
        return sock.makefile("rb").read()


def drive_map(herd: Herd, shot: Path) -> None:
    """Open Clark's map, check servers, links and a client dot, stop Jaquez, watch its links."""
    from playwright.sync_api import ConsoleMessage, expect, sync_playwright

    requests: list[str] = []
    errors: list[str] = []
    stopped_port = str(herd.admin_ports["Jaquez"])

    def on_console(message: ConsoleMessage) -> None:
        where = message.location
        refused = "ERR_CONNECTION_REFUSED" in message.text or stopped_port in str(where)
        if message.type == "error" and not (refused and not herd.running("Jaquez")):
            errors.append(f"{message.text} at {where}")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.on("request", lambda request: requests.append(request.url))
            page.on("console", on_console)
            page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            page.goto(herd.admin_url("Clark") + "/")
            expect(page.locator("circle.server.up")).to_have_count(5, timeout=WAIT_MS)
            expect(page.locator("line.link.up")).to_have_count(6, timeout=WAIT_MS)
            expect(page.locator("#countries path")).to_have_count(1)
            client = "<b>kiwi</b>"  # must show as text, never as markup
            reply = send_iamat(herd.ports["Bona"], f"IAMAT {client} +34.0712-118.4465 1.5".encode())
            assert reply.startswith(b"AT Bona "), reply
            dot = page.locator("circle.client")
            expect(dot).to_have_count(1, timeout=WAIT_MS)
            assert dot.get_attribute("data-id") == client
            expect(dot.locator("title")).to_have_text(f"{client} via Bona")
            assert page.locator("b").count() == 0
            herd.kill("Jaquez")
            down = page.locator("line.link.down")
            expect(down).to_have_count(2, timeout=WAIT_MS)
            pairs = {
                (down.nth(i).get_attribute("data-a"), down.nth(i).get_attribute("data-b"))
                for i in range(2)
            }
            assert pairs == {("Clark", "Jaquez"), ("Campbell", "Jaquez")}
            expect(page.locator("circle.server.down")).to_have_count(1)
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    assert {urlsplit(url).hostname for url in requests} == {"127.0.0.1"}, requests
    assert not errors, errors


async def test_the_map_shows_the_herd_live(tmp_path: Path) -> None:
    require_browser()
    with running(Herd.create(tmp_path).with_admin()) as herd:
        await herd.start_all()
        shot = artifact_dir(tmp_path) / "map.png"
        await trio.to_thread.run_sync(drive_map, herd, shot)
        assert shot.stat().st_size > 10_000
