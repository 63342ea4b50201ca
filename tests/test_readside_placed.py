"""Read sides on a journal placed on several databases: one partition per (tag, database), keyed
by the tag on the home database and ``tag@name`` on another, each with its own lease and offset
and reading its own database's journal. Every event is handled exactly once; the status shows
each partition with its lag against its database; a restart resumes each partition from its own
offset; operations address partitions by key; a rebuild replays them all. On SQLite files and
PostgreSQL schemas, in process and on Ray (events written by the runtime's shard hosts)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from lagompy import JournalSettings
from lagompy.cli import build_app
from lagompy.errors import ConfigurationError
from lagompy.journal import TailSettings
from lagompy.journal._journal import AtomicWrite
from lagompy.journal._placement import HOME, Placement, partition_key
from lagompy.journal._storage import PlacedStorage, open_placed_storage
from lagompy.readside import (
    ParkedFilter,
    ReadSideComponent,
    open_projections,
    start_readside,
    start_readside_on_ray,
)
from lagompy.readside._ray import actor_name
from lagompy.sql._database import Database
from lagompy.testkit.readside import Credited, readside_contract_serializer
from tests.conftest import Placed, placed_cli
from tests.readside_order_events import PlacedOrderEvents
from tests.readside_processors import PlacedCredits, PoisonedPlacedCredits

FAST: dict[str, Any] = {
    "lease_ttl": 5.0,
    "renew_interval": 0.1,
    "tail": TailSettings(poll_interval=0.02),
}


async def credit(storage: PlacedStorage, accounts: range, seq: dict[str, int]) -> None:
    """One Credited event per account, each appended to its own database's journal."""
    tag = PlacedCredits.tag
    for i in accounts:
        account = f"acct-{i}"
        n = seq.get(account, 0)
        write = AtomicWrite(
            "account", account, n, [Credited(account, i)], [(tag.for_entity(account),)]
        )
        (result,) = await storage.of(account).journal.append([write])
        result.unwrap()
        seq[account] = n + 1


async def handled(projection: Database) -> list[tuple[str, int]]:
    """(account, sequence number) of every row of the projection, sorted (duplicates kept)."""
    async with projection.read() as conn:
        rows = await conn.execute(text("SELECT account, seq_nr FROM contract_credits"))
        return sorted((r[0], int(r[1])) for r in rows)


def every_event(seq: dict[str, int]) -> list[tuple[str, int]]:
    return sorted((a, s) for a, n in seq.items() for s in range(1, n + 1))


async def heads(storage: PlacedStorage) -> dict[str, int]:
    """The head offset of each partition key of PlacedCredits, from its own database."""
    out = {}
    for tag in PlacedCredits.tags():
        for key, name in storage.placement.partitions(tag):
            page = await storage.parts[name].journal.read_tag(tag, after_offset=0, limit=10_000)
            out[key] = page.envelopes[-1].offset if page.envelopes else 0
    return out


@pytest.mark.parametrize("databases", [1, 2, 4])
async def test_one_partition_per_tag_and_database_every_event_once(
    placed: Placed, databases: int
) -> None:
    settings = await placed(databases)
    placement = Placement.of(settings)
    keys = sorted(key for t in PlacedCredits.tags() for key, _ in placement.partitions(t))
    if databases == 1:
        assert keys == sorted(PlacedCredits.tags())  # the tags themselves, as ever
    seq: dict[str, int] = {}
    serializer = readside_contract_serializer()
    async with await open_placed_storage(settings=settings, serializer=serializer) as storage:
        await credit(storage, range(60), seq)
        # Every database holds some of the events (else the test proves little).
        assert {placement.database_of(a) for a in seq} == set(placement.names)

        PlacedCredits.prepared.clear()
        async with await start_readside(
            [PlacedCredits], journal_settings=settings, **FAST
        ) as readside:
            assert sorted(w.tag for w in readside.workers) == keys
            await readside.wait_until_caught_up(timeout=30)
            assert await handled(readside.projection) == every_event(seq)
            # prepare sees the plain tag, once per partition.
            assert sorted(PlacedCredits.prepared) == sorted(
                t for t in PlacedCredits.tags() for _ in placement.names
            )
            status = await readside.status("placed-credits")
            assert [s.tag for s in status] == keys
            expected = await heads(storage)
            for s in status:
                tag, name = placement.split(s.tag)
                assert s.tag == partition_key(tag, name)
                assert s.database == name
                assert (s.offset, s.head_offset, s.lag_events) == (expected[s.tag], s.offset, 0)
            stored = {s.tag: s.offset for s in status}

        # Stopped: more events; each partition's lag counts its own database's events.
        before = dict(seq)
        await credit(storage, range(40, 100), seq)
        async with await open_projections(journal_settings=settings) as projections:
            status = await projections.status("placed-credits")
            for s in status:
                tag, name = placement.split(s.tag)
                new = [
                    a
                    for a in seq
                    if placement.database_of(a) == name
                    and PlacedCredits.tag.for_entity(a) == tag
                    and seq[a] > before.get(a, 0)
                ]
                assert (s.offset, s.lag_events, s.state) == (stored[s.tag], len(new), "stopped")

        # A restart resumes each partition after its own offset: nothing twice, nothing lost.
        async with await start_readside(
            [PlacedCredits], journal_settings=settings, **FAST
        ) as readside:
            await readside.wait_until_caught_up(timeout=30)
            assert await handled(readside.projection) == every_event(seq)
            expected = await heads(storage)
            assert {s.tag: s.offset for s in await readside.status()} == expected


