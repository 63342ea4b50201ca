"""The console's Workflows page in a real browser (the distribution's Chromium, headless, driven
by Playwright; skipped with a reason where they are missing, required under ``CI=true``), on
both journal backends: read-only it shows the runs and no control; logged in with the token,
an operator filters the runs, opens one, cancels it through the confirmation, sees it
cancelled, pauses the type, and finds both actions on the Audit page."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import httpx
from fastapi import FastAPI
from test_console_browser import (  # noqa: F401 (browser_page: the fixture)
    browser_page,
    follow,
    reload_until,
    shoot,
)

from lagompy.console import ConsoleSettings
from lagompy.service import Service
from lagompy.settings import JournalSettings
from lagompy.testkit.server import serve_in_thread
from lagompy.workflow import WorkflowRun, WorkflowsComponent, WorkflowSettings
from tests.workflow_app import AccountEntity, workflows

TOKEN = "workflow-browser-token-0123456789"
FAST = WorkflowSettings(lease_ttl=1.0, renew_interval=0.25, admission_interval=0.1)


def eventually(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def app_of(journal: JournalSettings, console: ConsoleSettings) -> FastAPI:
    service = Service(
        name="wf-browser",
        entities=[AccountEntity, WorkflowRun],
        journal_settings=journal,
        ray=False,
        components=[WorkflowsComponent(workflows, settings=FAST)],
    )
    app = FastAPI(lifespan=service.lifespan)
    service.install(app, console=console)
    return app


def test_an_operator_cancels_a_run_from_the_workflows_page(
    journal_settings: JournalSettings,
    browser_page: Any,  # noqa: F811 (journal_settings first: its async set-up needs the loop)
) -> None:
    from playwright.sync_api import expect

    page = browser_page

    def running(url: str) -> int:
        found = httpx.get(f"{url}/workflows", params={"status": "running"}).json()
        return len(found["runs"])

    # Read-only (no token): the runs show, no control does.
    with serve_in_thread(app_of(journal_settings, ConsoleSettings())) as url:
        for i in range(3):
            started = httpx.post(
                f"{url}/workflows", json={"workflow": "approval", "id": f"b-{i}", "input": f"p{i}"}
            )
            assert started.status_code == 202, started.text
        eventually(lambda: running(url) == 3, "three runs waiting")
        page.goto(f"{url}/console/")
        follow(page, page.get_by_role("link", name="Workflows", exact=True).click)
        expect(page.locator("#mode")).to_have_text("read-only")
        expect(page.locator("#workflow-runs tr[data-run]")).to_have_count(3)
        expect(page.locator("button[data-action]")).to_have_count(0)
        expect(page.locator("form[method=post]")).to_have_count(0)

    # The same journal, a console with the token: log in, filter, cancel, pause, audit.
    with serve_in_thread(app_of(journal_settings, ConsoleSettings(token=TOKEN))) as url:
        eventually(lambda: running(url) == 3, "the runs taken over")
        act(page, url)


def act(page: Any, url: str) -> None:
    """Each click that leads to another page is followed (an assertion right after it must
    not read the page being left), and each assertion waits for what it expects."""
    from playwright.sync_api import expect

    page.goto(f"{url}/console/login")
    page.fill("input[name=token]", TOKEN)
    follow(page, lambda: page.click("#login button"))
    follow(page, page.get_by_role("link", name="Workflows", exact=True).click)
    page.select_option("#workflow-filter select[name=status]", "running")
    page.fill("#workflow-filter input[name=id_prefix]", "b-1")
    follow(page, lambda: page.click("#workflow-filter button"))
    expect(page.locator("#workflow-runs tr[data-run]")).to_have_count(1)
    follow(page, lambda: page.click("#workflow-runs a:text('b-1')"))
    expect(page.locator("#run-status")).to_have_text("running")
    page.fill("#run-actions input[name=reason]", "the customer called")
    page.click("#run-actions button[data-action=workflow-cancel]")
    expect(page.locator("#confirm-what")).to_contain_text("cannot be undone")
    page.click("#confirm button")
    expect(page.locator(".flash")).to_have_text(re.compile(r"^workflow-cancel: cancel requested"))
    reload_until(page, lambda: page.locator("#run-status").inner_text() == "cancelled", "cancelled")
    assert "the customer called" in page.locator("#run-error").inner_text()
    shoot(page, "workflow-run")

    follow(page, page.get_by_role("link", name="Workflows", exact=True).click)
    follow(
        page,
        lambda: page.click(
            "#workflow-types tr[data-workflow=approval] button[data-action=workflow-pause]"
        ),
    )
    expect(page.locator(".flash")).to_have_text(re.compile(r"^workflow-pause:"))
    expect(page.locator("#workflow-types tr[data-workflow=approval]")).to_contain_text("paused")
    shoot(page, "workflows")

    follow(page, page.get_by_role("link", name="Audit").click)
    audit = page.locator("#audit").inner_text()
    assert "\tworkflow-cancel\tworkflow run b-1\tok" in audit, audit
    assert "\tworkflow-pause\tworkflow approval\tok" in audit, audit
