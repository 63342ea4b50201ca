"""Process managers on a journal placed on several databases (tests/process_entities.py's orders
drive a ledger): one worker per (manager, tag, database), keyed like the read sides' partitions
(the tag on the home database, ``tag@name`` on another), each reading its own database's journal.

* every order of every database is charged once, and its reminder fires once per partition;
* the status lists each partition with its lag against its own database; the CLI takes
  partition keys;
* a worker that dies between its sends and its commit (in process, or its process killed)
  re-runs the events: the ledger applies each command once;
* command ids on the home database are those of a journal on one database (a journal that
  gets a second database still absorbs re-runs of its old events); on another they name it;
* a manager whose source is a topic on the embedded transport follows the topic's relay log
  (written by the producing service's relays in the home database); one on a transport given
  follows what that transport carries.

The orders are written straight to their databases' journals (the in-process runtime opens one
database); the ledger is an in-process runtime on a journal of its own, whose stored replies
show the command ids.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from process_entities import (
    ChargeFromTopic,
    Fulfil,
    Ledger,
    LedgerEntity,
    OrderCancelled,
    OrderEntity,
    OrderPlaced,
    Peek,
    PlaceOrder,
    payments_due,
)
from sqlalchemy import select
from typer.testing import CliRunner

from lagompy import open_storage, start
from lagompy.cli import build_app
from lagompy.journal._journal import AtomicWrite
from lagompy.journal._placement import HOME, Placement, partition_key
from lagompy.journal._storage import PlacedStorage, open_placed_storage
from lagompy.process import ProcessManagers, start_process_managers
from lagompy.runtime import InProcessEntities
from lagompy.settings import JournalSettings
from lagompy.sql import _schema as schema
from lagompy.sql._database import Database
from lagompy.topic import TopicsComponent
from lagompy.topic._embedded import EmbeddedTransport
from tests.conftest import Placed, placed_cli

TESTS = Path(__file__).resolve().parent
FAST: dict[str, Any] = {"retry_initial_delay": 0.01, "retry_max_delay": 0.05, "renew_interval": 0.2}


@pytest.fixture
def ledger_settings(tmp_path: Path) -> JournalSettings:
    """The ledger's journal: a database of its own (the target of the commands)."""
    return JournalSettings(url=f"sqlite:///{tmp_path / 'ledger.db'}")


async def open_ledger(settings: JournalSettings) -> InProcessEntities:
    return await start(
        ray=False, app="pm-placed", entities=[LedgerEntity], journal_settings=settings
    )


@pytest.fixture
async def ledger_runtime(ledger_settings: JournalSettings) -> AsyncIterator[InProcessEntities]:
    entities = await open_ledger(ledger_settings)
    try:
        yield entities
    finally:
        await entities.close()


async def ledger(runtime: Any) -> Ledger:
    book: Ledger = await runtime.ref_for(LedgerEntity, "main").ask(Peek())
    return book


async def place(storage: PlacedStorage, orders: list[str], *, remind_after: float = 3600.0) -> None:
    """An OrderPlaced event per order, appended to its own database's journal."""
    for order in orders:
        write = AtomicWrite(
            "pm-order",
            order,
            0,
            [OrderPlaced(10, remind_after)],
            [(OrderEntity.tag.for_entity(order),)],
        )
        (result,) = await storage.of(order).journal.append([write])
        result.unwrap()


async def cancel(storage: PlacedStorage, order: str) -> None:
    write = AtomicWrite(
        "pm-order", order, 1, [OrderCancelled()], [(OrderEntity.tag.for_entity(order),)]
    )
    (result,) = await storage.of(order).journal.append([write])
    result.unwrap()


async def offsets(storage: PlacedStorage, orders: list[str]) -> dict[str, tuple[int, str]]:
    """(offset in its database, database name) of each order's OrderPlaced."""
    out = {}
    for order in orders:
        first, *_ = await storage.of(order).journal.events("pm-order", order)
        out[order] = (first.offset, storage.placement.database_of(order))
    return out


