"""Topics in the management console, over real HTTP: a service that publishes a topic to NATS
JetStream (a nats-server of the test's own) and runs a subscriber group shows both on the
Topics page and its JSON route (producer partitions and group partitions, with their lag);
the read sides' operations act on them (pause and resume a group's partition, with the token);
the Read sides page keeps to read sides; in the distribution's Chromium the Topics page renders
the topic and its partitions' lines."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from lagompy.console import ConsoleSettings
from lagompy.readside import ReadSideSettings
from lagompy.service import Service
from lagompy.settings import JournalSettings
from lagompy.testkit.nats import NatsServer, find_server, nats_server
from lagompy.testkit.server import serve_in_thread
from lagompy.testkit.topics import Deposited, TopicEnv, contract_topic, recorder
from lagompy.topic import BrokerSettings, SubscribersComponent, TopicsComponent
from tests.conftest import UNDER_CI

TOKEN = "topic-console-token-0123456789"


def _wait(check: Callable[[], Any], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _in_chromium(url: str, *, group_of: str) -> None:
    """The Topics page in the distribution's Chromium: the published topic and a line per
    partition of the producer and of the group render (and a screenshot is saved where
    ``LAGOMPY_CONSOLE_SCREENSHOTS`` says). Skipped here, not under CI, without a browser."""
    from test_console_browser import CHROMIUM, shoot

    if not CHROMIUM.exists():
        if UNDER_CI:
            pytest.fail(f"browser checks must run under CI: {CHROMIUM} is missing")
        return
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{url}/console/")
            # The click starts a navigation: wait for the Topics page, not the one it leaves.
            with page.expect_navigation():
                page.get_by_role("link", name="Topics", exact=True).click()
            expect(page.locator(f"#topics tr[data-topic='{group_of}']").first).to_be_visible(
                timeout=15_000
            )
            rows = page.locator("#readside-rows tr[data-processor]")
            for name in (f"topic-producer:{group_of}", f"topic:{group_of}:console-group"):
                line = page.locator(f"#readside-rows tr[data-processor='{name}']").first
                expect(line).to_be_visible(timeout=15_000)
            names = {rows.nth(i).get_attribute("data-processor") for i in range(rows.count())}
            assert names == {f"topic-producer:{group_of}", f"topic:{group_of}:console-group"}
            shoot(page, "topics")
        finally:
            browser.close()


@pytest.fixture
async def broker_server() -> Any:
    if find_server() is None:
        if UNDER_CI:
            pytest.fail("nats-server is not installed (CI=true: the NATS tests must run)")
        pytest.skip("nats-server is not installed")
    async with nats_server() as server:
        yield server


@pytest.mark.asyncio
async def test_the_topics_page_shows_producers_and_groups_and_acts_on_them(
    journal_settings: JournalSettings, broker_server: NatsServer, tmp_path: Any
) -> None:
    from tests.test_topic_nats import _open_env

    broker = BrokerSettings(url=broker_server.url, stream_prefix=f"k{uuid.uuid4().hex[:6]}")
    own = JournalSettings(url=f"sqlite:///{tmp_path / 'subscriber.db'}")
    fast = ReadSideSettings(lease_ttl=2.0, renew_interval=0.1, max_attempts=1)
    service = Service(
        name="topic-console",
        journal_settings=journal_settings,
        components=[
            TopicsComponent([contract_topic], journal_settings=journal_settings, broker=broker),
            SubscribersComponent(
                [recorder("console-group")], broker=broker, journal_settings=own, settings=fast
            ),
        ],
    )
    app = FastAPI(lifespan=service.lifespan)
    service.install(app, console=ConsoleSettings(token=TOKEN))
    env: TopicEnv = await _open_env(journal_settings)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
            written = await env.append(*(Deposited(f"q{i % 4}", i) for i in range(8)))

            def rows() -> list[dict[str, Any]]:
                return list(http.get("/console/api/topics").json()["partitions"])

            def settled() -> bool:
                found = rows()
                return len(found) == 4 and all(
                    r["lag_events"] == 0
                    for r in found
                    if r["processor"].startswith("topic-producer:")
                )

            await asyncio.to_thread(_wait, settled, "the producers' and the group's partitions")
            names = sorted({r["processor"] for r in rows()})
            assert names == [
                f"topic-producer:{contract_topic.name}",
                f"topic:{contract_topic.name}:console-group",
            ]
            topics = http.get("/console/api/topics").json()["topics"]
            published = [t for t in topics if t["role"] == "published"]
            assert published[0]["transport"] == "nats"
            assert published[0]["published"] == len(written)

            await asyncio.to_thread(_in_chromium, url, group_of=contract_topic.name)
            page = http.get("/console/topics").text
            assert "console-group" in page and "topic-producer:" in page
            assert "/actions/pause" in page or "Log in to act" in page
            readsides = http.get("/console/readsides").text
            assert "console-group" not in readsides

            group = f"topic:{contract_topic.name}:console-group"
            tag = contract_topic.partition_tag(0)
            paused = http.post(
                "/console/actions/pause", json={"processor": group, "tag": tag}, headers=bearer
            )
            assert paused.status_code == 200, paused.text

            def state() -> str:
                (row,) = [r for r in rows() if r["processor"] == group and r["tag"] == tag]
                return str(row["state"])

            await asyncio.to_thread(_wait, lambda: state() == "paused", "the group paused")
            resumed = http.post(
                "/console/actions/resume", json={"processor": group, "tag": tag}, headers=bearer
            )
            assert resumed.status_code == 200, resumed.text
            await asyncio.to_thread(_wait, lambda: state() != "paused", "the group resumed")
            audit = [(e["action"], e["result"]) for e in http.get("/console/api/audit").json()]
            assert ("pause", "ok") in audit and ("resume", "ok") in audit
    finally:
        await env.close()