async def test_a_journal_that_gets_a_second_database_keeps_its_home_positions(
    placed: Placed,
) -> None:
    one = await placed(1)
    serializer = readside_contract_serializer()
    seq: dict[str, int] = {}
    async with await open_placed_storage(settings=one, serializer=serializer) as storage:
        await credit(storage, range(30), seq)
    async with await start_readside([PlacedCredits], journal_settings=one, **FAST) as readside:
        await readside.wait_until_caught_up(timeout=30)
        before = {s.tag: s.offset for s in await readside.status()}
    assert sorted(before) == sorted(PlacedCredits.tags())

    grown = JournalSettings(**{**one.model_dump(), "databases": (await placed(2)).databases})
    placement = Placement.of(grown)
    async with await open_placed_storage(settings=grown, serializer=serializer) as storage:
        await credit(storage, range(30, 60), seq)
        async with await start_readside(
            [PlacedCredits], journal_settings=grown, **FAST
        ) as readside:
            # The home partitions start where the tags were; the new ones from the start.
            status = {s.tag: s for s in await readside.status()}
            for tag in PlacedCredits.tags():
                assert status[tag].offset >= before[tag]
            await readside.wait_until_caught_up(timeout=30)
            assert await handled(readside.projection) == every_event(seq)
            status = {s.tag: s for s in await readside.status()}
            assert sorted(status) == sorted(
                k for t in PlacedCredits.tags() for k, _ in placement.partitions(t)
            )
            assert all(s.lag_events == 0 for s in status.values())


async def test_a_service_component_reports_each_partition(placed: Placed) -> None:
    settings = await placed(2)
    placement = Placement.of(settings)
    keys = sorted(k for t in PlacedCredits.tags() for k, _ in placement.partitions(t))
    seq: dict[str, int] = {}
    serializer = readside_contract_serializer()
    async with await open_placed_storage(settings=settings, serializer=serializer) as storage:
        await credit(storage, range(30), seq)
    component = ReadSideComponent([PlacedCredits], journal_settings=settings, **FAST)
    await component.start()
    try:
        await component.wait_until_caught_up(timeout=30)
        assert await component.ready() is True
        samples = await component.metric_samples()
        lag = {
            labels["tag"]: value
            for name, _, _, labels, value in samples
            if name == "lagompy_readside_lag_events"
        }
        assert lag == dict.fromkeys(keys, 0.0)
    finally:
        await component.stop()


