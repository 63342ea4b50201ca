"""The sharded runtime on a real (local) Ray: shard hosts, region clients, topology, retries.

One Ray serves the whole session (``ray_session``); each test uses an app name of its own and
stops the app's detached actors when it ends.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter as Tally
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from ray_entities import Add, AddThenCrash, CounterEntity, GetValue, LimitExceeded, SlowAdd

from examples.user_service.entity import GetUser, RegisterUser, UserEntity
from lagompy import (
    ConfigurationError,
    InProcessEntities,
    InvalidCommand,
    NotFound,
    RuntimeSettings,
    ShardedEntities,
    start,
)
from lagompy.errors import AskTimeout, OutcomeUnknown, Overloaded
from lagompy.journal import open_storage
from lagompy.runtime import shutdown_app
from lagompy.runtime._defaults import default_hosts
from lagompy.runtime._processing import EntityProcessor, Request
from lagompy.runtime._ray_cluster import actor_runtime_env, node_cpus
from lagompy.runtime._region import HostUnreachable, Outcome, Region
from lagompy.settings import JournalSettings
from tests.conftest import tuned

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


@pytest.fixture
async def app(ray_session: Any) -> AsyncIterator[str]:
    """A unique app name; the app's actors are stopped after the test."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    yield name
    await shutdown_app(name)


async def _start(app: str, js: JournalSettings, **kw: Any) -> ShardedEntities:
    kw.setdefault("hosts", 1)
    kw.setdefault("shards", 16)
    entities: ShardedEntities = await start(
        app=app, entities=[UserEntity, CounterEntity], journal_settings=js, **kw
    )
    return entities


async def _journal_tokens(js: JournalSettings) -> list[str]:
    storage = await open_storage(settings=js, entities=[CounterEntity, UserEntity])
    try:
        tokens: list[str] = []
        after = 0
        while batch := await storage.journal.all_events(after_offset=after, limit=1000):
            tokens += [e.event.token for e in batch if e.entity_type == "counter"]
            after = batch[-1].offset
        return tokens
    finally:
        await storage.close()


# --------------------------------------------------------------------------- the collector


@pytest.mark.parametrize("ray", [True, False])
@pytest.mark.parametrize("collector", ["tuned", "default"])
async def test_start_tunes_the_callers_collector_unless_told_not_to(
    app: str,
    journal_settings: JournalSettings,
    monkeypatch: pytest.MonkeyPatch,
    collector: str,
    ray: bool,
) -> None:
    """The process that calls start() runs the region client (on Ray) or the entities (in
    process), on the path of every ask: its collector is tuned once the app has started
    (lagompy/_collector.py), unless ``collector="default"``."""
    import lagompy.runtime._ray as ray_runtime

    calls: list[int] = []

    def tune() -> bool:
        calls.append(1)
        return True

    monkeypatch.setattr(ray_runtime, "tune_collector_once", tune)
    entities: ShardedEntities | InProcessEntities
    if ray:
        entities = await _start(app, journal_settings, collector=collector)
    else:
        entities = await start(
            entities=[CounterEntity],
            journal_settings=journal_settings,
            ray=False,
            collector=collector,
        )
    try:
        assert calls == ([1] if collector == "tuned" else [])
        assert await entities.ref_for(CounterEntity, "c1").ask(GetValue()) == 0
    finally:
        await entities.close()


#: What a program of one's own does before printing its collector's state (each case in a
#: fresh process), its environment, and whether its collector is then tuned. Opening the
#: journal tunes it (JournalSettings.collector), unless the journal's settings, or the owner
#: of the process that opens it (start(), a Service), say "default".
OPENERS: dict[str, tuple[str, dict[str, str], bool]] = {
    "open_storage": ("async with open_storage(URL): pass", {}, True),
    "open_storage, collector='default'": (
        "async with open_storage(URL, collector='default'): pass",
        {},
        False,
    ),
    "open_storage, LAGOMPY_JOURNAL_COLLECTOR=default": (
        "async with open_storage(URL): pass",
        {"LAGOMPY_JOURNAL_COLLECTOR": "default"},
        False,
    ),
    "open_placed_storage": ("async with open_placed_storage(url=URL): pass", {}, True),
    "start(ray=False)": (
        "async with lagompy.start(entities=[UserEntity], ray=False, journal_url=URL): pass",
        {},
        True,
    ),
    "start(ray=False, collector='default')": (
        "async with lagompy.start(entities=[UserEntity], ray=False, journal_url=URL, "
        "collector='default'): pass",
        {},
        False,
    ),
    "Service(collector='default')": (
        "await serve(ServiceSettings(collector='default'))",
        {},
        False,
    ),
    "Service, LAGOMPY_HTTP_COLLECTOR=default": (
        "await serve(None)",
        {"LAGOMPY_HTTP_COLLECTOR": "default"},
        False,
    ),
}

