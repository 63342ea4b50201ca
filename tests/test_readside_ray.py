"""Read-side workers as Ray actors, on SQLite files and PostgreSQL schemas: one named detached
actor per (processor, tag shard), a crashed one restarted by Ray and a killed one replaced, each
resuming from its stored offset with nothing lost or doubled; nothing left behind."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import text

from examples.user_service.entity import ChangeName, RegisterUser, UserEntity
from examples.user_service.projection import UsersProjection
from lagompy import JournalSettings, start_in_process
from lagompy.journal import TailSettings
from lagompy.readside import start_readside_on_ray, stop_readside_on_ray
from lagompy.readside._ray import actor_name
from lagompy.runtime import namespace_of
from tests.conftest import tuned

FAST: dict[str, Any] = {
    "lease_ttl": 5.0,
    "renew_interval": 0.1,
    "tail": TailSettings(poll_interval=0.02),
}


def actors_of(ray: Any, app: str) -> list[str]:
    return sorted(
        e["name"]
        for e in ray.util.list_named_actors(all_namespaces=True)
        if e["namespace"] == namespace_of(app)
    )


async def test_workers_on_ray_survive_crashes_and_leave_nothing_behind(
    ray_session: Any, journal_settings: JournalSettings
) -> None:
    ray = ray_session
    app = f"rs-{uuid.uuid4().hex[:8]}"
    tags = UsersProjection.tags()
    readside = await start_readside_on_ray(
        [UsersProjection],
        app=app,
        journal_settings=journal_settings,
        supervise_interval=0.2,
        **FAST,
    )
    try:
        assert actors_of(ray, app) == sorted(actor_name("users", t) for t in tags)
        async with await start_in_process(
            entities=[UserEntity], settings=journal_settings
        ) as entities:

            async def register(first: int, last: int) -> None:
                for i in range(first, last):
                    await entities.ref_for(UserEntity, f"u{i}").ask(
                        RegisterUser(f"U{i}", f"u{i}@x.org")
                    )

            await register(0, 20)
            await readside.wait_until_caught_up(timeout=60)
            status = await readside.status("users")
            assert [s.owner for s in status] == [
                f"ray:{app}/{actor_name('users', t)}" for t in tags
            ]

            # A worker process dies: Ray restarts it, it takes its lease back and resumes.
            victim = ray.get_actor(actor_name("users", tags[0]), namespace=namespace_of(app))
            ping = await victim.ping.remote()
            pid_before = ping["pid"]
            assert tuned(ping["collector"]), ping  # a process of its own: lagompy/_collector.py
            ray.kill(victim, no_restart=False)
            await register(20, 40)
            for i in range(0, 40, 3):
                await entities.ref_for(UserEntity, f"u{i}").ask(ChangeName(f"V{i}"))
            # Killed for good: the handle's supervisor creates it again.
            gone = ray.get_actor(actor_name("users", tags[1]), namespace=namespace_of(app))
            ray.kill(gone, no_restart=True)
            await asyncio.sleep(0.5)
            await readside.wait_until_caught_up(timeout=90)
            again = ray.get_actor(actor_name("users", tags[0]), namespace=namespace_of(app))
            ping = await again.ping.remote()
            assert ping["pid"] != pid_before and tuned(ping["collector"]), ping

        async with readside.projections.projection.read() as conn:
            rows = (await conn.execute(text("SELECT user_id, name FROM users"))).all()
        names: dict[str, str] = dict(rows)
        assert len(rows) == 40
        assert all(names[f"u{i}"] == (f"V{i}" if i % 3 == 0 else f"U{i}") for i in range(40))
        # The restarted worker may still be preparing its tag (it had nothing left to catch
        # up, so "caught up" came first): it is running within a few seconds.
        deadline = time.monotonic() + 15
        while {s.state for s in await readside.status()} != {"running"}:
            assert time.monotonic() < deadline, [s.state for s in await readside.status()]
            await asyncio.sleep(0.05)
        # The replaced worker may still be starting (its table was caught up already by the
        # one killed): wait, bounded, until every worker reports from memory that it runs.
        deadline = time.monotonic() + 30
        while True:
            stats = await readside.worker_stats()
            if all(s.get("state") == "running" for s in stats) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert len(stats) == 4 and all(s["state"] == "running" for s in stats)
    finally:
        await readside.close(stop=True)
    assert actors_of(ray, app) == []
    assert await stop_readside_on_ray(app) == 0


async def test_processor_classes_must_be_importable_by_the_workers(ray_session: Any) -> None:
    from lagompy import ConfigurationError
    from lagompy.readside import SqlReadSideProcessor

    class Local(SqlReadSideProcessor):
        name = "local"
        tag = "t"
        entities = (UserEntity,)

        async def handle(self, conn: Any, envelope: Any) -> None:
            pass

    with pytest.raises(ConfigurationError, match="read-side processor class"):
        await start_readside_on_ray([Local], app="never-started")


async def test_on_ray_readiness_names_a_failure_and_event_types_read_a_mixed_tag(
    ray_session: Any, journal_settings: JournalSettings
) -> None:
    from readside_processors import PoisonOnRay

    from lagompy.journal import AtomicWrite, open_storage
    from lagompy.readside import ReadSideComponent
    from lagompy.testkit.readside import (
        CONTRACT_TAG,
        Credited,
        Noise,
        readside_contract_serializer,
    )

    async with await open_storage(
        settings=journal_settings, serializer=readside_contract_serializer()
    ) as storage:
        written = await storage.journal.append(
            [
                AtomicWrite("acct", "n", 0, [Noise("a"), Noise("b")], [(CONTRACT_TAG,)] * 2),
                AtomicWrite("acct", "a", 0, [Credited("a", 1)], [(CONTRACT_TAG,)]),
            ]
        )
        (poison,) = await storage.journal.append(
            [AtomicWrite("acct", "poison", 0, [Credited("poison", 2)], [(CONTRACT_TAG,)])]
        )
        (last,) = await storage.journal.append(
            [AtomicWrite("acct", "a", 1, [Credited("a", 3), Noise("c")], [(CONTRACT_TAG,)] * 2)]
        )
    first_credit = written[1].offsets[0]
    app = f"rs-{uuid.uuid4().hex[:8]}"
    # PoisonOnRay declares event_types = (Credited,): its workers' serializer knows no Noise.
    component = ReadSideComponent(
        [PoisonOnRay],
        journal_settings=journal_settings,
        ray=True,
        app=app,
        stop_on_close=True,
        max_attempts=1,
        **FAST,
    )
    await component.start()
    try:
        deadline = time.monotonic() + 60
        while isinstance(ready := await component.ready(), bool):
            assert time.monotonic() < deadline, "never reported the failure"
            await asyncio.sleep(0.05)
        at = poison.offsets[0]
        assert ready.startswith(
            f"read-side processor 'ray-credits', tag '{CONTRACT_TAG}': failed at offset {at}: "
            f"handler failed at offset {at} (acct/poison sequence number 1)"
        )
        assert ready.endswith("ValueError: account poison cannot be projected")
        projections = component._projections()
        (status,) = await projections.status("ray-credits")
        assert (status.state, status.offset) == ("failed", first_credit)  # past the Noise

        assert await projections.skip("ray-credits") == 1
        while (ready := await component.ready()) is not True:
            assert time.monotonic() < deadline, f"not ready after the skip: {ready}"
            await asyncio.sleep(0.05)
        await component.wait_until_caught_up(timeout=60)
        (status,) = await projections.status("ray-credits")
        assert (status.state, status.offset, status.skipped) == ("running", last.offsets[-1], 1)
        async with component.projection.read() as conn:
            rows = (await conn.execute(text("SELECT event_offset FROM contract_credits"))).all()
        assert sorted(r[0] for r in rows) == [first_credit, last.offsets[0]]
    finally:
        await component.stop()
    assert actors_of(ray_session, app) == []


async def test_shutdown_app_releases_the_read_side_leases_at_once(
    ray_session: Any, journal_settings: JournalSettings
) -> None:
    """``shutdown_app`` stops each read-side actor through its own stop: the leases are free
    when it returns, not a lease_ttl later, so a worker elsewhere takes over at once."""
    from lagompy.readside._store import OffsetStore
    from lagompy.runtime import shutdown_app

    app = f"rs-{uuid.uuid4().hex[:8]}"
    readside = await start_readside_on_ray(
        [UsersProjection],
        app=app,
        journal_settings=journal_settings,
        supervise_interval=None,
        **{**FAST, "lease_ttl": 120.0},
    )
    try:
        store = OffsetStore(readside.projections.projection)
        deadline = time.monotonic() + 60
        while not all(r.leased for r in await store.rows("users")) or len(
            await store.rows("users")
        ) != len(UsersProjection.tags()):
            assert time.monotonic() < deadline, "the workers never took their leases"
            await asyncio.sleep(0.05)
        assert await shutdown_app(app) == len(UsersProjection.tags())
        rows = await store.rows("users")
        assert [(r.owner, r.leased) for r in rows] == [(None, False)] * len(rows)
        assert actors_of(ray_session, app) == []
    finally:
        await readside.close()
