"""Read-side workers in process, on SQLite files and PostgreSQL schemas: live tailing, batches,
failures (stop and skip), pause/resume persisted, set-offset, rebuild, status, a real process
crash between handler and commit, and bad input."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from readside_processors import PoisonedCredits
from sqlalchemy import text

from examples.user_service.entity import ChangeName, RegisterUser, UserEntity
from examples.user_service.projection import UsersProjection
from lagompy import ConfigurationError, JournalSettings, start_in_process
from lagompy.errors import ReadSideHandlerFailed
from lagompy.journal import AtomicWrite, EventEnvelope, Storage, TailSettings, open_storage
from lagompy.readside import (
    ReadSide,
    ReadSideSettings,
    SqlReadSideProcessor,
    open_projections,
    start_readside,
)
from lagompy.testkit import ReadSideTestDriver
from lagompy.testkit.readside import (
    CONTRACT_TAG,
    Credited,
    CreditsProjection,
    Noise,
    readside_contract_serializer,
)

REPO = Path(__file__).resolve().parent.parent

FAST: dict[str, Any] = {
    "lease_ttl": 2.0,
    "renew_interval": 0.05,
    "tail": TailSettings(poll_interval=0.02),
    "retry_initial_delay": 0.01,
    "retry_max_delay": 0.02,
    "max_attempts": 2,
}


@pytest.fixture
async def journal(journal_settings: JournalSettings) -> AsyncIterator[Storage]:
    async with await open_storage(
        settings=journal_settings, serializer=readside_contract_serializer()
    ) as storage:
        yield storage


class Accounts:
    """Appends credits to the journal, one transaction per call."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.seq: dict[str, int] = {}

    async def credit(self, account: str, *amounts: int) -> list[EventEnvelope[Any]]:
        return await self.append(account, *(Credited(account, a) for a in amounts))

    async def append(self, account: str, *events: Any) -> list[EventEnvelope[Any]]:
        seq = self.seq.get(account, 0)
        write = AtomicWrite(
            "contract-account", account, seq, list(events), [(CONTRACT_TAG,)] * len(events)
        )
        (result,) = await self.storage.journal.append([write])
        self.seq[account] = seq + len(events)
        return list(result.unwrap())


async def credits(readside: ReadSide) -> list[tuple[int, str, int]]:
    async with readside.projection.read() as conn:
        rows = await conn.execute(
            text("SELECT event_offset, account, amount FROM contract_credits ORDER BY 1")
        )
        return [(int(o), str(a), int(m)) for o, a, m in rows.all()]


async def start(
    journal_settings: JournalSettings, processor: type[SqlReadSideProcessor], **settings: Any
) -> ReadSide:
    return await start_readside(
        [processor],
        journal_settings=journal_settings,
        serializer=readside_contract_serializer(),
        **{**FAST, **settings},
    )