OPENER_SCRIPT = """
import asyncio, gc, json, sys

import lagompy
from examples.user_service.entity import UserEntity
from lagompy.service import Service, ServiceSettings
from lagompy.journal import open_placed_storage, open_storage

URL = sys.argv[1]


class OpensTheJournal:
    # A component that opens the service's journal in its process, as read sides do.
    def bind(self, service):
        self.settings = service.journal_settings

    async def start(self):
        self.storage = await open_storage(settings=self.settings)

    async def stop(self):
        await self.storage.close()


async def serve(settings):
    service = Service(
        entities=[UserEntity],
        journal_url=URL,
        ray=False,
        components=[OpensTheJournal()],
        settings=settings,
    )
    await service.start()
    await service.stop()


async def main():
    {code}
    print(json.dumps({{"threshold": gc.get_threshold()[0], "frozen": gc.get_freeze_count()}}))


asyncio.run(main())
"""


@pytest.fixture(scope="module")
def opener_states(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The collector's state after each case of :data:`OPENERS` (or the error of a case that
    failed), each in a fresh process (started all at once: each is mostly a Python start and
    lagompy's imports)."""
    procs = {}
    drop = ("LAGOMPY_", "RAY_ADDRESS")
    base = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), base.get("PYTHONPATH")]))
    for case, (code, env, _) in OPENERS.items():
        directory = tmp_path_factory.mktemp("opener")
        procs[case] = subprocess.Popen(
            [sys.executable, "-c", OPENER_SCRIPT.format(code=code), "sqlite:///journal.db"],
            cwd=directory,
            env=base | env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    states = {}
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        states[case] = json.loads(out.splitlines()[-1]) if proc.returncode == 0 else {"err": err}
    return states


@pytest.mark.parametrize("case", list(OPENERS))
def test_opening_the_journal_tunes_its_process_collector_unless_told_not_to(
    opener_states: dict[str, dict[str, Any]], case: str
) -> None:
    """A program of one's own that opens the journal gets the collector shard hosts have
    (lagompy/_collector.py): a journal appending with Python's defaults spent its time in
    full collections of the process's start-up objects. ``collector="default"`` (the
    journal's settings, or the owner of the process that opens it: start(), a Service)
    leaves Python's."""
    state = opener_states[case]
    assert "err" not in state, state["err"]
    if OPENERS[case][2]:
        assert tuned(state), state
    else:
        assert state == {"threshold": 700, "frozen": 0}, state


def test_tune_collector_once_leaves_a_tuned_or_disabled_collector_alone() -> None:
    import gc

    from lagompy._collector import GC_THRESHOLD, tune_collector_once

    threshold, enabled = gc.get_threshold(), gc.isenabled()
    try:
        gc.set_threshold(700, *threshold[1:])
        assert tune_collector_once()
        assert gc.get_threshold()[0] == GC_THRESHOLD
        frozen = gc.get_freeze_count()
        assert not tune_collector_once()  # tuned already: nothing more frozen
        assert gc.get_freeze_count() == frozen
        gc.set_threshold(700, *threshold[1:])
        gc.disable()
        assert not tune_collector_once()
        assert gc.get_threshold()[0] == 700
    finally:
        gc.set_threshold(*threshold)
        if enabled:
            gc.enable()


# --------------------------------------------------------------------------- round trips


async def test_ask_tell_rejections_order_and_group_commit(
    app: str, journal_settings: JournalSettings
) -> None:
    entities = await _start(app, journal_settings, hosts=2)
    try:
        ada = entities.ref_for(UserEntity, "42")
        user = await ada.ask(RegisterUser("Ada", "ada@example.org"), timeout=30)
        assert (user.name, user.email) == ("Ada", "ada@example.org")
        with pytest.raises(InvalidCommand) as rejected:
            await ada.ask(RegisterUser("Ada", "ada@example.org"))
        assert rejected.value.http_status == 409  # UserConflict, across the Ray boundary
        assert "already registered" in str(rejected.value)
        with pytest.raises(NotFound) as missing:
            await entities.ref_for(UserEntity, "nobody").ask(GetUser())
        assert missing.value.http_status == 404

        counter = entities.ref_for(CounterEntity, "c")
        with pytest.raises(LimitExceeded) as custom:  # the test's own rejection class
            await counter.ask(Add(-1))
        assert (custom.value.http_status, custom.value.message) == (
            409,
            "negative amounts are refused",
        )

        counter.tell(Add(5))
        assert await counter.ask(GetValue()) == 5  # same entity: after the tell

        # One entity: commands in arrival order. Many entities concurrently.
        replies = await asyncio.gather(*(counter.ask(Add(1)) for _ in range(50)))
        assert replies == list(range(6, 56))
        before = sum(h["write_transactions"] for h in await entities.host_stats())
        n = 600
        many = await asyncio.gather(
            *(entities.ref_for(CounterEntity, f"m{i}").ask(Add(i)) for i in range(n))
        )
        assert many == list(range(n))
        after = sum(h["write_transactions"] for h in await entities.host_stats())
        # Group commit: 600 asks made in one tick -> a handful of transactions per host.
        assert after - before <= 8, after - before
    finally:
        await entities.close()


async def test_second_process_reaches_the_same_entities(
    app: str, tmp_path: Path, ray_session: Any
) -> None:
    js = JournalSettings(url=f"sqlite:///{tmp_path / 'j.db'}")
    entities = await _start(app, js, hosts=2)
    try:
        assert await entities.ref_for(CounterEntity, "shared").ask(Add(7)) == 7
        script = textwrap.dedent(f"""
            import asyncio
            from lagompy import start
            from ray_entities import Add, CounterEntity
            from examples.user_service.entity import UserEntity

            async def main():
                entities = await start(app={app!r}, entities=[UserEntity, CounterEntity],
                                       journal_url={js.url!r})
                print("topology", entities.topology.hosts, entities.topology.shards)
                print("value", await entities.ref_for(CounterEntity, "shared").ask(Add(1)))
                await entities.close()

            asyncio.run(main())
        """)
        env = {
            **os.environ,
            "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
            "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]),
        }
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        # It adopted the running topology (hosts=2, shards=16) and hit the same entity.
        assert "topology 2 16" in proc.stdout
        assert "value 8" in proc.stdout
        assert await entities.ref_for(CounterEntity, "shared").ask(GetValue()) == 8
    finally:
        await entities.close()


async def test_a_module_beside_the_script_needs_no_runtime_env(
    app: str, tmp_path: Path, ray_session: Any
) -> None:
    # An app beside its script, run from another directory, attached to the session's Ray: the
    # script's directory is on its job's path, so its hosts take Ray's ready workers.
    (tmp_path / "beside.py").write_text(
        "from ray_entities import CounterEntity\n\n"
        "class BesideCounter(CounterEntity):\n    type_name = 'beside'\n"
    )
    (tmp_path / "app.py").write_text(
        textwrap.dedent(f"""
            import asyncio
            from lagompy import start
            from lagompy.runtime._ray_cluster import actor_runtime_env
            from ray_entities import Add
            from beside import BesideCounter

            async def main():
                entities = await start(app={app!r}, entities=[BesideCounter], hosts=1,
                                       journal_url={f"sqlite:///{tmp_path / 'j.db'}"!r})
                print("runtime_env", actor_runtime_env([BesideCounter]))
                print("value", await entities.ref_for(BesideCounter, "b").ask(Add(3)))
                await entities.close()

            asyncio.run(main())
        """)
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
        "PYTHONPATH": str(TESTS),
    }
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(tmp_path / "app.py")],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "runtime_env None" in proc.stdout
    assert "value 3" in proc.stdout


