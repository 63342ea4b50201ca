"""The console in a real browser: the distribution's Chromium (``/usr/bin/chromium``), headless,
driven by Playwright, against a service served by uvicorn on loopback: read-only with its
entities in process on SQLite, then with a token, its entities on Ray shard hosts and its
journal on PostgreSQL. Opens every page (each
loads nothing from anywhere else), checks that read-only mode renders no control, logs in,
pauses and resumes a read side, rebuilds it and watches the progress reach 100%, watches the
table refresh live, retries then skips a failed event through its confirmation, and finds each
action on the Audit page; then retries a parked event from the Failed page (on SQLite).

Skipped with a reason when Chromium or Playwright is missing here; under ``CI=true`` they must
be there (``.ci/run`` installs Chromium). ``LAGOMPY_CONSOLE_SCREENSHOTS=<dir>`` also saves a
screenshot of each page there (how ``docs/img/console/`` is made)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import POSTGRES_URL
from test_console import TOKEN, console_app, tag_of
from test_console_parked import ParkingNames, parking_app

from lagompy.console import ConsoleSettings
from lagompy.settings import JournalSettings
from lagompy.testkit.server import serve_in_thread

CHROMIUM = Path("/usr/bin/chromium")
NAV = ["Overview", "Read sides", "Topics", "Failed", "Entities", "Circuit breakers", "Audit"]


def _browser_or_skip() -> None:
    missing = None
    if not CHROMIUM.exists():
        missing = f"{CHROMIUM} is missing (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "the playwright package is missing (pip install -e '.[dev]')"
    if missing is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser tests must run under CI: {missing}")
    pytest.skip(missing)


@pytest.fixture
def browser_page() -> Iterator[Any]:
    _browser_or_skip()
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(15_000)
            expect.set_options(timeout=15_000)
            yield page
        finally:
            browser.close()


def follow(page: Any, click: Callable[[], None]) -> None:
    """Run ``click`` (a link or a form's button) and wait for the page it leads to: an assertion
    right after a click must not read the page being left."""
    with page.expect_navigation():
        click()


def shoot(page: Any, name: str) -> None:
    where = os.environ.get("LAGOMPY_CONSOLE_SCREENSHOTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(where) / f"{name}.png"), full_page=True)


def eventually(check: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


#: What Chromium answers a reload that meets a navigation still under way (a form's POST and
#: its redirect, the previous reload): the page is there a moment later.
_NAVIGATING = ("Not attached to an active page", "interrupted by another navigation", "ERR_ABORTED")


def reload_until(page: Any, check: Callable[[], bool], what: str, timeout: float = 15) -> None:
    """Reload ``page`` until ``check()`` holds; a reload that races a navigation is retried."""
    from playwright.sync_api import Error

    deadline = time.monotonic() + timeout
    while True:
        try:
            page.wait_for_load_state()
            page.reload()
            if check():
                return
        except Error as e:
            if not any(m in str(e) for m in _NAVIGATING) or time.monotonic() >= deadline:
                raise
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_the_console_in_chromium(
    postgres_schema: str, ray_session: object, browser_page: Any, tmp_path: Path
) -> None:
    # postgres_schema before browser_page: Playwright's sync API holds the thread's event loop
    # from its setup to its teardown, and the schema's async set-up needs it free.
    from playwright.sync_api import expect

    page = browser_page
    journal = JournalSettings(url=f"sqlite:///{tmp_path / 'read-only.db'}")

    # Read-only: every page opens, shows the mode and no control; nothing comes from elsewhere.
    with serve_in_thread(console_app(journal, ConsoleSettings())) as url:
        origins: set[str] = set()
        page.on("request", lambda r: origins.add(r.url.split("/console")[0]))
        assert httpx.post(f"{url}/register/u1/Ada").status_code == 200
        page.goto(f"{url}/console/")
        for link in NAV:
            follow(page, page.get_by_role("link", name=link, exact=True).click)
            expect(page.locator("#mode")).to_have_text("read-only")
            assert page.locator("button[data-action]").count() == 0, link
            assert page.locator("form[method=post]").count() == 0, link
        assert origins == {url}

    # With a token: log in, act, watch, audit.
    journal = JournalSettings(url=POSTGRES_URL, postgres_schema=postgres_schema, auto_migrate=True)
    console = ConsoleSettings(token=TOKEN, refresh_seconds=0.3)
    with serve_in_thread(console_app(journal, console, ray=True)) as url:
        assert httpx.post(f"{url}/register/u1/Ada").status_code == 200
        page.goto(f"{url}/console/readsides")
        assert page.locator("button[data-action]").count() == 0
        follow(page, page.get_by_role("link", name="Log in to act").click)
        page.fill("input[name=token]", "not the token, clearly wrong")
        follow(page, lambda: page.click("#login button"))
        expect(page.locator("#login-error")).to_have_text("wrong token")
        page.fill("input[name=token]", TOKEN)
        follow(page, lambda: page.click("#login button"))
        expect(page.get_by_role("button", name="Log out")).to_be_visible()
        shoot(page, "overview")

        tag = tag_of("u1")
        row = f"#readside-rows tr[data-tag='{tag}']"
        page.goto(f"{url}/console/readsides")
        eventually(lambda: page.locator(f"{row} td").nth(3).inner_text() == "1", "handled")
        page.click(f"{row} button[data-action=pause]")
        expect(page.locator(".flash")).to_have_text(re.compile(r"^pause: paused 1 tag"))
        expect(page.locator(row)).to_have_attribute("data-state", "paused")
        page.click(f"{row} button[data-action=resume]")
        eventually(lambda: page.locator(row).get_attribute("data-state") != "paused", "resumed")

        # A rebuild, confirmed, watched until its progress reaches 100% (the live refresh).
        page.click("#rebuild button[data-action=rebuild]")
        expect(page.locator("#confirm-what")).to_contain_text("cannot be undone")
        page.click("#confirm button")
        progress = "#rebuild-rows tr[data-rebuild='console-names']"
        eventually(lambda: page.locator(progress).get_attribute("data-percent") == "100", "100%")
        expect(page.locator(progress)).to_have_attribute("data-state", "done")

        # A failing event shows up on the open page by itself (the live refresh).
        assert httpx.post(f"{url}/register/u2/boom").status_code == 200
        boom = f"#readside-rows tr[data-tag='{tag_of('u2')}']"
        eventually(lambda: page.locator(boom).get_attribute("data-state") == "failed", "live")
        shoot(page, "readsides")

        follow(page, page.get_by_role("link", name="Failed", exact=True).click)
        expect(page.locator("#failed-rows")).to_contain_text("cannot project boom")
        # Retry: it fails again. The form's answer is a new page: wait for it before reloading.
        with page.expect_navigation():
            page.click("#failed-rows button[data-action=resume]")
        reload_until(page, lambda: page.locator("#failed-rows tr[data-tag]").count() == 1, "again")
        shoot(page, "failed")
        page.click("#failed-rows button[data-action=skip]")
        expect(page.locator("#confirm-what")).to_contain_text("cannot be undone")
        page.click("#confirm button")
        expect(page.locator(".flash")).to_have_text(re.compile(r"^skip: skipped the failing event"))
        reload_until(
            page, lambda: page.locator("#failed-rows tr[data-tag]").count() == 0, "skipped"
        )

        follow(page, page.get_by_role("link", name="Overview").click)
        expect(page.locator("#hosts tbody tr")).to_have_count(2)  # the two shard hosts
        page.goto(f"{url}/console/entities?type=user&id=u1")
        expect(page.locator("#events tbody tr")).to_have_count(1)
        expect(page.locator("#events")).to_contain_text("UserRegistered")
        shoot(page, "entities")
        follow(page, page.get_by_role("link", name="Circuit breakers").click)
        expect(page.locator("#breakers")).to_contain_text("inventory")
        shoot(page, "breakers")
        follow(page, page.get_by_role("link", name="Audit").click)
        audit = page.locator("#audit").inner_text()
        for action in ("login", "pause", "resume", "rebuild", "rebuild-finished", "skip"):
            assert f"\t{action}\t" in audit, action
        shoot(page, "audit")


def test_a_parked_event_retried_from_the_failed_page(browser_page: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page = browser_page
    journal = JournalSettings(url=f"sqlite:///{tmp_path / 'parked.db'}")
    ParkingNames.broken = True
    try:
        with serve_in_thread(parking_app(journal, ConsoleSettings(token=TOKEN))) as url:
            assert httpx.post(f"{url}/register/u1/boom").status_code == 200
            page.goto(f"{url}/console/login")
            page.fill("input[name=token]", TOKEN)
            follow(page, lambda: page.click("#login button"))
            follow(page, page.get_by_role("link", name="Failed", exact=True).click)
            rows = "#parked-rows tr[data-parked-id]"
            reload_until(page, lambda: page.locator(rows).count() == 1, "parked")
            expect(page.locator("#parked-rows")).to_contain_text("cannot project boom")
            shoot(page, "parked")
            # Still broken: the retry fails again and the row stays, with its retry counted.
            page.click(f"{rows} button[data-action=retry-parked]")
            expect(page.locator(".flash")).to_have_text(
                "retry-parked: asked for a retry of 1 parked event(s)"
            )
            reload_until(
                page,
                lambda: "1 retried" in page.locator(rows).inner_text(),
                "retried, failed again",
            )
            # Fixed: the retry applies it and the row goes.
            ParkingNames.broken = False
            with page.expect_navigation():
                page.click(f"{rows} button[data-action=retry-parked]")
            reload_until(page, lambda: page.locator(rows).count() == 0, "retried")
            assert httpx.get(f"{url}/names").json() == ["boom"]
            follow(page, page.get_by_role("link", name="Audit").click)
            expect(page.locator("#audit")).to_contain_text("\tretry-parked\t")
    finally:
        ParkingNames.broken = True