async def eventually(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await check():
                return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {check.__name__}")
        await asyncio.sleep(0.02)


@pytest.fixture(autouse=True)
def _clean_processors() -> None:
    CreditsProjection.calls = []
    CreditsProjection.failing_global_prepares = 0
    PoisonedCredits.poison = set()


# --------------------------------------------------------------------------- live


async def test_users_projection_follows_live_commands_without_a_fixed_delay(
    journal_settings: JournalSettings,
) -> None:
    async with (
        await start_in_process(entities=[UserEntity], settings=journal_settings) as entities,
        await start_readside([UsersProjection], journal_settings=journal_settings, **FAST) as rs,
    ):
        assert len(rs.workers) == 4  # one per shard of the sharded tag
        for i in range(20):
            await entities.ref_for(UserEntity, f"u{i}").ask(RegisterUser(f"U{i}", f"u{i}@x.org"))
        await rs.wait_until_caught_up(timeout=20)
        lags = []
        for i in range(5):
            await entities.ref_for(UserEntity, f"u{i}").ask(ChangeName(f"New {i}"))
            committed = time.monotonic()

            async def renamed(i: int = i) -> bool:
                async with rs.projection.read() as conn:
                    name = await conn.scalar(
                        text("SELECT name FROM users WHERE user_id = :u"), {"u": f"u{i}"}
                    )
                return bool(name == f"New {i}")

            await eventually(renamed, timeout=5)
            lags.append(time.monotonic() - committed)
        # Polls every 20 ms on SQLite, woken by NOTIFY on PostgreSQL: never seconds.
        assert max(lags) < 1.0, lags
        async with rs.projection.read() as conn:
            count = await conn.scalar(text("SELECT count(*) FROM users"))
        assert count == 20
        status = await rs.status("users")
        assert {s.state for s in status} == {"running"}
        assert sum(s.lag_events or 0 for s in status) == 0
        assert all(s.owner is not None for s in status)


async def test_batches_are_bounded_by_count_and_by_time(
    journal: Storage, journal_settings: JournalSettings
) -> None:
    accounts = Accounts(journal)
    for n in range(10):
        await accounts.credit(f"a{n}", n)
    async with await start(journal_settings, CreditsProjection, max_batch=3) as rs:
        await rs.wait_until_caught_up()
        worker = rs.workers[0]
        assert (worker.events_handled, worker.transactions) == (10, 4)  # 3 + 3 + 3 + 1
        assert [m for _, _, m in await credits(rs)] == list(range(10))

    class Slow(CreditsProjection):
        name = "slow-credits"

        async def handle(self, conn: Any, envelope: EventEnvelope[Any]) -> None:
            await asyncio.sleep(0.03)
            await super().handle(conn, envelope)

    async with await start(journal_settings, Slow, max_batch=100, max_batch_seconds=0.05) as rs:
        await rs.wait_until_caught_up()
        worker = rs.workers[0]
        assert worker.events_handled == 10
        assert worker.transactions >= 4  # two 30 ms handlers exceed 50 ms


# --------------------------------------------------------------------------- failures


async def test_a_failing_handler_stops_the_worker_then_resume_retries(
    journal: Storage, journal_settings: JournalSettings, caplog: pytest.LogCaptureFixture
) -> None:
    accounts = Accounts(journal)
    before = await accounts.credit("ok", 1, 2)
    bad = await accounts.credit("bad", 3)
    after = await accounts.credit("ok", 4)
    PoisonedCredits.poison = {"bad"}
    async with await start(journal_settings, PoisonedCredits) as rs:

        async def failed() -> bool:
            (s,) = await rs.status()
            return s.state == "failed"

        await eventually(failed)
        (status,) = await rs.status()
        # Failed, not paused: an operator's pause and a failure-stop stay apart.
        assert not status.paused and status.offset == before[-1].offset
        assert status.lag_events == 2
        f = status.failure
        assert f is not None
        assert (f.offset, f.entity_type, f.entity_id, f.seq_nr, f.attempts) == (
            bad[0].offset,
            "contract-account",
            "bad",
            1,
            2,
        )
        assert "account bad is poisoned" in f.error and f.error.startswith("handler failed")
        assert [o for o, _, _ in await credits(rs)] == [e.offset for e in before]
        logged = [r.getMessage() for r in caplog.records if "handler failed" in r.getMessage()]
        assert any(f"offset {bad[0].offset}" in m and "contract-account/bad" in m for m in logged)

        PoisonedCredits.poison = set()  # the bug is fixed
        assert await rs.projections.resume("poisoned-credits") == 1
        await rs.wait_until_caught_up()
        assert [o for o, _, _ in await credits(rs)] == [e.offset for e in before + bad + after]
        (status,) = await rs.status()
        assert status.state == "running" and not status.paused


async def test_a_failing_handler_can_skip_the_event(
    journal: Storage, journal_settings: JournalSettings
) -> None:
    accounts = Accounts(journal)
    ok = await accounts.credit("ok", 1)
    bad = await accounts.credit("bad", 2)
    PoisonedCredits.poison = {"bad"}
    async with await start(journal_settings, PoisonedCredits, on_failure="skip") as rs:
        await rs.wait_until_caught_up()
        assert [o for o, _, _ in await credits(rs)] == [ok[0].offset]
        # The skip commits the offset, then writes its failure line: wait for the line.
        deadline = time.monotonic() + 10
        while (status := (await rs.status())[0]).failure is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert status.state == "running" and status.skipped == 1
        assert status.failure is not None and status.failure.entity_id == "bad"
        assert status.failure.offset == bad[0].offset
        assert status.failure.error.startswith("skipped after 2 attempts: handler failed")
        # The failure line clears once the worker commits past it; the count stays.
        later = await accounts.credit("ok", 3)
        await rs.wait_until_caught_up()
        assert [o for o, _, _ in await credits(rs)] == [ok[0].offset, later[0].offset]
        (status,) = await rs.status()
        assert (status.state, status.skipped, status.failure) == ("running", 1, None)


async def test_catch_up_raises_the_failure_naming_the_event(
    journal_settings: JournalSettings,
) -> None:
    PoisonedCredits.poison = {"bad"}
    settings = ReadSideSettings(**FAST)
    async with ReadSideTestDriver(
        PoisonedCredits,
        journal_settings=journal_settings,
        serializer=readside_contract_serializer(),
        settings=settings,
        entity_type="contract-account",
    ) as driver:
        await driver.feed("good", Credited("good", 1))
        with pytest.raises(ReadSideHandlerFailed, match="contract-account/bad sequence number 1"):
            await driver.feed("bad", Credited("bad", 1))
        rows = await driver.rows("SELECT account, amount FROM contract_credits")
        assert rows == [{"account": "good", "amount": 1}]


# --------------------------------------------------------------------------- operations


async def test_pause_and_resume_are_persisted(
    journal: Storage, journal_settings: JournalSettings
) -> None:
    accounts = Accounts(journal)
    first = await accounts.credit("a", 1)
    async with await start(journal_settings, CreditsProjection) as rs:
        await rs.wait_until_caught_up()
        assert await rs.projections.pause("contract-credits") == 1

        async def paused() -> bool:
            return rs.workers[0].state == "paused"

        await eventually(paused)
        await accounts.credit("a", 2)
        await asyncio.sleep(0.2)
        assert len(await credits(rs)) == 1
        (status,) = await rs.status()
        assert (status.state, status.lag_events) == ("paused", 1)
    # A new start (a restarted process) finds the processor paused.
    async with await start(journal_settings, CreditsProjection) as rs:
        await eventually(paused)
        assert [o for o, _, _ in await credits(rs)] == [first[0].offset]
        await rs.projections.resume("contract-credits", CONTRACT_TAG)
        await rs.wait_until_caught_up()
        assert len(await credits(rs)) == 2


async def test_set_offset_moves_a_running_worker(
    journal: Storage, journal_settings: JournalSettings
) -> None:
    accounts = Accounts(journal)
    events = await accounts.credit("a", 1, 2, 3)
    async with await start(journal_settings, CreditsProjection) as rs:
        await rs.wait_until_caught_up()
        epoch = (await rs.status())[0].epoch
        # Replay from after the first event: the running worker loses its lease, the next
        # holder starts from the new offset (the projection is not idempotent: rows double).
        await rs.projections.set_offset("contract-credits", CONTRACT_TAG, events[0].offset)

        async def replayed() -> bool:
            return len(await credits(rs)) == 5

        await eventually(replayed)
        assert [o for o, _, _ in await credits(rs)] == [
            events[0].offset,
            events[1].offset,
            events[1].offset,
            events[2].offset,
            events[2].offset,
        ]
        assert (await rs.status())[0].epoch >= epoch + 2  # set-offset, then the new lease


async def test_rebuild_replays_into_an_emptied_projection_while_workers_run(
    journal: Storage, journal_settings: JournalSettings
) -> None:
    accounts = Accounts(journal)
    for n in range(30):
        await accounts.credit(f"a{n % 5}", n)
    await accounts.append("z", Noise("not handled"))
    async with await start(journal_settings, CreditsProjection, max_batch=7) as rs:
        await rs.wait_until_caught_up()
        before = await credits(rs)
        seen: list[tuple[int, int]] = []
        replayed = await rs.projections.rebuild(
            CreditsProjection, journal=rs.journal, progress=lambda d, t: seen.append((d, t))
        )
        assert replayed == 31 and seen[0] == (0, 31) and seen[-1] == (31, 31)
        assert await credits(rs) == before  # each event once, not twice
        # The workers take their leases back and go on live.
        more = await accounts.credit("a0", 99)
        await rs.wait_until_caught_up()
        assert (await credits(rs))[-1] == (more[0].offset, "a0", 99)
        assert len(await credits(rs)) == 31


async def test_rebuild_needs_a_reset_hook(journal_settings: JournalSettings) -> None:
    class NoReset(SqlReadSideProcessor):
        name = "no-reset"
        tag = "t"
        entities = (UserEntity,)

        async def handle(self, conn: Any, envelope: EventEnvelope[Any]) -> None:
            pass

    async with (
        await open_projections(journal_settings=journal_settings) as projections,
        await open_storage(settings=journal_settings, entities=[UserEntity]) as storage,
    ):
        with pytest.raises(ConfigurationError, match="defines no reset"):
            await projections.rebuild(NoReset, journal=storage.journal)


async def test_status_shows_lag_of_a_stopped_processor(
    journal: Storage, journal_settings: JournalSettings
) -> None:
    accounts = Accounts(journal)
    await accounts.credit("a", 1)
    async with await start(journal_settings, CreditsProjection) as rs:
        await rs.wait_until_caught_up()
    await accounts.credit("a", 2, 3)
    await asyncio.sleep(0.05)
    async with await open_projections(journal_settings=journal_settings) as projections:
        (status,) = await projections.status()
        assert (status.state, status.lag_events, status.owner) == ("stopped", 2, None)
        assert status.lag_seconds is not None and status.lag_seconds >= 0.04
        assert status.to_dict()["processor"] == "contract-credits"
        with pytest.raises(ConfigurationError, match="no read-side processor 'nope'"):
            await projections.status("nope")


# --------------------------------------------------------------------------- crash


def _worker_script(journal_settings: JournalSettings) -> str:
    return textwrap.dedent(
        f"""
        import asyncio
        from lagompy import JournalSettings
        from lagompy.sql import Database
        from lagompy.readside import ReadSideSettings, ReadSideWorker, projection_settings
        from lagompy.journal import open_storage
        from lagompy.testkit.readside import CONTRACT_TAG, readside_contract_serializer
        from readside_processors import ExitingCredits

        async def main():
            js = JournalSettings(**{journal_settings.model_dump()!r})
            rs = ReadSideSettings(max_batch=2)
            storage = await open_storage(settings=js, serializer=readside_contract_serializer())
            projection = Database.create(projection_settings(js, rs))
            worker = ReadSideWorker(
                ExitingCredits(), CONTRACT_TAG, journal=storage.journal,
                projection=projection, settings=rs, owner="crashing-worker",
            )
            print(await worker.catch_up())

        asyncio.run(main())
        """
    )


async def test_a_process_killed_between_handler_and_commit_loses_nothing_and_doubles_nothing(
    journal: Storage, journal_settings: JournalSettings
) -> None:
    accounts = Accounts(journal)
    async with ReadSideTestDriver(
        CreditsProjection,
        journal_settings=journal_settings,
        serializer=readside_contract_serializer(),
    ):
        pass  # global_prepare: the table exists
    events = [
        *(await accounts.credit("a", 1)),
        *(await accounts.credit("b", 2)),
        *(await accounts.credit("die", 3)),
        *(await accounts.credit("c", 4)),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
        "LAGOMPY_TEST_DIE_AFTER": "die",
    }
    script = _worker_script(journal_settings)
    crashed = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert crashed.returncode == 17, crashed.stderr
    async with ReadSideTestDriver(
        CreditsProjection,
        journal_settings=journal_settings,
        serializer=readside_contract_serializer(),
    ) as driver:
        # Batches of 2: the first committed, the second ("die" handled) never did.
        rows = await driver.rows("SELECT event_offset FROM contract_credits ORDER BY 1")
        assert [r["event_offset"] for r in rows] == [e.offset for e in events[:2]]
        assert await driver.offset(CONTRACT_TAG) == events[1].offset
        env["LAGOMPY_TEST_DIE_AFTER"] = "nobody"
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert int(done.stdout.split()[-1]) == events[-1].offset
        rows = await driver.rows("SELECT event_offset FROM contract_credits ORDER BY 1")
        assert [r["event_offset"] for r in rows] == [e.offset for e in events]


# --------------------------------------------------------------------------- bad input


async def test_bad_processors_and_settings_are_refused_with_the_reason(
    journal_settings: JournalSettings,
) -> None:
    class Nameless(SqlReadSideProcessor):
        tag = "t"

        async def handle(self, conn: Any, envelope: EventEnvelope[Any]) -> None:
            pass

    class NoHandler(SqlReadSideProcessor):
        name = "no-handler"
        tag = "t"

    class NoTag(SqlReadSideProcessor):
        name = "no-tag"

        async def handle(self, conn: Any, envelope: EventEnvelope[Any]) -> None:
            pass

    with pytest.raises(ConfigurationError, match="Nameless needs a name"):
        await start_readside([Nameless], journal_settings=journal_settings)
    with pytest.raises(ConfigurationError, match="overrides neither handle"):
        await start_readside([NoHandler], journal_settings=journal_settings)
    with pytest.raises(ConfigurationError, match="NoTag needs a tag"):
        await start_readside([NoTag], journal_settings=journal_settings)

    class Undecodable(SqlReadSideProcessor):
        name = "undecodable"
        tag = "t"

        async def handle(self, conn: Any, envelope: EventEnvelope[Any]) -> None:
            pass

    with pytest.raises(ConfigurationError, match=r"declares no entities .* and no event_types"):
        await start_readside([Undecodable], journal_settings=journal_settings)
    with pytest.raises(ConfigurationError, match="renew_interval"):
        await start_readside(
            [UsersProjection], journal_settings=journal_settings, lease_ttl=1, renew_interval=2
        )
    with pytest.raises(ConfigurationError, match="on_failure"):
        await start_readside([UsersProjection], journal_settings=journal_settings, on_failure="x")
    async with await open_projections(journal_settings=journal_settings) as projections:
        with pytest.raises(ConfigurationError, match="no read-side offsets for processor 'x'"):
            await projections.pause("x")
        with pytest.raises(ConfigurationError, match="an offset must be an integer from 0"):
            await projections.set_offset("x", "t", -1)
        # Above SQL's BIGINT the driver would raise OverflowError: refused by name first.
        with pytest.raises(ConfigurationError, match=f"from 0 to {2**63 - 1} .* got {2**63}"):
            await projections.set_offset("x", "t", 2**63)