async def test_actors_get_a_runtime_env_only_for_code_off_the_job_s_path(
    app: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tests' and examples' directories are on the session job's path; pytest's own
    # classes are an installed package's: no runtime_env, so actors take Ray's ready workers.
    assert actor_runtime_env([CounterEntity, UserEntity, pytest.MonkeyPatch]) is None
    # A directory put on sys.path after Ray started is not on the job's path: it goes on the
    # actors' PYTHONPATH, ahead of what was there, and their hosts import from it.
    (tmp_path / "late_module.py").write_text(
        "from ray_entities import CounterEntity\n\n"
        "class LateCounter(CounterEntity):\n    type_name = 'late'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    from late_module import LateCounter  # type: ignore[import-not-found]

    env = actor_runtime_env([CounterEntity, LateCounter])
    assert env is not None
    paths = env["env_vars"]["PYTHONPATH"].split(os.pathsep)
    assert paths[0] == str(tmp_path.resolve())
    assert paths[-1] == "/somewhere"
    assert str(TESTS) not in paths
    js = JournalSettings(url=f"sqlite:///{tmp_path / 'j.db'}")
    entities = await start(app=app, entities=[LateCounter], journal_settings=js, hosts=1)
    try:
        assert await entities.ref_for(LateCounter, "l").ask(Add(2)) == 2
    finally:
        await entities.close()


# --------------------------------------------------------------------------- configuration


def test_default_host_count_is_one_per_node_with_cpus() -> None:
    # Not one per CPU: hosts share the journal's one ordering fence (docs/runtime.md).
    assert default_hosts([2.0]) == 1
    assert default_hosts([64.0]) == 1
    assert default_hosts([8.0, 8.0, 16.0]) == 3
    assert default_hosts([4.0, 0.0]) == 1  # a node without CPUs hosts nothing
    assert default_hosts([]) == 1


async def test_start_without_hosts_uses_the_default_rule(app: str, tmp_path: Path) -> None:
    js = JournalSettings(url=f"sqlite:///{tmp_path / 'j.db'}")
    entities: ShardedEntities = await start(
        app=app, entities=[UserEntity, CounterEntity], journal_settings=js, shards=16
    )
    try:
        nodes = node_cpus()
        assert entities.topology.hosts == default_hosts(nodes)
        if len(nodes) == 1:  # a local Ray (the session's has 2 CPUs: one per CPU made 2)
            assert entities.topology.hosts == 1
        assert await entities.ref_for(CounterEntity, "d").ask(Add(3)) == 3
    finally:
        await entities.close()


async def test_a_start_that_loses_the_race_for_the_coordinator_stops_only_its_own_hosts(
    app: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start that found no coordinator starts its hosts beside the coordinator. If a
    concurrent start with another topology recorded its own first (simulated: the lookup says
    no app runs while one does), the refused start stops the hosts it made for its topology,
    and only those: the running app's hosts serve on."""
    import ray

    from lagompy.runtime import _ray

    js = JournalSettings(url=f"sqlite:///{tmp_path / 'j.db'}")
    running = await _start(app, js, hosts=1)
    try:

        async def nothing_runs(app: str, timeout: float) -> None:
            return None

        monkeypatch.setattr(_ray, "_running_topology", nothing_runs)
        with pytest.raises(ConfigurationError, match="hosts: the app runs with 1, this process"):
            await _start(app, js, hosts=2)
        monkeypatch.undo()
        deadline = time.monotonic() + 10
        while True:
            names = sorted(
                a["name"]
                for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == running.namespace
            )
            if names == ["coordinator", "host-0"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert names == ["coordinator", "host-0"]
        assert await running.ref_for(CounterEntity, "r").ask(Add(1), timeout=30) == 1
    finally:
        await running.close()


async def test_topology_mismatch_names_what_differs(app: str, tmp_path: Path) -> None:
    js = JournalSettings(url=f"sqlite:///{tmp_path / 'j.db'}")
    entities = await _start(app, js, hosts=1)
    try:
        with pytest.raises(
            ConfigurationError, match="hosts: the app runs with 1, this process has 2"
        ):
            await _start(app, js, hosts=2)
        with pytest.raises(ConfigurationError, match="shards"):
            await _start(app, js, shards=32)
        other = JournalSettings(url=f"sqlite:///{tmp_path / 'other.db'}")
        with pytest.raises(ConfigurationError, match="journal"):
            await _start(app, other)
        with pytest.raises(ConfigurationError, match=r"entities.*code_fingerprint"):
            await start(app=app, entities=[UserEntity], journal_settings=js, hosts=1, shards=16)
        # Another actor of the app (as a read-side worker is) survives the hosts' replacement.
        import ray

        @ray.remote(num_cpus=0)
        class Bystander:
            def ping(self) -> str:
                return "here"

        bystander = Bystander.options(  # type: ignore[attr-defined]
            name="readside:bystander:t", namespace=entities.namespace, lifetime="detached"
        ).remote()
        assert await bystander.ping.remote() == "here"
        # Rolling onto new settings: replace the hosts; the old client is refused, not misrouted.
        replaced = await _start(app, js, hosts=2, replace_hosts=True)
        try:
            assert await bystander.ping.remote() == "here"
            assert replaced.topology.hosts == 2
            assert await replaced.ref_for(CounterEntity, "x").ask(Add(2)) == 2
            with pytest.raises((ConfigurationError, OutcomeUnknown)):
                await entities.ref_for(CounterEntity, "x").ask(Add(1), timeout=30)
        finally:
            await replaced.close()
    finally:
        await entities.close()
    # shutdown_app stops every actor of the app, the bystander too.
    assert await shutdown_app(app) == 4  # two hosts, the coordinator, the bystander
    names = ray.util.list_named_actors(all_namespaces=True)
    assert [a for a in names if a["namespace"] == entities.namespace] == []


async def test_entity_classes_must_be_importable(app: str, tmp_path: Path) -> None:
    js = JournalSettings(url=f"sqlite:///{tmp_path / 'j.db'}")

    class LocalCounter(CounterEntity):
        type_name = "local-counter"

    with pytest.raises(ConfigurationError, match="inside a function"):
        await start(app=app, entities=[LocalCounter], journal_settings=js)

    class MainCounter(CounterEntity):
        type_name = "main-counter"

    MainCounter.__module__ = "__main__"
    MainCounter.__qualname__ = "MainCounter"
    with pytest.raises(ConfigurationError, match="defined in __main__"):
        await start(app=app, entities=[MainCounter], journal_settings=js)


async def test_a_host_that_cannot_import_the_entity_fails_start_clearly(
    app: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Importable here, gone by the time the host's worker imports it.
    package = tmp_path / "vanishing"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from ray_entities import CounterEntity\n\n"
        "class VanishingCounter(CounterEntity):\n    type_name = 'vanishing'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from vanishing import VanishingCounter  # type: ignore[import-not-found]

    (package / "__init__.py").unlink()
    js = JournalSettings(url=f"sqlite:///{tmp_path / 'j.db'}")
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match=r"could not start.*vanishing"):
        await start(app=app, entities=[VanishingCounter], journal_settings=js, hosts=1)
    assert time.monotonic() - started < 30


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("kills", [1])
async def test_host_killed_mid_load_never_applies_a_command_twice(
    app: str, journal_settings: JournalSettings, ray_session: Any, kills: int
) -> None:
    entities = await _start(app, journal_settings, hosts=1, retries=6, retry_backoff=0.1)
    ray = ray_session
    try:
        await entities.ref_for(CounterEntity, "warm").ask(Add(1), timeout=30)
        host = ray.get_actor("host-0", namespace=entities.namespace)
        ping = await host.ping.remote()
        pid_before = ping["pid"]
        assert tuned(ping["collector"]), ping  # a process of its own: lagompy/_collector.py

        async def one(i: int) -> tuple[str, Any]:
            ref = entities.ref_for(CounterEntity, f"k{i % 40}")
            cid = uuid.uuid4().hex
            try:
                return cid, await ref.ask(Add(1, token=cid), command_id=cid, timeout=60)
            except OutcomeUnknown as e:
                assert e.command_id == cid
                return cid, e

        # A round: 400 asks, the host killed as soon as the first batch is on its way to it,
        # 200 more. A batch can be answered before the kill lands (a batch of entities new to
        # the host is one write): up to three rounds, until one kill hits batches in flight.
        results: list[tuple[str, Any]] = []
        for round_ in range(3):
            first = 600 * round_
            tasks = [asyncio.ensure_future(one(i)) for i in range(first, first + 400)]
            for _ in range(100):  # until the first batch is on its way to the host
                if entities.region.outstanding and entities.stats()["batches"]:
                    break
                await asyncio.sleep(0)
            for _ in range(kills):
                ray.kill(host, no_restart=False)
            tasks += [asyncio.ensure_future(one(i)) for i in range(first + 400, first + 600)]
            results += await asyncio.gather(*tasks)
            pid_after = (await host.ping.remote())["pid"]
            assert pid_after != pid_before  # the host really restarted
            pid_before = pid_after
            if entities.stats()["resends"] >= 1:  # the kill hit batches in flight
                break
        assert entities.stats()["resends"] >= 1, "no kill of three hit a batch in flight"
        unknown = [cid for cid, r in results if isinstance(r, OutcomeUnknown)]
        # Asking again with the same id reveals the outcome, never applies it twice.
        for cid in unknown:
            i = next(j for j, (c, _) in enumerate(results) if c == cid)
            await entities.ref_for(CounterEntity, f"k{i % 40}").ask(
                Add(1, token=cid), command_id=cid, timeout=60
            )
        tokens = Tally(await _journal_tokens(journal_settings))
        twice = [t for t, n in tokens.items() if n > 1 and t]
        assert not twice, f"commands persisted twice: {twice[:5]}"
        for cid, _ in results:
            assert tokens[cid] == 1
        # Every entity's value equals its number of commands.
        for e in range(40):
            expected = sum(1 for i in range(len(results)) if i % 40 == e)
            got = await entities.ref_for(CounterEntity, f"k{e}").ask(GetValue(), timeout=30)
            assert got == expected
    finally:
        await entities.close()


async def test_crash_after_commit_is_answered_from_the_stored_reply(
    app: str, journal_settings: JournalSettings, ray_session: Any
) -> None:
    # The host commits the event, then dies before replying. The region resends the batch
    # with the same command id and the duplicate check: the restarted host answers with the
    # stored reply and does not apply (nor crash on) the command again.
    entities = await _start(app, journal_settings, retries=5, retry_backoff=0.1)
    try:
        ref = entities.ref_for(CounterEntity, "crashy")
        assert await ref.ask(Add(1, token="first"), timeout=30) == 1
        assert await ref.ask(AddThenCrash("boom"), timeout=60) == 2
        assert entities.stats()["resends"] >= 1
        assert await ref.ask(GetValue(), timeout=30) == 2
        assert Tally(await _journal_tokens(journal_settings))["boom"] == 1
        (stats,) = await entities.host_stats()
        assert stats["duplicates"] >= 1
    finally:
        await entities.close()


async def test_ask_timeout_carries_the_command_id(app: str, tmp_path: Path) -> None:
    js = JournalSettings(url=f"sqlite:///{tmp_path / 'j.db'}")
    entities = await _start(app, js)
    try:
        ref = entities.ref_for(CounterEntity, "slow")
        with pytest.raises(AskTimeout) as timed_out:
            await ref.ask(SlowAdd(1.0), timeout=0.2, command_id="slow-1")
        assert timed_out.value.command_id == "slow-1"
        assert "slow-1" in str(timed_out.value)
        # Asking again with the same id returns the stored reply: applied once.
        assert await ref.ask(SlowAdd(1.0), command_id="slow-1", timeout=30) == 1
        assert await ref.ask(GetValue(), timeout=30) == 1
    finally:
        await entities.close()


async def test_overloaded_fails_fast(app: str, tmp_path: Path) -> None:
    js = JournalSettings(url=f"sqlite:///{tmp_path / 'j.db'}")
    entities = await _start(app, js, max_pending=10)
    try:
        refs = [entities.ref_for(CounterEntity, f"o{i}") for i in range(30)]
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(r.ask(Add(1)) for r in refs), return_exceptions=True)
        overloaded = [o for o in outcomes if isinstance(o, Overloaded)]
        assert len(overloaded) == 20
        assert [o for o in outcomes if not isinstance(o, Exception)] == [1] * 10
        assert time.perf_counter() - started < 5
        assert entities.stats()["overloaded"] == 20
    finally:
        await entities.close()


async def test_hosts_passivate_idle_entities_without_calls(app: str, tmp_path: Path) -> None:
    js = JournalSettings(url=f"sqlite:///{tmp_path / 'j.db'}")
    entities = await _start(app, js, idle_timeout=0.2, passivate_interval=0.1)
    try:
        await asyncio.gather(
            *(entities.ref_for(CounterEntity, f"p{i}").ask(Add(1)) for i in range(20))
        )
        deadline = time.monotonic() + 10
        while True:
            (stats,) = await entities.host_stats()
            if stats["live_entities"] == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert stats["live_entities"] == 0
        assert stats["passivations"] >= 20
        # Passivated entities recover from the journal.
        assert await entities.ref_for(CounterEntity, "p3").ask(Add(1)) == 2
    finally:
        await entities.close()


async def test_start_without_ray_runs_in_process(tmp_path: Path) -> None:
    entities = await start(
        entities=[CounterEntity], journal_url=f"sqlite:///{tmp_path / 'j.db'}", ray=False
    )
    try:
        assert isinstance(entities, InProcessEntities)
        assert await entities.ref_for(CounterEntity, "a").ask(Add(3)) == 3
    finally:
        await entities.close()


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAGOMPY_RUNTIME_MAX_BATCH", "77")
    settings = RuntimeSettings(hosts=3)
    assert (settings.max_batch, settings.hosts, settings.shards) == (77, 3, None)


async def test_bad_settings_are_configuration_errors_naming_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LAGOMPY_RUNTIME_MAX_BATCH", "lots")
    with pytest.raises(ConfigurationError, match=r"max_batch \(LAGOMPY_RUNTIME_MAX_BATCH\)"):
        await start(entities=[CounterEntity], journal_url=f"sqlite:///{tmp_path / 'j.db'}")
    monkeypatch.delenv("LAGOMPY_RUNTIME_MAX_BATCH")
    with pytest.raises(ConfigurationError, match=r"pool_size .*greater than or equal to 1"):
        await start(
            entities=[CounterEntity],
            journal_url=f"sqlite:///{tmp_path / 'j.db'}",
            ray=False,
            pool_size=0,
        )


# --------------------------------------------------------------------------- region, no Ray


@dataclass
class FlakyLink:
    """Fails the first ``failures`` calls as a dead host would; records every batch."""

    failures: int
    calls: list[list[Request]]

    async def call(self, requests: list[Request]) -> list[Outcome]:
        self.calls.append(requests)
        await asyncio.sleep(0)
        if self.failures:
            self.failures -= 1
            raise HostUnreachable("host died")
        return [(r.command.amount, None) for r in requests]

    async def reconnect(self) -> None:
        pass


async def test_region_resends_with_same_ids_then_outcome_unknown() -> None:
    link = FlakyLink(failures=2, calls=[])
    region = Region([link], shards=4, retries=3, retry_backoff=0)
    futures = [
        region.submit(Request("counter", str(i), Add(i), command_id=f"c{i}")) for i in range(5)
    ]
    assert await asyncio.gather(*futures) == [0, 1, 2, 3, 4]
    assert len(link.calls) == 3  # one batch, sent three times
    assert [r.command_id for r in link.calls[2]] == [f"c{i}" for i in range(5)]
    assert not any(r.check_duplicate for r in link.calls[0])
    assert all(r.check_duplicate for r in link.calls[2])

    dead = FlakyLink(failures=100, calls=[])
    region = Region([dead], shards=4, retries=2, retry_backoff=0)
    future = region.submit(Request("counter", "x", Add(1), command_id="lost"))
    with pytest.raises(OutcomeUnknown) as unknown:
        await future
    assert unknown.value.command_id == "lost"
    assert len(dead.calls) == 3
    await region.close()


async def test_region_resends_failed_batches_before_newer_asks_in_their_order() -> None:
    # Two batches are in flight to a host that dies; both fail. While they wait to be resent,
    # newer asks for the same entity arrive. The resends go first, oldest batch first, and the
    # newer asks after them: the entity's commands keep their order across the failure.
    link = FlakyLink(failures=2, calls=[])
    region = Region([link], shards=1, max_batch=1, max_in_flight=3, retry_backoff=0.05)
    first = [region.submit(Request("counter", "x", Add(i), command_id=f"c{i}")) for i in (1, 2)]
    await asyncio.sleep(0.01)  # both calls failed; the resend waits for its backoff
    assert [[r.command.amount for r in c] for c in link.calls] == [[1], [2]]
    later = [region.submit(Request("counter", "x", Add(i), command_id=f"c{i}")) for i in (3, 4)]
    await asyncio.sleep(0)
    assert len(link.calls) == 2  # held behind the resends
    assert await asyncio.gather(*first, *later) == [1, 2, 3, 4]
    sent = [r.command.amount for c in link.calls[2:] for r in c]
    assert sent == [1, 2, 3, 4]
    assert [r.check_duplicate for c in link.calls[2:] for r in c] == [True, True, False, False]
    assert region.stats()["resends"] == 2 and region.outstanding == 0
    await region.close()


async def test_region_batches_per_tick_and_caps_calls_in_flight() -> None:
    link = FlakyLink(failures=0, calls=[])
    region = Region([link], shards=4, max_batch=100, max_in_flight=1)
    futures = [
        region.submit(Request("counter", str(i), Add(i), command_id=str(i))) for i in range(250)
    ]
    await asyncio.gather(*futures)
    assert [len(c) for c in link.calls] == [100, 100, 50]
    await region.close()


async def test_region_shares_a_tick_s_asks_evenly_among_free_calls() -> None:
    # 1,024 asks and two free calls leave as 512 + 512, not max_batch + the rest: the host
    # always has a full batch queued behind the one it runs.
    link = FlakyLink(failures=0, calls=[])
    region = Region([link], shards=4, max_batch=1000, max_in_flight=2)
    futures = [
        region.submit(Request("counter", str(i), Add(i), command_id=str(i))) for i in range(1024)
    ]
    assert await asyncio.gather(*futures) == list(range(1024))
    assert [len(c) for c in link.calls] == [512, 512]
    three = Region([link], shards=4, max_batch=300, max_in_flight=3)
    link.calls.clear()
    await asyncio.gather(*(three.submit(Request("counter", "x", Add(1))) for _ in range(1000)))
    assert [len(c) for c in link.calls] == [300, 300, 300, 100]  # max_batch still caps
    await region.close()
    await three.close()


@dataclass
class BeginningLink(FlakyLink):
    """A link whose calls begin when the region flushes (``begin``): records each batch as
    it is handed over, before any task of the region runs."""

    begun: list[list[int]] = field(default_factory=list)

    def begin(self, requests: list[Request]) -> Any:
        self.begun.append([r.command.amount for r in requests])
        if self.failures:
            self.failures -= 1
            raise HostUnreachable("host died")  # raised when the batch's task awaits it
        return self.call(requests)


async def test_region_begins_a_link_s_calls_in_its_flush_in_the_batches_order() -> None:
    link = BeginningLink(failures=0, calls=[])
    region = Region([link], shards=1, max_batch=2, max_in_flight=3)
    futures = [region.submit(Request("counter", "x", Add(i), command_id=f"c{i}")) for i in range(5)]
    await asyncio.sleep(0)  # the flush: every batch begun in it, in order, none awaited yet
    assert link.begun == [[0, 1], [2, 3], [4]] and link.calls == []
    assert await asyncio.gather(*futures) == [0, 1, 2, 3, 4]
    # A begin that raises fails its batch as the call would: resent by call(), answered.
    flaky = BeginningLink(failures=1, calls=[])
    region = Region([flaky], shards=1, retries=2, retry_backoff=0)
    assert await region.submit(Request("counter", "y", Add(7), command_id="y1")) == 7
    assert region.stats()["resends"] == 1 and region.outstanding == 0
    await region.close()


# --------------------------------------------------------------------------- hosts, no Ray


async def test_a_host_replies_before_it_saves_the_snapshots_a_batch_made_due(
    journal_settings: JournalSettings,
) -> None:
    # The 100th event of "s" makes a snapshot due (snapshot_every = 100). The host answers the
    # batch first and its snapshot thread saves the snapshot after: here the save waits until
    # the reply is in (at most 5 s; saved before the reply, it would wait out those 5 s inside
    # the batch and come first). Closing the host saves what is still due.
    import threading

    from lagompy.runtime._host import ShardHost
    from lagompy.runtime._sharding import topology_for

    js = journal_settings
    topology = topology_for("snapshots", [CounterEntity], js, shards=1, hosts=1)
    paths = ["ray_entities:CounterEntity"]
    host = await asyncio.to_thread(ShardHost, topology.to_dict(), 0, paths, js.model_dump())
    order: list[str] = []
    replied = threading.Event()
    try:
        assert isinstance(host.processor, EntityProcessor)
        snapshots = host.processor.snapshots
        save_many = snapshots.save_many

        async def after_the_reply(batch: Any) -> None:
            for _ in range(500):
                if replied.is_set():
                    break
                await asyncio.sleep(0.01)
            order.append("snapshot")
            await save_many(batch)

        snapshots.save_many = after_the_reply  # type: ignore[method-assign,assignment]
        requests = [Request("counter", "s", Add(1), command_id=f"c{n}") for n in range(100)]
        outcomes = await asyncio.to_thread(host._process, topology.key, requests)
        order.append("reply")
        replied.set()
        assert outcomes[-1] == (100, None)
        for _ in range(500):
            if host.counters["snapshots_saved_after_reply"]:
                break
            await asyncio.sleep(0.01)
        assert order == ["reply", "snapshot"]
        assert host.counters["snapshots_saved_after_reply"] == 1
        more = [Request("counter", "s", Add(1), command_id=f"d{n}") for n in range(100)]
        assert (await asyncio.to_thread(host._process, topology.key, more))[-1] == (200, None)
    finally:
        await asyncio.to_thread(host.close)
    storage = await open_storage(settings=js, entities=[CounterEntity])
    try:
        snapshot = await storage.snapshots.load("counter", "s")
    finally:
        await storage.close()
    assert snapshot is not None and snapshot.seq_nr == 200


def test_zombie_host_is_refused_by_the_journal_and_reloads(tmp_path: Path) -> None:
    # Two copies of the same shard host (a restarted host and its not-yet-dead predecessor)
    # both hold entity "z". The journal accepts only the writer that knows the latest sequence
    # number; the other's write is refused (ConcurrencyConflict): it drops the entity, reloads
    # it and runs the command again on the reloaded state, or, with retries off, answers with
    # the conflict.
    from lagompy.errors import ConcurrencyConflict
    from lagompy.runtime._host import ShardHost
    from lagompy.runtime._sharding import topology_for

    js = JournalSettings(url=f"sqlite:///{tmp_path / 'j.db'}")
    topology = topology_for("zombie", [CounterEntity], js, shards=1, hosts=1)
    paths = ["ray_entities:CounterEntity"]
    old = ShardHost(topology.to_dict(), 0, paths, js.model_dump())
    new = ShardHost(topology.to_dict(), 0, paths, js.model_dump())
    try:

        def add(host: ShardHost, token: str) -> Outcome:
            request = Request("counter", "z", Add(1, token=token), command_id=token)
            (outcome,) = host._process(topology.key, [request])
            return outcome

        assert add(old, "a") == (1, None)
        assert add(new, "b") == (2, None)  # the new copy recovers seq 1 and appends seq 2
        assert add(old, "c") == (3, None)  # refused at seq 2, reloaded, appended at seq 3
        assert isinstance(old.processor, EntityProcessor)
        assert old.processor.stats()["conflicts"] == 1
        old.processor.conflict_retries = 0
        assert add(new, "d") == (4, None)  # refused at seq 3, reloaded, appended at seq 4
        reply, error = add(old, "e")  # the zombie believes seq 3 is the latest; no retry
        assert reply is None and isinstance(error, ConcurrencyConflict)
        assert add(old, "f") == (5, None)  # it reloaded from the journal: no forked history
        wrong = old.process("another-topology", [Request("counter", "z", GetValue())])
        assert isinstance(wrong, list) and isinstance(wrong[0][1], ConfigurationError)
        # The region's one-argument form: the key travels inside the pickled batch.
        read = [tuple(Request("counter", "z", GetValue()))]
        packed = old.process_packed(pickle.dumps((topology.key, read)))
        assert isinstance(packed, bytes) and pickle.loads(packed) == [(5, None)]
        packed = old.process_packed(pickle.dumps(("another-topology", read)))
        assert isinstance(packed, bytes)
        assert isinstance(pickle.loads(packed)[0][1], ConfigurationError)
    finally:
        old.close()
        new.close()
    tokens = asyncio.run(_journal_tokens(js))
    assert tokens == ["a", "b", "c", "d", "f"]
