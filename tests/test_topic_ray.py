"""Subscriber groups as Ray actors (on SQLite files and PostgreSQL schemas, over the embedded
and the HTTP transports): one named detached actor per group, its partitions handled there; a
crashed actor restarted by Ray and a killed one replaced, each resuming from the stored positions
with nothing lost or doubled; nothing left behind."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import text

from lagompy import ConfigurationError, JournalSettings
from lagompy.journal import TailSettings
from lagompy.journal._storage import open_storage, serializer_for
from lagompy.readside import ReadSideSettings
from lagompy.runtime import namespace_of
from lagompy.service import BreakerRegistry, Service
from lagompy.testkit.server import serve_in_thread
from lagompy.testkit.topics import ContractAccount, Deposit, Deposited, TopicEnv, contract_topic
from lagompy.topic import (
    HttpTransport,
    Message,
    Subscriber,
    SubscribersComponent,
    TopicsComponent,
    start_subscribers_on_ray,
    stop_subscribers_on_ray,
)
from lagompy.topic._ray import actor_name
from tests.conftest import tuned
from tests.topic_ray_subscribers import RayHttpLedger, RayLedger

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


async def _rows(env: TopicEnv, table: str) -> list[tuple[int, int]]:
    async with env.database.read() as conn:
        rows = (await conn.execute(text(f"SELECT msg_offset, pid FROM {table}"))).all()
    return [(int(o), int(p)) for o, p in rows]


async def test_a_group_on_ray_survives_crashes_and_leaves_nothing_behind(
    ray_session: Any, journal_settings: JournalSettings
) -> None:
    ray = ray_session
    app = f"st-{uuid.uuid4().hex[:8]}"
    storage = await open_storage(
        settings=journal_settings, serializer=serializer_for([ContractAccount])
    )
    env = TopicEnv(storage, journal_settings, ReadSideSettings())
    subs = await start_subscribers_on_ray(
        [RayLedger], app=app, journal_settings=journal_settings, supervise_interval=0.2, **FAST
    )
    name = actor_name(contract_topic.name, RayLedger.group)
    try:
        assert actors_of(ray, app) == [name]
        written = await env.append(*(Deposited(f"a{i}", i) for i in range(20)))
        await subs.wait_until_caught_up(timeout=60)
        handle = ray.get_actor(name, namespace=namespace_of(app))
        ping = await handle.ping.remote()
        pid_before = ping["pid"]
        assert tuned(ping["collector"]), ping  # a process of its own: lagompy/_collector.py

        # The actor's process dies: Ray restarts it, it takes its leases back and resumes.
        ray.kill(handle, no_restart=False)
        written += await env.append(*(Deposited(f"a{i}", i) for i in range(20, 30)))
        await asyncio.sleep(0.3)
        # Killed for good: the handle's supervisor creates it again.
        ray.kill(ray.get_actor(name, namespace=namespace_of(app)), no_restart=True)
        written += await env.append(*(Deposited(f"a{i}", i) for i in range(30, 40)))
        await asyncio.sleep(0.5)
        await subs.wait_until_caught_up(timeout=90)

        rows = await _rows(env, RayLedger.table)
        counts = Counter(o for o, _ in rows)
        assert sorted(counts) == sorted(e.offset for e in written)  # nothing lost
        assert set(counts.values()) == {1}  # nothing doubled
        assert os.getpid() not in {p for _, p in rows}  # handled in the actors
        again = ray.get_actor(name, namespace=namespace_of(app))
        ping = await again.ping.remote()
        assert ping["pid"] != pid_before and tuned(ping["collector"]), ping
        status = sorted(await subs.status(RayLedger.group), key=lambda s: s.tag)
        assert [s.offset for s in status] == await env.heads()
        assert {s.owner for s in status} == {f"ray:{app}/{name}"}
        stats = await subs.actor_stats()
        assert {s["actor"] for s in stats} == {name} and len(stats) == contract_topic.partitions
        # Operations act on the rows, whichever actor holds them.
        assert await subs.pause(RayLedger.group) == contract_topic.partitions
        assert {s.state for s in await subs.status()} == {"paused"}
        assert await subs.resume(RayLedger.group) == contract_topic.partitions
        with pytest.raises(ConfigurationError, match="no subscriber group 'nope'"):
            await subs.pause("nope")
    finally:
        await subs.close(stop=True)
        await env.close()
    assert actors_of(ray, app) == []
    assert await stop_subscribers_on_ray(app) == 0


async def test_a_group_on_ray_pulls_from_another_service_over_http(
    ray_session: Any, tmp_path: Path
) -> None:
    # The producing service (SQLite, its topic route) and a subscribing service whose group
    # runs on Ray, in its own database, through SubscribersComponent(ray=True).
    ray = ray_session
    app = f"sh-{uuid.uuid4().hex[:8]}"
    producer_settings = JournalSettings(url=f"sqlite:///{tmp_path / 'producer.db'}")
    producing = Service(
        name="producer",
        components=[TopicsComponent([contract_topic], journal_settings=producer_settings)],
    )
    producer_app = FastAPI(lifespan=producing.lifespan)
    producing.install(producer_app)
    own = JournalSettings(url=f"sqlite:///{tmp_path / 'subscriber.db'}")
    with serve_in_thread(producer_app) as producer_url:
        storage = await open_storage(
            settings=producer_settings, serializer=serializer_for([ContractAccount])
        )
        env = TopicEnv(storage, own, ReadSideSettings())
        component = SubscribersComponent(
            [RayHttpLedger],
            transport=HttpTransport(producer_url, breakers=BreakerRegistry(), long_poll=0.5),
            journal_settings=own,
            ray=True,
            app=app,
            stop_on_close=True,
            **FAST,
        )
        try:
            await component.start()
            written = await env.append(*(Deposited(f"h{i}", i) for i in range(12)))
            await component.wait_until_caught_up(timeout=60)
            rows = await _rows(env, RayHttpLedger.table)
            assert sorted(o for o, _ in rows) == sorted(e.offset for e in written)
            assert os.getpid() not in {p for _, p in rows}
            assert actors_of(ray, app) == [actor_name(contract_topic.name, RayHttpLedger.group)]
            assert await component.ready() is True
        finally:
            await component.stop()
            await env.close()
    assert actors_of(ray, app) == []


async def test_what_cannot_run_on_ray_is_refused_clearly(ray_session: Any, tmp_path: Path) -> None:
    settings = JournalSettings(url=f"sqlite:///{tmp_path / 'j.db'}")

    class Local(Subscriber[Deposit]):  # defined in a function: Ray's workers cannot import it
        group = "local"
        topic = contract_topic

        async def handle(self, conn: Any, message: Message[Deposit]) -> None: ...

    class Opaque:
        kind = "opaque"

    cases: list[tuple[dict[str, Any], str]] = [
        ({"subscribers": [RayLedger()]}, "takes Subscriber classes"),
        ({"subscribers": []}, "needs at least one subscriber class"),
        ({"subscribers": [RayLedger], "replicas": 0}, "replicas must be an integer"),
        ({"subscribers": [Local]}, "defined inside a function"),
        ({"subscribers": [RayLedger], "transport": Opaque()}, "cannot run subscribers on Ray"),
    ]
    for kwargs, words in cases:
        with pytest.raises(ConfigurationError, match=words):
            await start_subscribers_on_ray(journal_settings=settings, **kwargs)