@pytest.mark.parametrize("databases", [2])
async def test_operations_address_partitions_by_key(placed: Placed, databases: int) -> None:
    settings = await placed(databases)
    placement = Placement.of(settings)
    tag = PlacedCredits.tags()[0]
    other = partition_key(tag, "b")
    seq: dict[str, int] = {}
    serializer = readside_contract_serializer()
    async with await open_placed_storage(settings=settings, serializer=serializer) as storage:
        await credit(storage, range(60), seq)
        async with await start_readside(
            [PlacedCredits], journal_settings=settings, **FAST
        ) as readside:
            await readside.wait_until_caught_up(timeout=30)
        expected = await heads(storage)

        async with await open_projections(journal_settings=settings) as projections:
            # Pause one partition: only its row.
            assert await projections.pause("placed-credits", other) == 1
            paused = {s.tag for s in await projections.status() if s.paused}
            assert paused == {other}
            assert await projections.resume("placed-credits", other) == 1

            # set_offset checks against the head of the partition's own database.
            head_b = expected[other]
            with pytest.raises(ConfigurationError, match="database 'b'"):
                await projections.set_offset("placed-credits", other, head_b + 1)
            await projections.set_offset("placed-credits", other, 0)
            on_b = [
                a
                for a in seq
                if placement.database_of(a) == "b" and PlacedCredits.tag.for_entity(a) == tag
            ]
            rows = {s.tag: s for s in await projections.status()}
            assert (rows[other].offset, rows[other].lag_events) == (0, len(on_b))
            assert (rows[tag].offset, rows[tag].lag_events) == (expected[tag], 0)

            # A rebuild resets and replays every partition, each from its own database; one
            # database's journal alone is refused (the others' events would be left out).
            with pytest.raises(ConfigurationError, match="placed on several databases"):
                await projections.rebuild(PlacedCredits, journal=storage.parts[HOME].journal)
            count = await projections.rebuild(PlacedCredits, journal=storage)
            assert count == sum(seq.values())
            assert await handled(projections.projection) == every_event(seq)
            assert {s.tag: s.offset for s in await projections.status()} == expected


async def test_partitions_spread_over_the_members(placed: Placed) -> None:
    settings = await placed(2)
    placement = Placement.of(settings)
    keys = sorted(k for t in PlacedCredits.tags() for k, _ in placement.partitions(t))
    seq: dict[str, int] = {}
    serializer = readside_contract_serializer()
    async with await open_placed_storage(settings=settings, serializer=serializer) as storage:
        await credit(storage, range(40), seq)
        fast = {**FAST, "renew_interval": 0.2}
        async with (
            start_readside([PlacedCredits], journal_settings=settings, **fast) as one,
            start_readside([PlacedCredits], journal_settings=settings, **fast) as two,
        ):
            async with asyncio.timeout(20):
                while sorted(len(m.tags) for m in await one.projections.members()) != [2, 2]:
                    await asyncio.sleep(0.05)
            members = await one.projections.members("placed-credits")
            assert {m.member for m in members} == {one.member, two.member}
            assert sorted(t for m in members for t in m.tags) == keys
            await credit(storage, range(20, 60), seq)
            await one.wait_until_caught_up(timeout=30)
            assert await handled(one.projection) == every_event(seq)


def test_the_cli_takes_partition_keys(placed: Placed) -> None:
    """``lagompy projections`` on a journal placed by the environment
    (``LAGOMPY_JOURNAL_DATABASES``): status shows each partition, ``--tag`` and set-offset take
    a partition key, rebuild replays every database."""
    settings = asyncio.run(placed(2))
    placement = Placement.of(settings)
    tag = PlacedCredits.tags()[0]
    key = partition_key(tag, "b")
    seq: dict[str, int] = {}

    async def populate() -> None:
        serializer = readside_contract_serializer()
        async with await open_placed_storage(settings=settings, serializer=serializer) as st:
            await credit(st, range(30), seq)
        async with await start_readside([PlacedCredits], journal_settings=settings, **FAST) as rs:
            await rs.wait_until_caught_up(timeout=30)

    asyncio.run(populate())
    env, args = placed_cli(settings)
    runner = CliRunner()

    def run(*words: str) -> Any:
        result = runner.invoke(build_app(), ["projections", *words, *args], env=env)
        assert result.exit_code == 0, result.output
        return result

    rows = {r["tag"]: r for r in _statuses(run("status", "placed-credits", "--json").stdout)}
    keys = sorted(k for t in PlacedCredits.tags() for k, _ in placement.partitions(t))
    assert sorted(rows) == keys
    assert {r["database"] for r in rows.values()} == {"", "b"}
    assert all(r["lag_events"] == 0 for r in rows.values())
    assert "1 tag" in run("pause", "placed-credits", "--tag", key).stdout
    rows = {r["tag"]: r for r in _statuses(run("status", "placed-credits", "--json").stdout)}
    assert [k for k, r in rows.items() if r["paused"]] == [key]
    run("set-offset", "placed-credits", key, "0")
    rows = {r["tag"]: r for r in _statuses(run("status", "placed-credits", "--json").stdout)}
    assert rows[key]["offset"] == 0 and rows[key]["lag_events"] > 0
    result = run("rebuild", "tests.readside_processors:PlacedCredits", "--yes")
    assert f"from {sum(seq.values())} events" in result.stdout

    async def projected() -> list[tuple[str, int]]:
        async with await open_projections(journal_settings=settings) as projections:
            return await handled(projections.projection)

    assert asyncio.run(projected()) == every_event(seq)


