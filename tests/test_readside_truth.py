"""The read side tells the truth, on SQLite files and PostgreSQL schemas.

A worker stopped by an event it cannot get past is ``failed`` in the projection database,
apart from an operator's pause, across restarts, until resumed or skipped; its failure line
clears once it moves past. ``set_offset`` beyond the tag's head is refused, or forced and shown
as a negative lag; lease takeovers are logged with who took them. A processor that declares
``event_types`` reads a tag that carries other types to its head without decoding them; an
event that cannot be decoded stops the worker visibly; a ``prepare`` that keeps failing shows as
``stalled``. A projection write failing in the database is a ``ReadSideHandlerFailed`` naming
the event and the database error. A NUL character is refused at the ask.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import POSTGRES_URL
from readside_processors import PoisonedCredits, StallingCredits
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from lagompy import (
    Command,
    ConfigurationError,
    Effect,
    JournalSettings,
    PersistentEntity,
    start_in_process,
    tag,
)
from lagompy.errors import EncodeError, EventDecodeError, ReadSideHandlerFailed
from lagompy.journal import EventEnvelope, Storage, open_storage
from lagompy.readside import (
    Projections,
    ReadSide,
    ReadSideSettings,
    SqlReadSideProcessor,
    open_projections,
    start_readside,
)
from lagompy.readside._store import OffsetStore
from lagompy.serialization import Serializer
from lagompy.testkit import ReadSideTestDriver
from lagompy.testkit.readside import CONTRACT_TAG, Credited, CreditsProjection, Noise
from tests.test_readside import FAST, Accounts, credits, eventually, start

ALL_FAST: dict[str, Any] = {**FAST, "max_batch": 2}


@pytest.fixture
async def journal(journal_settings: JournalSettings) -> AsyncIterator[Storage]:
    """The journal, with a serializer that knows every contract event type."""
    serializer = Serializer([Credited, Noise])
    async with await open_storage(settings=journal_settings, serializer=serializer) as storage:
        yield storage


@pytest.fixture(autouse=True)
def _clean_processors() -> None:
    CreditsProjection.calls = []
    PoisonedCredits.poison = set()
    StallingCredits.prepare_fails = False
    CreditsProjection.failing_global_prepares = 0


def offsets(rows: list[tuple[int, str, int]]) -> list[int]:
    return [o for o, _, _ in rows]


async def state_of(rs: ReadSide) -> str:
    (status,) = await rs.status()
    return status.state


# --------------------------------------------------------------------------- failed vs paused


async def test_a_failure_stop_survives_a_restart_apart_from_a_pause(
    journal: Storage, journal_settings: JournalSettings
) -> None:
    accounts = Accounts(journal)
    before = await accounts.credit("ok", 1)
    bad = await accounts.credit("bad", 2)
    PoisonedCredits.poison = {"bad"}
    async with await start(journal_settings, PoisonedCredits) as rs:

        async def failed() -> bool:
            return await state_of(rs) == "failed"

        await eventually(failed)

    # No worker runs: the row itself says failed (not paused, not merely stopped).
    async with await open_projections(journal_settings=journal_settings) as projections:
        (status,) = await projections.status()
        assert (status.state, status.paused, status.owner) == ("failed", False, None)
        assert status.failure is not None and status.failure.offset == bad[0].offset

    # A restarted process finds it failed, and does not handle on past the event.
    after = await accounts.credit("ok", 3)
    async with await start(journal_settings, PoisonedCredits) as rs:
        (worker,) = rs.workers

        async def worker_failed() -> bool:
            return bool(worker.state == "failed")

        await eventually(worker_failed)
        await asyncio.sleep(0.3)  # several lease renewals: none of them turns it into a pause
        (status,) = await rs.status()
        assert (status.state, status.paused, status.owner) == ("failed", False, worker.owner)
        assert offsets(await credits(rs)) == [before[0].offset]

        # An operator's pause on top of it: both show, each as itself.
        await rs.projections.pause("poisoned-credits")
        await asyncio.sleep(0.2)
        (status,) = await rs.status()
        assert (status.state, status.paused) == ("failed", True)

        # The handler is fixed; resume clears both: the event is retried and handled, and the
        # failure line clears once the worker has committed past it.
        PoisonedCredits.poison = set()
        assert await rs.projections.resume("poisoned-credits") == 1
        await rs.wait_until_caught_up()
        assert offsets(await credits(rs)) == [e.offset for e in before + bad + after]
        (status,) = await rs.status()
        assert (status.state, status.paused, status.failure) == ("running", False, None)


async def test_skip_moves_a_failed_worker_past_its_event(
    journal: Storage, journal_settings: JournalSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lagompy.readside")
    accounts = Accounts(journal)
    ok = await accounts.credit("ok", 1)
    bad = await accounts.credit("bad", 2)
    PoisonedCredits.poison = {"bad"}
    async with await start(journal_settings, PoisonedCredits) as rs:

        async def failed() -> bool:
            return await state_of(rs) == "failed"

        await eventually(failed)
        assert await rs.projections.skip("poisoned-credits") == 1

        async def running() -> bool:
            return await state_of(rs) == "running"

        await eventually(running)
        (status,) = await rs.status()
        assert (status.offset, status.skipped, status.lag_events) == (bad[0].offset, 1, 0)
        f = status.failure
        assert f is not None and f.offset == bad[0].offset and f.entity_id == "bad"
        assert f.error.startswith("skipped by an operator: handler failed")
        messages = [r.getMessage() for r in caplog.records]
        assert any(
            f"skipped the event at offset {bad[0].offset}" in m and "'skip:" in m for m in messages
        )
        assert any("after an operator's skip ('skip:" in m for m in messages)

        # Once the worker commits past it, the line clears; the count stays.
        later = await accounts.credit("ok", 3)
        await rs.wait_until_caught_up()
        assert offsets(await credits(rs)) == [ok[0].offset, later[0].offset]
        (status,) = await rs.status()
        assert (status.state, status.skipped, status.failure) == ("running", 1, None)
        with pytest.raises(ConfigurationError, match=r"nothing to skip: .* is not stopped"):
            await rs.projections.skip("poisoned-credits")


# --------------------------------------------------------------------------- offsets and leases


async def test_set_offset_beyond_the_head_is_refused_or_forced_with_a_negative_lag(
    journal: Storage, journal_settings: JournalSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lagompy.readside")
    accounts = Accounts(journal)
    events = await accounts.credit("a", 1, 2)
    head = events[-1].offset
    async with await start(journal_settings, CreditsProjection) as rs:
        await rs.wait_until_caught_up()
        with pytest.raises(
            ConfigurationError,
            match=rf"offset {head + 10} is beyond the head of tag .* \(offset {head}\).*force",
        ):
            await rs.projections.set_offset("contract-credits", CONTRACT_TAG, head + 10)
        (status,) = await rs.status()
        assert (status.offset, status.lag_events) == (head, 0)

        await rs.projections.set_offset("contract-credits", CONTRACT_TAG, head + 10, force=True)

        async def moved() -> bool:
            (s,) = await rs.status()
            return bool(s.offset == head + 10 and s.state == "running")

        await eventually(moved)
        (status,) = await rs.status()
        assert (status.head_offset, status.lag_events) == (head, -10)  # never a reassuring 0

        # Who took the lease is logged: the worker that lost it names the operator's
        # set-offset, the one that took it next says after whom.
        messages = [r.getMessage() for r in caplog.records]
        assert any("set the offset from" in m and "'set-offset:" in m for m in messages)
        assert any("was taken by an operator's set-offset ('set-offset:" in m for m in messages)
        assert any("after an operator's set-offset ('set-offset:" in m for m in messages)

        # A rebuild takes every lease of the processor: logged as such.
        caplog.clear()
        assert await rs.projections.rebuild(CreditsProjection, journal=rs.journal) == 2
        messages = [r.getMessage() for r in caplog.records]
        assert any("lease taken by 'rebuild:" in m and "from another worker" in m for m in messages)
        (status,) = await rs.status()
        assert status.lag_events == 0


# --------------------------------------------------------------------------- decoding


async def test_a_processor_of_some_event_types_reads_a_mixed_tag_to_its_head(
    journal: Storage, journal_settings: JournalSettings
) -> None:
    accounts = Accounts(journal)
    await accounts.append("n", Noise("first"))
    one = await accounts.credit("a", 1)
    await accounts.append("n", Noise("second"), Noise("third"), Noise("fourth"))
    two = await accounts.credit("b", 2)
    await accounts.append("n", Noise("last"))
    # CreditsProjection declares event_types = (Credited,) and no entities: the serializer its
    # read side builds knows Credited only, so a Noise event would not even decode.
    async with await start_readside(
        [CreditsProjection], journal_settings=journal_settings, **ALL_FAST
    ) as rs:
        await rs.wait_until_caught_up(timeout=20)
        assert offsets(await credits(rs)) == [one[0].offset, two[0].offset]
        (status,) = await rs.status()
        assert (status.state, status.lag_events, status.failure) == ("running", 0, None)
        assert status.offset == status.head_offset
        # Live: a page of nothing but other types still moves the offset.
        tail = await accounts.append("n", Noise("more"), Noise("and more"))
        await rs.wait_until_caught_up(timeout=20)
        (status,) = await rs.status()
        assert status.offset == tail[-1].offset


async def test_read_tag_decodes_only_the_wanted_types_and_stops_before_an_undecodable_event(
    journal: Storage, journal_settings: JournalSettings
) -> None:
    accounts = Accounts(journal)
    first = await accounts.append("n", Noise("x"))
    credit = await accounts.credit("a", 1)
    last = await accounts.append("n", Noise("y"))
    reader_serializer = Serializer([Credited])  # Noise would not decode
    wanted = reader_serializer.type_names_of([Credited])
    assert wanted == {"lagompy.contract.readside.Credited"}
    async with await open_storage(
        settings=journal_settings, serializer=reader_serializer
    ) as reader:
        read = reader.journal.read_tag
        page = await read(CONTRACT_TAG, event_types=wanted)
        assert [e.offset for e in page.envelopes] == [credit[0].offset]
        assert (page.last_offset, page.scanned, page.full, page.error) == (
            last[0].offset,
            3,
            False,
            None,
        )
        page = await read(CONTRACT_TAG, limit=2, event_types=wanted)
        assert (page.last_offset, page.scanned, page.full) == (credit[0].offset, 2, True)
        page = await read(CONTRACT_TAG, after_offset=credit[0].offset, event_types=wanted)
        assert (page.envelopes, page.last_offset, page.scanned) == ([], last[0].offset, 1)

        # Without a filter, the page ends before the first event that cannot be decoded.
        page = await read(CONTRACT_TAG)
        assert (page.envelopes, page.last_offset, page.scanned, page.full) == ([], 0, 0, False)
        assert page.error is not None and page.error.offset == first[0].offset
        page = await read(CONTRACT_TAG, after_offset=first[0].offset)
        assert [e.offset for e in page.envelopes] == [credit[0].offset]
        assert page.last_offset == credit[0].offset and page.scanned == 1
        assert page.error is not None and page.error.offset == last[0].offset
        with pytest.raises(EventDecodeError, match="cannot decode event"):
            await reader.journal.events_by_tag(CONTRACT_TAG)


class EveryCredit(CreditsProjection):
    """Handles every event of the contract tag (no event_types): it must decode them all."""

    name = "every-credit"
    event_types = None


async def test_an_undecodable_event_stops_the_worker_visibly(
    journal: Storage, journal_settings: JournalSettings
) -> None:
    accounts = Accounts(journal)
    ok = await accounts.credit("a", 1)
    noise = await accounts.append("n", Noise("unknown to the read side"))
    later = await accounts.credit("a", 2)
    async with await start_readside(
        [EveryCredit],
        journal_settings=journal_settings,
        serializer=Serializer([Credited]),  # Noise is unknown here
        **FAST,
    ) as rs:

        async def failed() -> bool:
            return await state_of(rs) == "failed"

        await eventually(failed)  # not a silent retry loop
        (status,) = await rs.status()
        assert status.offset == ok[0].offset and status.lag_events == 2
        f = status.failure
        assert f is not None
        assert (f.offset, f.entity_type, f.entity_id, f.seq_nr, f.attempts) == (
            noise[0].offset,
            "contract-account",
            "n",
            1,
            FAST["max_attempts"],
        )
        assert "cannot be decoded" in f.error and "lagompy.contract.readside.Noise" in f.error
        assert "event_types" in f.error  # the hint: what to declare
        assert rs.workers[0].state == "failed"

        assert await rs.projections.skip("every-credit") == 1
        await rs.wait_until_caught_up()
        assert offsets(await credits(rs)) == [ok[0].offset, later[0].offset]
        (status,) = await rs.status()
        assert (status.state, status.skipped, status.failure) == ("running", 1, None)


async def test_a_prepare_that_keeps_failing_shows_as_stalled(
    journal: Storage, journal_settings: JournalSettings
) -> None:
    accounts = Accounts(journal)
    events = await accounts.credit("a", 1)
    StallingCredits.prepare_fails = True
    async with await start(journal_settings, StallingCredits) as rs:

        async def stalled() -> bool:
            return await state_of(rs) == "stalled"

        await eventually(stalled)
        (status,) = await rs.status()
        assert status.failure is not None and status.failure.offset == 0
        assert (
            f"prepare({CONTRACT_TAG!r}) failed: RuntimeError: the projection's schema is being "
            "migrated" in status.failure.error
        )
        StallingCredits.prepare_fails = False
        await rs.wait_until_caught_up()
        (status,) = await rs.status()
        assert (status.state, status.failure, status.offset) == ("running", None, events[0].offset)


async def test_a_journal_that_cannot_be_read_shows_as_stalled_until_it_can(
    journal: Storage, journal_settings: JournalSettings
) -> None:
    accounts = Accounts(journal)
    first = await accounts.credit("a", 1)
    async with await start(journal_settings, CreditsProjection) as rs:
        await rs.wait_until_caught_up()
        # The journal's tag index goes away (a botched migration, say): reads fail.
        async with journal.database.write() as conn:
            await conn.execute(text("ALTER TABLE lagompy_event_tags RENAME TO tags_away"))
        # The status without the journal (its lag query needs the missing table too).
        projections = Projections(rs.projection)
        try:

            async def stalled() -> bool:
                (s,) = await projections.status()
                return s.state == "stalled"

            await eventually(stalled)
            (status,) = await projections.status()
            assert status.failure is not None and status.failure.offset == first[0].offset
            assert status.failure.error.startswith(
                f"reading the journal after offset {first[0].offset} failed: "
            )
        finally:
            async with journal.database.write() as conn:
                await conn.execute(text("ALTER TABLE tags_away RENAME TO lagompy_event_tags"))
        more = await accounts.credit("a", 2)
        await rs.wait_until_caught_up()

        async def running() -> bool:
            (s,) = await rs.status()
            return s.state == "running" and s.failure is None

        await eventually(running)
        assert offsets(await credits(rs)) == [first[0].offset, more[0].offset]


# --------------------------------------------------------------------------- projection writes


class AccountsOnce(SqlReadSideProcessor):
    """One row per account: a second credit of an account breaks the primary key."""

    name = "accounts-once"
    tag = CONTRACT_TAG
    event_types = (Credited,)

    async def global_prepare(self, conn: AsyncConnection) -> None:
        await conn.execute(
            text(
                "CREATE TABLE IF NOT EXISTS accounts_once "
                "(account TEXT PRIMARY KEY, amount BIGINT NOT NULL)"
            )
        )

    async def handle(self, conn: AsyncConnection, envelope: EventEnvelope[Any]) -> None:
        event = envelope.event
        await conn.execute(
            text("INSERT INTO accounts_once VALUES (:a, :m)"),
            {"a": event.account, "m": event.amount},
        )


def driver(journal_settings: JournalSettings) -> ReadSideTestDriver:
    return ReadSideTestDriver(
        AccountsOnce,
        journal_settings=journal_settings,
        serializer=Serializer([Credited, Noise]),
        settings=ReadSideSettings(**FAST),
        entity_type="contract-account",
    )


async def assert_labelled(d: ReadSideTestDriver, failure: ReadSideHandlerFailed) -> None:
    message = str(failure)
    assert f"read-side processor 'accounts-once', tag '{CONTRACT_TAG}'" in message
    assert (
        f"handler failed at offset {failure.offset} (contract-account/e2 sequence number 1)"
        in message
    )
    assert "database error" in message
    # The projection's own database error, never relabelled as the journal's.
    assert "JournalError" not in message and "write transaction" not in message
    assert (failure.processor, failure.entity_id, failure.seq_nr) == ("accounts-once", "e2", 1)
    row = await OffsetStore(d.projection).row("accounts-once", CONTRACT_TAG)
    assert row is not None and row.state == "failed" and row.error_offset == failure.offset
    assert row.error is not None and "database error" in row.error


async def test_a_constraint_violation_is_a_handler_failure_naming_the_event(
    journal_settings: JournalSettings,
) -> None:
    async with driver(journal_settings) as d:
        await d.feed("e1", Credited("dup", 1))
        with pytest.raises(ReadSideHandlerFailed) as failed:
            await d.feed("e2", Credited("dup", 2))
        await assert_labelled(d, failed.value)
        assert "unique" in str(failed.value).lower()


@pytest.mark.postgres
async def test_a_nul_in_a_postgres_text_column_is_a_handler_failure_naming_the_event(
    postgres_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PostgreSQL only: SQLite text columns hold NUL characters.
    journal_settings = JournalSettings(
        url=POSTGRES_URL, postgres_schema=postgres_schema, auto_migrate=True
    )
    # The journal takes NUL characters here (the serializer setting is off): the read side
    # must be the one to trip, and say so.
    monkeypatch.setenv("LAGOMPY_SERIALIZER_ALLOW_NUL", "true")
    async with driver(journal_settings) as d:
        await d.feed("e1", Credited("fine", 1))
        with pytest.raises(ReadSideHandlerFailed) as failed:
            await d.feed("e2", Credited("nul\x00here", 2))
        await assert_labelled(d, failed.value)
        assert "CharacterNotInRepertoireError (SQLSTATE 22021)" in str(failed.value)
        assert '"UTF8": 0x00' in str(failed.value)


# --------------------------------------------------------------------------- NUL at the ask


@dataclass(frozen=True)
class Noted:
    text: str


@dataclass(frozen=True)
class AddNote(Command[int]):
    text: str


@dataclass(frozen=True)
class Notes:
    count: int = 0


class NotesEntity(PersistentEntity[AddNote, Noted, Notes]):
    type_name = "notes"
    initial_state = Notes()
    tag = tag("notes")

    def on_command(self, state: Notes, command: AddNote) -> Effect[Notes]:
        return Effect.persist(Noted(command.text)).then_reply(lambda s: s.count)

    def on_event(self, state: Notes, event: Noted) -> Notes:
        return Notes(state.count + 1)


async def test_a_nul_character_is_refused_at_the_ask(journal_settings: JournalSettings) -> None:
    async with await start_in_process(entities=[NotesEntity], settings=journal_settings) as ents:
        ref = ents.ref_for(NotesEntity, "n1")
        assert await ref.ask(AddNote("fine")) == 1
        with pytest.raises(
            EncodeError, match=r"^Noted\.text: the string .* contains a NUL character .*index 3"
        ):
            await ref.ask(AddNote("bad\x00"))
        assert await ref.ask(AddNote("fine again")) == 2
    async with await open_storage(settings=journal_settings, entities=[NotesEntity]) as storage:
        stored = await storage.journal.events("notes", "n1")
    assert [e.event.text for e in stored] == ["fine", "fine again"]  # nothing half-written


async def test_readiness_names_a_global_prepare_that_keeps_failing(
    journal_settings: JournalSettings,
) -> None:
    from lagompy.readside import ReadSideComponent

    CreditsProjection.failing_global_prepares = 10_000
    component = ReadSideComponent([CreditsProjection], journal_settings=journal_settings, **FAST)
    await component.start()
    try:

        async def names_it() -> bool:
            ready = await component.ready()
            return isinstance(ready, str) and ready.startswith(
                "read-side processor 'contract-credits': global_prepare failed (attempt "
            )

        await eventually(names_it)
        assert "RuntimeError: global_prepare failed on purpose" in str(await component.ready())
        CreditsProjection.failing_global_prepares = 0

        async def ready() -> bool:
            return await component.ready() is True

        await eventually(ready)
    finally:
        CreditsProjection.failing_global_prepares = 0
        await component.stop()
