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
from lagompy.readside_ray import actor_name, start_readside_on_ray, stop_readside_on_ray
from lagompy.runtime import namespace_of

FAST = {"lease_ttl": 5.0, "renew_interval": 0.1, "poll_interval": 0.02}


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
            pid_before = (await victim.ping.remote())["pid"]
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
            assert (await again.ping.remote())["pid"] != pid_before

        async with readside.projections.projection.read() as conn:
            rows = (await conn.execute(text("SELECT user_id, name FROM users"))).all()
        names = dict(rows)
        assert len(rows) == 40
        assert all(names[f"u{i}"] == (f"V{i}" if i % 3 == 0 else f"U{i}") for i in range(40))
        assert {s.state for s in await readside.status()} == {"running"}
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