async def stored_ids(settings: JournalSettings) -> list[str]:
    """The command ids the ledger stored replies under (what absorbs a re-run)."""
    database = Database.create(settings)
    try:
        async with database.read() as conn:
            rows = await conn.execute(
                select(schema.command_replies.c.command_id).where(
                    schema.command_replies.c.entity_type == "pm-ledger"
                )
            )
            return sorted(r[0] for r in rows)
    finally:
        await database.dispose()


def charge_id(offset: int, database: str) -> str:
    """The id a single-database run gives (``fulfil:<offset>:0``), naming another database."""
    return f"fulfil:{offset}:0" if database == HOME else f"fulfil:{offset}@{database}:0"


def keys_of(placement: Placement) -> list[str]:
    return sorted(k for t in OrderEntity.tag.all_tags for k, _ in placement.partitions(t))


async def catch_up(managers: ProcessManagers) -> None:
    for worker in managers.workers:
        await worker.catch_up()


async def eventually(check: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- every database


@pytest.mark.parametrize("databases", [2, 4])
async def test_every_database_drives_the_manager_once(
    placed: Placed,
    databases: int,
    ledger_runtime: InProcessEntities,
    ledger_settings: JournalSettings,
) -> None:
    settings = await placed(databases)
    placement = Placement.of(settings)
    orders = [f"o{i}" for i in range(40)]
    async with await open_placed_storage(entities=[OrderEntity], settings=settings) as storage:
        await place(storage, orders, remind_after=0.0)  # reminders due at once
        where = await offsets(storage, orders)
        # Every database holds some orders (else the test proves little).
        assert {name for _, name in where.values()} == set(placement.names)
        async with start_process_managers(
            [Fulfil], entities=ledger_runtime, journal_settings=settings, run=False
        ) as managers:
            assert sorted(w.tag for w in managers.workers) == keys_of(placement)
            for w in managers.workers:  # each reads its database's journal, the plain tag
                assert (w.journal_tag, w.placed_on) == placement.split(w.tag)
                assert w.journal is not None
                opened, wanted = w.journal.database.settings, placement.settings_of(w.placed_on)
                assert (opened.url, opened.postgres_schema) == (wanted.url, wanted.postgres_schema)
            await catch_up(managers)
            assert sorted((await ledger(ledger_runtime)).of("charge")) == sorted(orders)

            # The status: each partition, its position at its own database's head.
            statuses = await managers.status("fulfil")
            assert sorted(s.tag for s in statuses) == keys_of(placement)
            for s in statuses:
                tag, name = placement.split(s.tag)
                assert s.tag == partition_key(tag, name) and s.database == name
                mine = [
                    o
                    for o, (_, db) in where.items()
                    if db == name and OrderEntity.tag.for_entity(o) == tag
                ]
                head = max((where[o][0] for o in mine), default=0)
                assert (s.offset, s.worker.lag_events) == (head, 0)
                assert (s.active_keys, s.pending_timers) == (len(mine), len(mine))

            # Each partition fires its own timers, once.
            fired = [await w.fire_due_timers() for w in managers.workers]
            assert sum(fired) == len(orders)
            assert all(n > 0 for n in fired)  # every partition had some
            assert [await w.fire_due_timers() for w in managers.workers] == [0] * len(fired)
            assert sorted((await ledger(ledger_runtime)).of("remind")) == sorted(orders)
            assert sum(s.pending_timers for s in await managers.status()) == 0

            # Caught up again: nothing sent twice; an order cancelled on any database ends.
            await catch_up(managers)
            for order in orders[:4]:
                await cancel(storage, order)
            await catch_up(managers)
            book = await ledger(ledger_runtime)
            assert sorted(book.of("refund")) == sorted(orders[:4])
            assert len(book.entries) == 2 * len(orders) + 4
            for order in orders[:4]:
                assert await managers.state("fulfil", order) is None

    # The ids name the database beyond the home one: all distinct, each stored once.
    ids = await stored_ids(ledger_settings)
    assert len(ids) == len(set(ids)) == len(book.entries)
    for offset, name in where.values():
        assert charge_id(offset, name) in ids
        timer = f"e{offset}" if name == HOME else f"e{offset}@{name}"
        assert f"fulfil:timer:{timer}.0:0" in ids


async def test_a_crash_between_the_sends_and_the_commit_is_absorbed_on_another_database(
    placed: Placed, ledger_runtime: InProcessEntities
) -> None:
    settings = await placed(2)
    placement = Placement.of(settings)
    orders = [f"c{i}" for i in range(30)]

    class Crash(BaseException):
        """The worker dies where its transaction would commit."""

    async with await open_placed_storage(entities=[OrderEntity], settings=settings) as storage:
        await place(storage, orders)
        async with start_process_managers(
            [Fulfil], entities=ledger_runtime, journal_settings=settings, run=False
        ) as managers:
            worker = next(w for w in managers.workers if w.placed_on == "b")
            real = worker.states.write

            async def crash(*args: Any, **kwargs: Any) -> None:
                raise Crash

            worker.states.write = crash  # type: ignore[method-assign]
            with pytest.raises(Crash):
                await worker.catch_up()
            worker.states.write = real  # type: ignore[method-assign]
            sent = (await ledger(ledger_runtime)).of("charge")
            assert sent and all(placement.database_of(o) == "b" for o in sent)
            assert worker.offset == 0  # nothing committed
        # A new runner re-runs them: the same ids, answered from the stored replies.
        async with start_process_managers(
            [Fulfil], entities=ledger_runtime, journal_settings=settings, run=False
        ) as managers:
            await catch_up(managers)
    assert sorted((await ledger(ledger_runtime)).of("charge")) == sorted(orders)


async def test_running_runners_share_the_partitions_restart_and_fire_each_timer_once(
    placed: Placed, ledger_runtime: InProcessEntities
) -> None:
    """Runners that run: their timer loops fire each partition's reminders once; a second
    runner takes some of the partitions (keys of every database) over; a restart resumes each
    partition from its own position."""
    settings = await placed(2)
    first = [f"r{i}" for i in range(20)]
    second = [f"s{i}" for i in range(20)]

    def reminded(orders: list[str]) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return sorted((await ledger(ledger_runtime)).of("remind")) == sorted(orders)

        return check

    def held(managers: ProcessManagers) -> set[str]:
        return {w.tag for w in managers.workers if w.lease is not None}

    async with await open_placed_storage(entities=[OrderEntity], settings=settings) as storage:
        await place(storage, first, remind_after=0.3)
        async with start_process_managers(
            [Fulfil], entities=ledger_runtime, journal_settings=settings, **FAST
        ) as one:
            await one.wait_until_caught_up()
            await eventually(reminded(first))
            async with start_process_managers(
                [Fulfil], entities=ledger_runtime, journal_settings=settings, **FAST
            ) as two:

                async def shared() -> bool:
                    mine, theirs = held(one), held(two)
                    return bool(mine and theirs) and mine | theirs == set(
                        keys_of(storage.placement)
                    )

                await eventually(shared)
                await place(storage, second, remind_after=0.3)
                await one.wait_until_caught_up()
                await two.wait_until_caught_up()
                await eventually(reminded([*first, *second]))
        # Stopped: more orders; a restart goes on from each partition's position.
        third = [f"t{i}" for i in range(20)]
        await place(storage, third, remind_after=0.3)
        async with start_process_managers(
            [Fulfil], entities=ledger_runtime, journal_settings=settings, **FAST
        ) as again:
            await again.wait_until_caught_up()
            await eventually(reminded([*first, *second, *third]))
            await asyncio.sleep(0.5)  # a timer loop's second look fires nothing
            statuses = await again.status()
            assert sum(s.pending_timers for s in statuses) == 0
            assert all(s.worker.lag_events == 0 for s in statuses)
    book = await ledger(ledger_runtime)
    assert sorted(book.of("charge")) == sorted([*first, *second, *third])  # each once
    assert sorted(book.of("remind")) == sorted([*first, *second, *third])


CHILD = """
import asyncio, sys
from lagompy import start
from lagompy.process import start_process_managers
from lagompy.settings import JournalSettings, PlacedDatabase
from process_entities import FulfilThenHang, LedgerEntity

async def main() -> None:
    placed = JournalSettings.model_validate_json(sys.argv[1])
    ledger = JournalSettings.model_validate_json(sys.argv[2])
    async with await start(
        ray=False, app="pm-placed", entities=[LedgerEntity], journal_settings=ledger
    ) as entities:
        async with start_process_managers(
            [FulfilThenHang], entities=entities, journal_settings=placed,
            lease_ttl=2.0, renew_interval=0.5,
        ):
            print("started", flush=True)
            await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_killed_runner_s_commands_are_applied_once_on_every_database(
    placed: Placed, ledger_settings: JournalSettings
) -> None:
    """The runner's process is killed (SIGKILL) while a worker of another database than the
    home one hangs after its sends, before its commit; a new runner takes the partitions over
    once the leases expire and re-runs what was not committed: each command applied once."""
    settings = await placed(2)
    placement = Placement.of(settings)
    hang = next(o for o in (f"hang-{i}" for i in range(100)) if placement.database_of(o) == "b")
    orders = [*(f"k{i}" for i in range(20)), hang]
    async with await open_placed_storage(entities=[OrderEntity], settings=settings) as storage:
        await place(storage, orders)
    async with await open_ledger(ledger_settings):
        pass  # its tables, before the child writes them
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        settings.model_dump_json(),
        ledger_settings.model_dump_json(),
        env={**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{TESTS.parent}"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:

        async def every_order_charged() -> bool:  # the hanging one too: sent, not committed
            return len(await stored_ids(ledger_settings)) == len(orders)

        await eventually(every_order_charged, timeout=60)
    finally:
        child.kill()  # SIGKILL: no cleanup, the leases stay held until they expire
        await child.wait()
    async with await open_ledger(ledger_settings) as entities:
        async with start_process_managers(
            [Fulfil], entities=entities, journal_settings=settings, run=False
        ) as managers:
            key = partition_key(OrderEntity.tag.for_entity(hang), "b")
            worker = managers.worker("fulfil", key)
            (row,) = [s for s in await managers.status() if s.tag == key]
            assert row.offset == 0  # the hanging batch never committed
            await catch_up(managers)  # waits for the dead runner's leases to expire
            assert worker.offset > 0
            book = await ledger(entities)
            assert sorted(book.of("charge")) == sorted(orders)  # each once
            state = await managers.state("fulfil", hang)
            assert state is not None and state.status == "charged"


async def test_a_service_on_ray_runs_the_managers_on_every_database(
    ray_session: Any, placed: Placed
) -> None:
    """The runtime's shard hosts write each order to its slice's database (and the ledger to
    its own); the component's workers follow every database: each order charged and reminded
    once, the route and the metrics list each partition."""
    import httpx
    from fastapi import FastAPI

    from lagompy.process import ProcessManagersComponent
    from lagompy.runtime import shutdown_app
    from lagompy.service import Service

    settings = await placed(2)
    placement = Placement.of(settings)
    app_name = f"pmp-{uuid.uuid4().hex[:8]}"
    component = ProcessManagersComponent([Fulfil], **FAST)
    service = Service(
        name=app_name,
        entities=[OrderEntity, LedgerEntity],
        journal_settings=settings,
        ray=True,
        runtime_options={"hosts": 1, "shards": 8},
        components=[component],
    )
    app = FastAPI()
    service.install(app)
    await service.start()
    try:
        candidates = [f"order-{i}" for i in range(200)]
        orders = [o for o in candidates if placement.database_of(o) == HOME][:8]
        orders += [o for o in candidates if placement.database_of(o) == "b"][:8]
        for order in orders:
            await service.entities.ref_for(OrderEntity, order).ask(PlaceOrder(5, 0.3))
        await component.wait_until_caught_up()

        async def reminded() -> bool:
            return sorted((await ledger(service.entities)).of("remind")) == sorted(orders)

        await eventually(reminded, timeout=60)
        book = await ledger(service.entities)
        assert sorted(book.of("charge")) == sorted(orders)
        assert len(book.entries) == 2 * len(orders)  # nothing twice
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as http:
            rows = (await http.get("/process-managers")).json()
            assert sorted(r["tag"] for r in rows) == keys_of(placement)
            assert {r["database"] for r in rows} == {HOME, "b"}
            assert all(r["lag_events"] == 0 for r in rows)
            metrics = (await http.get("/metrics")).text
            for key in keys_of(placement):
                assert f'partition="{key}"' in metrics
            ready = (await http.get("/health/ready")).json()
            assert ready["checks"]["process-managers"] == "ok", ready
    finally:
        await service.stop()
        await shutdown_app(app_name)


# --------------------------------------------------------------------------- the home database


async def test_a_journal_that_gets_a_second_database_keeps_its_command_ids(
    placed: Placed, ledger_runtime: InProcessEntities, ledger_settings: JournalSettings
) -> None:
    """The home database's events keep the ids of a journal on one database: a re-run of
    them after the journal got a second database is answered from the replies stored
    before; the new database's ids name it."""
    one = await placed(1)
    grown = JournalSettings(**{**one.model_dump(), "databases": (await placed(2)).databases})
    placement = Placement.of(grown)
    first = [f"h{i}" for i in range(30) if placement.database_of(f"h{i}") == HOME][:8]
    async with await open_placed_storage(entities=[OrderEntity], settings=one) as storage:
        await place(storage, first)
        before = await offsets(storage, first)
    async with start_process_managers(
        [Fulfil], entities=ledger_runtime, journal_settings=one, run=False
    ) as managers:
        assert sorted(w.tag for w in managers.workers) == sorted(OrderEntity.tag.all_tags)
        await catch_up(managers)
    ids_one = await stored_ids(ledger_settings)
    assert ids_one == sorted(charge_id(offset, HOME) for offset, _ in before.values())

    later = [f"n{i}" for i in range(30)]
    async with await open_placed_storage(entities=[OrderEntity], settings=grown) as storage:
        await place(storage, later)
        after = await offsets(storage, later)
    assert {name for _, name in after.values()} == {HOME, "b"}
    async with start_process_managers(
        [Fulfil], entities=ledger_runtime, journal_settings=grown, run=False
    ) as managers:
        # Re-run the home database from its start: answered from the stored replies.
        for tag in OrderEntity.tag.all_tags:
            await managers.set_offset("fulfil", tag, 0)
        await catch_up(managers)
    book = await ledger(ledger_runtime)
    assert sorted(book.of("charge")) == sorted([*first, *later])  # each once
    ids = await stored_ids(ledger_settings)
    assert ids == sorted([*ids_one, *(charge_id(offset, name) for offset, name in after.values())])


async def test_keys_whose_entities_moved_to_another_database_go_on_there(
    placed: Placed, ledger_runtime: InProcessEntities
) -> None:
    """A journal that gets a second database and moves slices to it (``move_slices``): the
    managers' positions move too (nothing handled twice), and the keys of the moved entities go
    on in the partitions of the new database, their states and pending timers with them (not
    a key conflict)."""
    from lagompy.journal import move_slices

    one = await placed(1)
    grown = JournalSettings(**{**one.model_dump(), "databases": (await placed(2)).databases})
    placement = Placement.of(grown)
    candidates = [f"mv-{i}" for i in range(200)]
    moving = [o for o in candidates if placement.database_of(o) == "b"][:6]
    staying = [o for o in candidates if placement.database_of(o) == HOME][:4]
    async with await open_placed_storage(entities=[OrderEntity], settings=one) as storage:
        await place(storage, [*moving, *staying])
    async with start_process_managers(
        [Fulfil], entities=ledger_runtime, journal_settings=one, run=False
    ) as managers:
        await catch_up(managers)
    await move_slices(grown, grown.databases["b"].slices, target="b")

    cancelled, placed_again = moving[:3], moving[3:]
    async with await open_placed_storage(entities=[OrderEntity], settings=grown) as storage:
        for order in cancelled:
            await cancel(storage, order)
        for order in placed_again:  # a second OrderPlaced: charged again, a reminder due now
            write = AtomicWrite(
                "pm-order", order, 1, [OrderPlaced(10, 0.0)], [(OrderEntity.tag.for_entity(order),)]
            )
            (result,) = await storage.of(order).journal.append([write])
            result.unwrap()
    async with start_process_managers(
        [Fulfil], entities=ledger_runtime, journal_settings=grown, run=False
    ) as managers:
        await catch_up(managers)  # (a key conflict would stop the partitions of b)
        for order in placed_again:
            state = await managers.state("fulfil", order)
            assert state is not None and state.status == "charged"
        for order in cancelled:
            assert await managers.state("fulfil", order) is None
        fired = {w.tag: await w.fire_due_timers() for w in managers.workers}
        assert sum(n for k, n in fired.items() if placement.split(k)[1] == "b") == 3
        assert sum(n for k, n in fired.items() if placement.split(k)[1] == HOME) == 0
        counts: dict[str, list[int]] = {HOME: [0, 0], "b": [0, 0]}
        for s in await managers.status():
            counts[s.database][0] += s.active_keys
            counts[s.database][1] += s.pending_timers
        # The moved keys' states and their first reminders (due in an hour) are b's now.
        assert counts == {HOME: [4, 4], "b": [3, 3]}

        # A timer the old partition listed before its key moved is left to the new one.
        order = placed_again[0]
        tag = OrderEntity.tag.for_entity(order)
        old, new = managers.worker("fulfil", tag), managers.worker("fulfil", f"{tag}@b")
        (timer,) = [t for t in await new.states.due(new.tag, 2**62, 100) if t.key == order]
        lease = await old._hold(force=True)
        try:
            await old.strategy.fire(old, lease, timer)
        finally:
            await old.store.release(lease, state="idle")
        assert [t.timer_id for t in await new.states.due(new.tag, 2**62, 100)].count(
            timer.timer_id
        ) == 1
    book = await ledger(ledger_runtime)
    assert sorted(book.of("charge")) == sorted([*moving, *staying, *placed_again])
    assert sorted(book.of("refund")) == sorted(cancelled)
    assert sorted(book.of("remind")) == sorted(placed_again)


# --------------------------------------------------------------------------- refusals, CLI


async def test_a_topic_source_on_the_embedded_transport_follows_the_relay_log_on_several_databases(
    placed: Placed,
    ledger_runtime: InProcessEntities,
    ledger_settings: JournalSettings,
    tmp_path: Path,
) -> None:
    """The producing service's relays write the topic's partitions into the home database's
    relay log; the manager follows its partitions there: every order of both databases is
    charged once, and its positions and lag are the log's."""
    settings = await placed(2)
    placement = Placement.of(settings)
    orders = [f"o{i}" for i in range(40)]
    async with await open_placed_storage(entities=[OrderEntity], settings=settings) as storage:
        await place(storage, orders)
        where = await offsets(storage, orders)
    assert {name for _, name in where.values()} == set(placement.names)
    topics = TopicsComponent([payments_due], journal_settings=settings)
    await topics.start()
    try:
        assert topics.relays is not None
        await topics.relays.wait_until_caught_up(timeout=30)
        async with start_process_managers(
            [ChargeFromTopic], entities=ledger_runtime, journal_settings=settings, run=False
        ) as managers:
            partitions = [payments_due.partition_tag(p) for p in range(payments_due.partitions)]
            assert sorted(w.tag for w in managers.workers) == sorted(partitions)
            await catch_up(managers)
            # Offsets repeat across the log's partitions: the command ids name the partition.
            assert sorted((await ledger(ledger_runtime)).of("topic-charge")) == sorted(orders)
            ids = [i for i in await stored_ids(ledger_settings) if "charge-from-topic" in i]
            assert len(ids) == len(orders) and any(i.endswith("#1:0") for i in ids)
            statuses = await managers.status("charge-from-topic")
            assert sorted(s.tag for s in statuses) == sorted(partitions)
            # Relay-log offsets 1..N per partition: the positions add up to the messages.
            assert sum(s.offset for s in statuses) == len(orders)
            assert all(s.worker.head_offset == s.offset for s in statuses)
            assert all(s.worker.lag_events == 0 for s in statuses)
            await managers.wait_until_caught_up(timeout=10)
            # The relays' status (and metrics) are the relays' rows, not the manager's beside.
            relays = await topics.relay_status()
            assert relays and {s.processor for s in relays} == {"topic-relay:pm-payments-due"}
            assert "charge-from-topic" not in "".join(str(x) for x in await topics.metric_samples())
    finally:
        await topics.stop()


async def test_a_topic_source_on_a_transport_given_is_followed_on_several_databases(
    placed: Placed, ledger_runtime: InProcessEntities, tmp_path: Path
) -> None:
    settings = await placed(2)
    # A transport given carries another service's topic: followed, whatever this journal is.
    elsewhere = JournalSettings(url=f"sqlite:///{tmp_path / 'orders-elsewhere.db'}")
    async with await open_storage(settings=elsewhere, entities=[OrderEntity]) as orders:
        for order in ("e1", "e2"):
            write = AtomicWrite(
                "pm-order",
                order,
                0,
                [OrderPlaced(3, 3600.0)],
                [(OrderEntity.tag.for_entity(order),)],
            )
            (result,) = await orders.journal.append([write])
            result.unwrap()
        transport = EmbeddedTransport(orders.journal)
        try:
            async with start_process_managers(
                [ChargeFromTopic],
                entities=ledger_runtime,
                journal_settings=settings,
                transport=transport,
                run=False,
            ) as managers:
                await catch_up(managers)
        finally:
            await transport.close()
    assert sorted((await ledger(ledger_runtime)).of("topic-charge")) == ["e1", "e2"]


def test_the_cli_takes_partition_keys(placed: Placed, ledger_settings: JournalSettings) -> None:
    """``lagompy process-managers`` on a journal placed by the environment: status lists each
    partition (with its database and lag), ``--tag`` takes a partition key."""
    settings = asyncio.run(placed(2))
    placement = Placement.of(settings)
    orders = [f"q{i}" for i in range(20)]

    async def populate() -> None:
        async with await open_placed_storage(entities=[OrderEntity], settings=settings) as st:
            await place(st, orders)
        async with await open_ledger(ledger_settings) as entities:
            async with start_process_managers(
                [Fulfil], entities=entities, journal_settings=settings, run=False
            ) as managers:
                await catch_up(managers)

    asyncio.run(populate())
    env, args = placed_cli(settings)
    runner = CliRunner()

    def run(*words: str) -> Any:
        result = runner.invoke(build_app(), ["process-managers", *words, *args], env=env)
        assert result.exit_code == 0, result.output
        return result

    rows = {r["tag"]: r for r in json.loads(run("status", "fulfil", "--json").stdout)}
    assert sorted(rows) == keys_of(placement)
    assert {r["database"] for r in rows.values()} == {HOME, "b"}
    assert all(r["lag_events"] == 0 for r in rows.values())
    assert sum(r["active_keys"] for r in rows.values()) == len(orders)
    key = partition_key(OrderEntity.tag.all_tags[0], "b")
    assert "(1 partition)" in run("pause", "fulfil", "--tag", key).stdout
    rows = {r["tag"]: r for r in json.loads(run("status", "fulfil", "--json").stdout)}
    assert [k for k, r in rows.items() if r["paused"]] == [key]
    assert "(1 partition)" in run("resume", "fulfil", "--tag", key).stdout
