"""Parking (``on_failure="park"``) on SQLite files and PostgreSQL schemas: the parked row and the
offset move together or not at all, retries apply exactly once (or keep the row with the new
error), discard, filters, status and metrics, and ``lagompy projections parked|retry|discard``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from readside_processors import PoisonedCredits
from sqlalchemy import event, text
from typer.testing import CliRunner

from lagompy import ConfigurationError, JournalSettings
from lagompy.cli import build_app
from lagompy.errors import LeaseLost, ReadSideHandlerFailed
from lagompy.journal import AtomicWrite, EventEnvelope, Storage, TailSettings, open_storage
from lagompy.readside import (
    ParkedFilter,
    ReadSide,
    ReadSideWorker,
    open_projections,
    start_readside,
)
from lagompy.readside._parked import ParkedStore
from lagompy.readside._store import OffsetStore
from lagompy.serialization import Serializer
from lagompy.testkit.readside import (
    CONTRACT_TAG,
    Credited,
    CreditsProjection,
    Noise,
    readside_contract_serializer,
)

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


@pytest.fixture(autouse=True)
def no_poison() -> Any:
    yield
    PoisonedCredits.poison = set()


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


async def start(journal_settings: JournalSettings, **settings: Any) -> ReadSide:
    return await start_readside(
        [PoisonedCredits],
        journal_settings=journal_settings,
        serializer=readside_contract_serializer(),
        **{**FAST, "on_failure": "park", **settings},
    )


async def credits(readside: ReadSide) -> list[tuple[int, str]]:
    async with readside.projection.read() as conn:
        rows = await conn.execute(
            text("SELECT event_offset, account FROM contract_credits ORDER BY 1")
        )
        return [(int(o), str(a)) for o, a in rows.all()]


async def eventually(check: Callable[[], Awaitable[object]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not hold in time")
        await asyncio.sleep(0.02)


async def test_a_failing_event_is_parked_and_the_worker_goes_on(
    journal: Storage, journal_settings: JournalSettings
) -> None:
    accounts = Accounts(journal)
    ok = await accounts.credit("ok", 1)
    bad = await accounts.credit("bad", 2)
    PoisonedCredits.poison = {"bad"}
    async with await start(journal_settings) as rs:
        await rs.wait_until_caught_up()
        later = await accounts.credit("ok", 3)
        await rs.wait_until_caught_up()
        assert await credits(rs) == [(ok[0].offset, "ok"), (later[0].offset, "ok")]
        (status,) = await rs.status()
        assert (status.state, status.parked, status.skipped) == ("running", 1, 0)
        (row,) = await rs.projections.parked()
        assert (row.consumer_kind, row.consumer, row.tag) == (
            "read-side",
            "poisoned-credits",
            CONTRACT_TAG,
        )
        assert (row.offset, row.entity_type, row.entity_id, row.seq_nr) == (
            bad[0].offset,
            "contract-account",
            "bad",
            1,
        )
        assert row.event_type is not None and row.event_type.endswith("Credited")
        assert row.error_class == "ValueError" and row.attempts == 2
        assert row.error == "ValueError: account bad is poisoned"
        assert row.message is None and not row.retry_requested
        assert status.to_dict()["parked"] == 1


async def test_parking_and_the_offset_commit_together_or_not_at_all(
    journal: Storage, journal_settings: JournalSettings
) -> None:
    accounts = Accounts(journal)
    bad = await accounts.credit("bad", 2)
    PoisonedCredits.poison = {"bad"}
    async with await open_projections(
        journal_settings=journal_settings, with_journal=False
    ) as projections:
        store = OffsetStore(projections.projection)
        await store.ensure("poisoned-credits", [CONTRACT_TAG])
        worker = ReadSideWorker(
            PoisonedCredits(),
            CONTRACT_TAG,
            journal=journal.journal,
            projection=projections.projection,
        )
        lease = await store.acquire("poisoned-credits", CONTRACT_TAG, "me", 5.0)
        assert lease is not None
        failure = ReadSideHandlerFailed(
            "boom",
            processor="poisoned-credits",
            tag=CONTRACT_TAG,
            offset=bad[0].offset,
            entity_type="contract-account",
            entity_id="bad",
            seq_nr=1,
            attempts=5,
        )
        # Another worker takes the lease: the park transaction is fenced off whole.
        assert await store.acquire("poisoned-credits", CONTRACT_TAG, "other", 5.0, force=True)
        with pytest.raises(LeaseLost):
            await worker.strategy.park(worker, lease, failure, ValueError("boom"), bad[0])
        assert await projections.parked() == []
        row = await store.row("poisoned-credits", CONTRACT_TAG)
        assert row is not None and row.offset == 0
        # With the lease still its own, both land.
        lease = await store.acquire("poisoned-credits", CONTRACT_TAG, "me", 5.0, force=True)
        assert lease is not None
        await worker.strategy.park(worker, lease, failure, ValueError("boom"), bad[0])
        (parked,) = await projections.parked()
        assert parked.offset == bad[0].offset
        row = await store.row("poisoned-credits", CONTRACT_TAG)
        assert row is not None and row.offset == bad[0].offset


async def test_a_retry_applies_once_and_removes_the_row_a_failing_one_keeps_it(
    journal: Storage, journal_settings: JournalSettings
) -> None:
    accounts = Accounts(journal)
    bad = await accounts.credit("bad", 2)
    after = await accounts.credit("ok", 1)
    PoisonedCredits.poison = {"bad"}
    async with await start(journal_settings) as rs:
        await rs.wait_until_caught_up()
        projections = rs.projections
        (row,) = await projections.parked()
        # Still poisoned: the retry fails again, the row stays with the new error.
        assert await projections.retry_parked(ParkedFilter(ids=(row.id,))) == 1

        async def retried() -> bool:
            (now,) = await projections.parked()
            return not now.retry_requested

        await eventually(retried)
        (again,) = await projections.parked()
        assert again.id == row.id and again.retries == 1
        assert again.error == "ValueError: account bad is poisoned"
        assert await credits(rs) == [(after[0].offset, "ok")]
        # The cause is fixed: the retry applies the event once (after the later one) and
        # deletes the row in the same transaction.
        PoisonedCredits.poison = set()
        assert await projections.retry_parked(ParkedFilter(consumer="poisoned-credits")) == 1

        async def gone() -> bool:
            return await projections.count_parked() == 0

        await eventually(gone)
        assert await credits(rs) == [(bad[0].offset, "bad"), (after[0].offset, "ok")]
        (status,) = await rs.status()
        assert status.parked == 0 and status.state == "running"
        with pytest.raises(ConfigurationError, match="no parked event matches"):
            await projections.retry_parked(ParkedFilter())


async def test_a_retry_comes_with_the_lease_renewal_not_a_query_of_its_own(
    journal: Storage, journal_settings: JournalSettings
) -> None:
    # The worker learns of an operator's retry from the renewal of its lease (its RETURNING
    # says whether one is pending): while none is asked, it sends no query of the parked table
    # of its own; once asked, the retry runs within about a renewal interval.
    accounts = Accounts(journal)
    bad = await accounts.credit("bad", 2)
    PoisonedCredits.poison = {"bad"}
    renew = 0.2
    async with await start(journal_settings, renew_interval=renew) as rs:
        await rs.wait_until_caught_up()
        (row,) = await rs.projections.parked()
        PoisonedCredits.poison = set()
        statements: list[str] = []

        def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            statements.append(" ".join(statement.split()))

        def parked_queries() -> list[str]:
            return [
                s
                for s in statements
                if "lagompy_parked" in s and not s.startswith("UPDATE lagompy_readside_offsets")
            ]

        engine = rs.projection.engine.sync_engine
        event.listen(engine, "before_cursor_execute", seen)
        try:
            await asyncio.sleep(renew * 5)
            assert parked_queries() == []
            renewals = [s for s in statements if s.startswith("UPDATE lagompy_readside_offsets")]
            assert len(renewals) >= 3 and all("lagompy_parked" in s for s in renewals)
            asked = time.monotonic()
            assert await rs.projections.retry_parked(ParkedFilter(ids=(row.id,))) == 1

            async def applied() -> bool:
                return await credits(rs) == [(bad[0].offset, "bad")]

            await eventually(applied)
            took = time.monotonic() - asked
            assert took < renew * 2 + 1.0, f"the retry ran {took:.2f} s after it was asked"
            await asyncio.sleep(renew * 2)  # done: no more queries of the parked table
            statements.clear()
            await asyncio.sleep(renew * 5)
            assert parked_queries() == []
        finally:
            event.remove(engine, "before_cursor_execute", seen)
        assert await rs.projections.count_parked() == 0


async def test_the_lease_renewal_tells_each_tag_of_its_own_pending_retries(
    journal: Storage,
) -> None:
    store, parked = OffsetStore(journal.database), ParkedStore(journal.database)
    await store.ensure("p", ["t1", "t2"])
    leases = {t: await store.acquire("p", t, "worker", 10) for t in ("t1", "t2")}
    async with journal.database.write() as conn:
        for tag in ("t1", "t2"):
            await parked.park(
                conn, kind="read-side", consumer="p", tag=tag, offset=1, entity_type="e",
                entity_id="1", seq_nr=1, event_type="E", error_class="ValueError",
                error="ValueError: x", attempts=2, message=None,
            )  # fmt: skip

    async def retry_flags() -> dict[str, bool]:
        flags = {}
        for tag, lease in leases.items():
            assert lease is not None
            flags[tag] = (await store.renew(lease, 10, state="running")).retry
        return flags

    assert await retry_flags() == {"t1": False, "t2": False}
    assert await parked.request_retry(ParkedFilter(consumer="p", tag="t2")) == 1
    assert await retry_flags() == {"t1": False, "t2": True}
    again = await store.acquire("p", "t2", "worker", 10)  # a worker (re)starting learns it too
    assert again is not None and again.flags.retry
    (row,) = await parked.find(ParkedFilter(tag="t2"))
    await parked.retry_failed(row, error_class="ValueError", error="ValueError: x")
    leases["t2"] = again
    assert await retry_flags() == {"t1": False, "t2": False}


async def test_discard_and_filters(journal: Storage, journal_settings: JournalSettings) -> None:
    accounts = Accounts(journal)
    for name in ("a", "b", "c"):
        await accounts.credit(name, 1)
    await accounts.credit("a", 2)
    PoisonedCredits.poison = {"a", "b", "c"}
    async with await start(journal_settings) as rs:
        await rs.wait_until_caught_up()
        p = rs.projections
        assert await p.count_parked() == 4
        assert [r.entity_id for r in await p.parked(ParkedFilter(entity="contract-account/a"))] == [
            "a",
            "a",
        ]
        assert await p.count_parked(ParkedFilter(entity="contract-account")) == 4
        assert await p.count_parked(ParkedFilter(entity="other")) == 0
        assert await p.count_parked(ParkedFilter(error_class="ValueError")) == 4
        assert await p.count_parked(ParkedFilter(error_class="KeyError")) == 0
        assert await p.count_parked(ParkedFilter(consumer="nope")) == 0
        first = await p.parked(limit=2)
        rest = await p.parked(after_id=first[-1].id)
        assert [r.entity_id for r in first + rest] == ["a", "b", "c", "a"]
        assert await p.discard_parked(ParkedFilter(entity="contract-account/a")) == 2
        assert [r.entity_id for r in await p.parked()] == ["b", "c"]
        with pytest.raises(ConfigurationError, match="no parked event matches"):
            await p.discard_parked(ParkedFilter(entity="contract-account/a"))
        with pytest.raises(ConfigurationError, match="limit must be between"):
            await p.parked(limit=0)
        with pytest.raises(ConfigurationError, match="id is an integer"):
            ParkedFilter(ids=(0,))
        (status,) = await rs.status()
        assert status.parked == 2


async def test_cli_parked_retry_discard(
    journal: Storage, journal_settings: JournalSettings
) -> None:
    accounts = Accounts(journal)
    await accounts.credit("a", 1)
    await accounts.credit("b", 1)
    PoisonedCredits.poison = {"a", "b"}
    app = build_app()
    runner = CliRunner()
    args = ["--journal-url", journal_settings.url]
    if journal_settings.postgres_schema:
        args += ["--journal-schema", journal_settings.postgres_schema]

    async def run(*words: str) -> Any:
        return await asyncio.to_thread(runner.invoke, app, ["projections", *words, *args])

    async with await start(journal_settings) as rs:
        await rs.wait_until_caught_up()
        result = await run("parked")
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert lines[0].split()[:4] == ["ID", "PROCESSOR", "TAG", "OFFSET"]
        assert len(lines) == 5 and "ValueError" in lines[1]
        assert lines[3].endswith(": ValueError: account a is poisoned")
        result = await run("parked", "poisoned-credits", "--entity", "contract-account/b", "--json")
        assert result.exit_code == 0, result.output
        assert '"entity_id": "b"' in result.stdout
        status = await run("status")
        assert "PARKED" in status.stdout.splitlines()[0]
        # Retry b once the cause is fixed; discard a (asked to confirm without --yes).
        PoisonedCredits.poison = {"a"}
        result = await run("retry", "poisoned-credits", "--entity", "contract-account/b")
        assert result.exit_code == 0, result.output
        assert "asked for a retry of 1 parked event" in result.stdout

        async def one_left() -> bool:
            return await rs.projections.count_parked() == 1

        await eventually(one_left)
        assert [a for _, a in await credits(rs)] == ["b"]
        result = await run("discard", "poisoned-credits", "--yes")
        assert result.exit_code == 0, result.output
        assert "discarded 1 parked event" in result.stdout
        assert await rs.projections.count_parked() == 0
        result = await run("discard", "poisoned-credits", "--yes")
        assert result.exit_code == 1 and "no parked event matches" in result.output
        result = await run("retry", "poisoned-credits", "--id", "x")
        assert result.exit_code == 2


async def test_on_failure_park_in_the_metrics(
    journal: Storage, journal_settings: JournalSettings
) -> None:
    from lagompy.readside._component import _lag_samples

    accounts = Accounts(journal)
    await accounts.credit("bad", 1)
    PoisonedCredits.poison = {"bad"}
    async with await start(journal_settings) as rs:
        await rs.wait_until_caught_up()
        samples = {name: value for name, _, _, _, value in _lag_samples(await rs.status())}
        assert samples["lagompy_readside_parked"] == 1.0


async def test_a_replay_and_a_rebuild_clear_the_parked_events_they_handle_again(
    journal: Storage, journal_settings: JournalSettings
) -> None:
    accounts = Accounts(journal)
    ok = await accounts.credit("ok", 1)
    bad = await accounts.credit("bad", 2)
    PoisonedCredits.poison = {"bad"}
    async with await start(journal_settings) as rs:
        await rs.wait_until_caught_up()
        p = rs.projections
        assert await p.count_parked() == 1
        # Set back, still failing: parked again (one row); set back once fixed: handled, and
        # no parked row is left for a retry to apply a second time.
        await p.set_offset("poisoned-credits", CONTRACT_TAG, ok[0].offset, force=True)
        await eventually(lambda: p.count_parked(), timeout=10)
        assert await p.count_parked() == 1
        PoisonedCredits.poison = set()
        await p.set_offset("poisoned-credits", CONTRACT_TAG, ok[0].offset, force=True)

        async def handled() -> bool:
            return (bad[0].offset, "bad") in await credits(rs)

        await eventually(handled)
        assert await p.count_parked() == 0
        # A rebuild replays everything: the parked rows of before are gone.
        PoisonedCredits.poison = {"bad"}
        await p.set_offset("poisoned-credits", CONTRACT_TAG, ok[0].offset, force=True)
        await eventually(lambda: p.count_parked(), timeout=10)
        PoisonedCredits.poison = set()
        assert await p.rebuild(PoisonedCredits, journal=journal.journal) == 2
        assert await p.count_parked() == 0
        assert [a for _, a in await credits(rs)] == ["ok", "bad"]


class EveryCredit(CreditsProjection):
    """CreditsProjection that wants every event (so that an unknown one cannot be decoded)."""

    name = "every-credit"
    event_types = None


async def test_an_undecodable_event_is_parked_and_its_retry_reads_the_journal_again(
    journal: Storage, journal_settings: JournalSettings
) -> None:
    accounts = Accounts(journal)
    noise = await accounts.append("n", Noise("unknown to the read side"))
    later = await accounts.credit("a", 2)
    async with await start_readside(
        [EveryCredit],
        journal_settings=journal_settings,
        serializer=Serializer([Credited]),  # Noise is unknown here
        **{**FAST, "on_failure": "park"},
    ) as rs:
        await rs.wait_until_caught_up()
        assert [o for o, _ in await credits(rs)] == [later[0].offset]
        (row,) = await rs.projections.parked()
        assert (row.offset, row.entity_id, row.error_class) == (noise[0].offset, "n", "UnknownType")
        assert row.event_type is not None and row.event_type.endswith("Noise")
        assert "cannot decode" in row.error
        # Retried: still undecodable, the row stays with the error.
        await rs.projections.retry_parked(ParkedFilter())

        async def retried() -> bool:
            return (await rs.projections.parked())[0].retries == 1

        await eventually(retried)
