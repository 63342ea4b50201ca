"""A shard host that is gone for good (killed without restart, or its constructor failed) is
created again by the runtime, with the options start() made it with; a stopped app is not.

Ray treats a detached actor that was killed with ``no_restart=True`` (or whose constructor
raised) as dead whatever its restart budget; before, every ask to its shards then ended in
``OutcomeUnknown`` until some process called ``start()`` again.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter as Tally
from collections.abc import AsyncIterator
from typing import Any

import pytest
from ray_entities import Add, CounterEntity, GetValue

from lagompy import ShardedEntities, start
from lagompy.errors import OutcomeUnknown
from lagompy.journal import open_storage
from lagompy.runtime import namespace_of, shutdown_app
from lagompy.runtime._ray import host_name
from lagompy.settings import JournalSettings


@pytest.fixture
async def app(ray_session: Any) -> AsyncIterator[str]:
    name = f"re-{uuid.uuid4().hex[:8]}"
    yield name
    await shutdown_app(name)


async def _start(app: str, js: JournalSettings, **kw: Any) -> ShardedEntities:
    kw.setdefault("hosts", 1)
    kw.setdefault("shards", 8)
    entities: ShardedEntities = await start(
        app=app, entities=[CounterEntity], journal_settings=js, **kw
    )
    return entities


def _kill_for_good(app: str, index: int) -> None:
    import ray

    ray.kill(ray.get_actor(host_name(index), namespace=namespace_of(app)), no_restart=True)


def _host_actors(app: str) -> list[str]:
    import ray

    return sorted(
        entry["name"]
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["namespace"] == namespace_of(app) and entry["name"].startswith("host-")
    )


async def _tokens(js: JournalSettings) -> Tally[str]:
    storage = await open_storage(settings=js, entities=[CounterEntity])
    try:
        tokens: list[str] = []
        after = 0
        while page := await storage.journal.all_events(after_offset=after, limit=1000):
            tokens += [e.event.token for e in page]
            after = page[-1].offset
        return Tally(tokens)
    finally:
        await storage.close()


async def test_the_next_asks_recreate_a_host_killed_for_good(
    app: str, journal_settings: JournalSettings
) -> None:
    entities = await _start(app, journal_settings)
    try:
        refs = [entities.ref_for(CounterEntity, f"k{i}") for i in range(4)]
        assert (
            await asyncio.gather(*(r.ask(Add(1, f"a{i}")) for i, r in enumerate(refs))) == [1] * 4
        )
        (before,) = await entities.host_stats()
        _kill_for_good(app, 0)
        # With the default retries (3 resends from 0.2 s): the first resend finds the name
        # free and creates the host again; the asks wait for it and succeed.
        replies = await asyncio.gather(
            *(r.ask(Add(1, f"b{i}"), timeout=60) for i, r in enumerate(refs))
        )
        assert replies == [2] * 4  # the new host recovered each counter from the journal
        (after,) = await entities.host_stats()
        assert after["pid"] != before["pid"] and after["journal"] == "open"
        assert entities.stats()["outcome_unknown"] == 0
        assert _host_actors(app) == ["host-0"]
    finally:
        await entities.close()
    tokens = await _tokens(journal_settings)
    assert set(tokens.values()) == {1} and len(tokens) == 8


async def test_ensure_hosts_recreates_every_missing_host_once(
    app: str, tmp_path: Any, ray_session: Any
) -> None:
    # Two processes' views of one app (two start() calls) bring the missing host back at the
    # same time: they converge on one actor by its name.
    js = JournalSettings(url=f"sqlite:///{tmp_path / 'j.db'}")
    first = await _start(app, js, hosts=2)
    second = await _start(app, js, hosts=2)
    try:
        _kill_for_good(app, 1)
        for _ in range(100):  # bounded: the name is freed once the actor is dead
            if _host_actors(app) == ["host-0"]:
                break
            await asyncio.sleep(0.05)
        created = await asyncio.gather(first.ensure_hosts(), second.ensure_hosts())
        assert sum(created) >= 1
        assert _host_actors(app) == ["host-0", "host-1"]
        assert await first.ensure_hosts() == 0
        stats = [await view.host_stats() for view in (first, second)]
        assert [s["pid"] for s in stats[0]] == [s["pid"] for s in stats[1]]
        for i in range(8):  # entities on both hosts answer through both views
            assert await first.ref_for(CounterEntity, f"e{i}").ask(Add(1), timeout=60) == 1
            assert await second.ref_for(CounterEntity, f"e{i}").ask(GetValue(), timeout=60) == 1
    finally:
        await first.close()
        await second.close()


async def test_a_stopped_app_is_not_brought_back_by_a_process_still_attached(
    app: str, tmp_path: Any, ray_session: Any
) -> None:
    # shutdown_app stops the coordinator before the hosts: a region that finds its host gone
    # re-creates it only while the coordinator records its topology, so the stopped app stays
    # stopped and the asks end in OutcomeUnknown.
    js = JournalSettings(url=f"sqlite:///{tmp_path / 'j.db'}")
    entities = await _start(app, js, retries=2, retry_backoff=0.05)
    try:
        ref = entities.ref_for(CounterEntity, "s")
        assert await ref.ask(Add(1)) == 1
        assert await shutdown_app(app) == 2
        with pytest.raises(OutcomeUnknown):
            await ref.ask(Add(1), timeout=30)
        assert await entities.ensure_hosts() == 0
        assert _host_actors(app) == []
    finally:
        await entities.close()