def _statuses(output: str) -> list[dict[str, Any]]:
    return list(json.loads(output))


async def test_a_parked_event_of_another_database_is_retried_from_it(placed: Placed) -> None:
    settings = await placed(2)
    placement = Placement.of(settings)
    seq: dict[str, int] = {}
    accounts = range(20)
    bad = next(f"acct-{i}" for i in accounts if placement.database_of(f"acct-{i}") == "b")
    key = partition_key(PlacedCredits.tag.for_entity(bad), "b")
    PoisonedPlacedCredits.poison = {bad}
    serializer = readside_contract_serializer()
    async with await open_placed_storage(settings=settings, serializer=serializer) as storage:
        await credit(storage, accounts, seq)
        async with await start_readside(
            [PoisonedPlacedCredits],
            journal_settings=settings,
            on_failure="park",
            max_attempts=1,
            **FAST,
        ) as readside:
            await readside.wait_until_caught_up(timeout=30)
            projections = readside.projections
            (row,) = await projections.parked()
            assert (row.tag, row.entity_id) == (key, bad)
            assert {s.tag: s.parked for s in await readside.status()}[key] == 1
            missing = [e for e in every_event(seq) if e[0] != bad]
            assert await handled(readside.projection) == missing
            # The cause is fixed: the worker of that partition re-reads the event from its
            # own database (its offset there is not the home database's).
            PoisonedPlacedCredits.poison = set()
            assert await projections.retry_parked(ParkedFilter(tag=key)) == 1
            async with asyncio.timeout(10):
                while await projections.count_parked():
                    await asyncio.sleep(0.05)
            assert await handled(readside.projection) == every_event(seq)


async def test_workers_on_ray_follow_each_database_of_the_runtime(
    ray_session: Any, placed: Placed
) -> None:
    """The runtime's shard hosts write each order to its slice's database; one worker actor
    per (tag, database) projects every event once."""
    import lagompy
    from tests.process_entities import OrderEntity, PlaceOrder

    settings = await placed(2)
    placement = Placement.of(settings)
    app = f"rsp-{uuid.uuid4().hex[:8]}"
    keys = sorted(k for t in PlacedOrderEvents.tags() for k, _ in placement.partitions(t))
    assert len(keys) == 4  # two tag shards on each of the two databases
    readside = await start_readside_on_ray(
        [PlacedOrderEvents], app=app, journal_settings=settings, supervise_interval=0.2, **FAST
    )
    try:
        assert sorted(k for _, k, _ in readside.specs) == keys
        assert sorted(name for _, _, name in readside.specs) == sorted(
            actor_name("placed-order-events", k) for k in keys
        )
        async with lagompy.start(
            app=app, entities=[OrderEntity], journal_settings=settings, hosts=1
        ) as entities:
            orders = [f"o{i}" for i in range(40)]
            for o in orders:
                await entities.ref_for(OrderEntity, o).ask(PlaceOrder(1))
        # Every partition had events: each worker projected some.
        assert {(OrderEntity.tag.for_entity(o), placement.database_of(o)) for o in orders} == {
            (t, name) for t in PlacedOrderEvents.tags() for _, name in placement.partitions(t)
        }
        await readside.wait_until_caught_up(timeout=60)
        async with readside.projections.projection.read() as conn:
            rows = (
                await conn.execute(text("SELECT order_id, seq_nr FROM placed_order_events"))
            ).all()
        assert sorted((r[0], int(r[1])) for r in rows) == sorted((o, 1) for o in orders)
        status = await readside.status("placed-order-events")
        assert [s.tag for s in status] == keys
        assert all(s.lag_events == 0 and s.head_offset == s.offset > 0 for s in status)
        assert {s.database for s in status} == set(placement.names)
        assert {s.owner for s in status} == {
            f"ray:{app}/{actor_name('placed-order-events', k)}" for k in keys
        }
    finally:
        await readside.close(stop=True)
        await lagompy.shutdown_app(app)
