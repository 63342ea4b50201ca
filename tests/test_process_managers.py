"""Process managers (lagompy.process) on both journals: orders drive a ledger with state per
order (tests/process_entities.py).

* events drive commands, the state per key is stored with the position, ``end()`` deletes it;
* a worker that dies between its sends and its commit re-runs the events with the same
  command ids: the ledger applies each command once;
* a durable timer fires once, after a restart of the managers, and never again; ``end()``
  cancels a key's timers;
* a failing handler is retried, then stops its partition (status and readiness say why) until
  skipped, or is skipped by ``on_failure="skip"``;
* bad configurations are refused with errors naming what is wrong;
* the component runs in a Service on Ray: status route, metrics, readiness;
* random interleavings of several keys' events end in the states a pure fold gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from process_entities import (
    CancelOrder,
    ChargeFromTopic,
    Fulfil,
    Fulfilment,
    Ledger,
    LedgerEntity,
    OrderEntity,
    OrderPlaced,
    Peek,
    PlaceOrder,
    Remind,
)
from typer.testing import CliRunner

from lagompy import ConfigurationError, open_storage, start
from lagompy.cli import build_app
from lagompy.console import ConsoleSettings
from lagompy.errors import ReadSideHandlerFailed
from lagompy.process import (
    ProcessContext,
    ProcessManager,
    ProcessManagers,
    ProcessManagersComponent,
    start_process_managers,
)
from lagompy.runtime import InProcessEntities, shutdown_app
from lagompy.service import Service
from lagompy.settings import JournalSettings

TESTS = Path(__file__).resolve().parent
FAST: dict[str, Any] = {"retry_initial_delay": 0.01, "retry_max_delay": 0.05, "renew_interval": 0.2}


@pytest.fixture
async def runtime(journal_settings: JournalSettings) -> AsyncIterator[InProcessEntities]:
    entities = await start(
        ray=False, app="pm", entities=[OrderEntity, LedgerEntity], journal_settings=journal_settings
    )
    try:
        yield entities
    finally:
        await entities.close()


async def ledger(runtime: Any) -> Ledger:
    state: Ledger = await runtime.ref_for(LedgerEntity, "main").ask(Peek())
    return state


async def place(runtime: Any, *orders: str, amount: int = 10, remind_after: float = 3600) -> None:
    for order in orders:
        await runtime.ref_for(OrderEntity, order).ask(PlaceOrder(amount, remind_after))


async def catch_up(managers: ProcessManagers) -> None:
    for worker in managers.workers:
        await worker.catch_up()


async def eventually(check: Any, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- the basics


async def test_events_drive_commands_with_state_per_key(
    runtime: InProcessEntities, journal_settings: JournalSettings
) -> None:
    await place(runtime, "o1", "o2", "o3", "o4")
    async with start_process_managers(
        [Fulfil], entities=runtime, journal_settings=journal_settings, run=False
    ) as managers:
        await catch_up(managers)
        book = await ledger(runtime)
        assert sorted(book.of("charge")) == ["o1", "o2", "o3", "o4"]
        state = await managers.state("fulfil", "o1")
        assert isinstance(state, Fulfilment)
        assert (state.status, state.charged, state.reminded) == ("charged", 10, False)
        statuses = await managers.status()
        assert {s.tag for s in statuses} == {"pm-orders0", "pm-orders1"}
        assert sum(s.active_keys for s in statuses) == 4
        assert sum(s.pending_timers for s in statuses) == 4
        assert all(s.worker.lag_events == 0 for s in statuses)
        assert statuses[0].to_dict()["manager"] == "fulfil"

        await runtime.ref_for(OrderEntity, "o2").ask(CancelOrder())
        await catch_up(managers)
        assert (await ledger(runtime)).of("refund") == ["o2"]
        assert await managers.state("fulfil", "o2") is None  # ended: state and timer gone
        statuses = await managers.status()
        assert sum(s.active_keys for s in statuses) == 3
        assert sum(s.pending_timers for s in statuses) == 3
        # Handled once: catching up again sends nothing.
        await catch_up(managers)
        assert len((await ledger(runtime)).entries) == 5


async def test_two_processes_share_the_partitions_and_charge_once(
    runtime: InProcessEntities, journal_settings: JournalSettings
) -> None:
    # Each start_process_managers is a member of the manager: the second takes one of the two
    # partitions over at a batch boundary, and gives it back when it stops.
    def held(managers: ProcessManagers) -> int:
        return sum(w.lease is not None for w in managers.workers)

    async def settles(check: Any) -> None:
        async def ready() -> bool:
            return bool(check())

        await eventually(ready)

    await place(runtime, "o1", "o2", "o3", "o4")
    async with start_process_managers(
        [Fulfil], entities=runtime, journal_settings=journal_settings, **FAST
    ) as one:
        await settles(lambda: held(one) == 2)
        async with start_process_managers(
            [Fulfil], entities=runtime, journal_settings=journal_settings, **FAST
        ) as two:
            await settles(lambda: held(one) == 1 and held(two) == 1)
            await place(runtime, *(f"p{i}" for i in range(8)))
            await one.wait_until_caught_up()
            await two.wait_until_caught_up()
        await settles(lambda: held(one) == 2)
        await place(runtime, "q1", "q2")
        await one.wait_until_caught_up()
        charged = (await ledger(runtime)).of("charge")
        assert sorted(charged) == sorted(
            ["o1", "o2", "o3", "o4", *(f"p{i}" for i in range(8)), "q1", "q2"]
        )


class Crash(BaseException):
    """The worker dies: raised where its transaction would commit."""


async def test_a_crash_between_the_sends_and_the_commit_is_absorbed(
    runtime: InProcessEntities, journal_settings: JournalSettings
) -> None:
    orders = [f"c{i}" for i in range(6)]
    await place(runtime, *orders)
    async with start_process_managers(
        [Fulfil], entities=runtime, journal_settings=journal_settings, run=False
    ) as managers:
        worker = next(w for w in managers.workers if w.tag == "pm-orders0")
        real = worker.states.write

        async def crash(*args: Any, **kwargs: Any) -> None:
            raise Crash

        worker.states.write = crash  # type: ignore[method-assign]
        with pytest.raises(Crash):
            await worker.catch_up()
        worker.states.write = real  # type: ignore[method-assign]
        sent = (await ledger(runtime)).of("charge")
        assert sent, "the crashed worker sent its commands before dying"
        assert worker.offset == 0  # nothing committed
    # A new process re-runs the events: the same command ids, answered from stored replies.
    async with start_process_managers(
        [Fulfil], entities=runtime, journal_settings=journal_settings, run=False
    ) as managers:
        await catch_up(managers)
        book = await ledger(runtime)
        assert sorted(book.of("charge")) == sorted(orders)  # each once
        assert sorted(book.of("charge")) == sorted(set(book.of("charge")))
        for order in orders:
            state = await managers.state("fulfil", order)
            assert state is not None and state.status == "charged"


CHILD = """
import asyncio, sys
from lagompy import start
from lagompy.process import start_process_managers
from lagompy.settings import JournalSettings
from process_entities import FulfilThenHang, LedgerEntity, OrderEntity

async def main() -> None:
    settings = JournalSettings.model_validate_json(sys.argv[1])
    async with await start(
        ray=False, app="pm", entities=[OrderEntity, LedgerEntity], journal_settings=settings
    ) as entities:
        async with start_process_managers(
            [FulfilThenHang], entities=entities, journal_settings=settings,
            lease_ttl=2.0, renew_interval=0.5,
        ):
            print("started", flush=True)
            await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_killed_worker_s_commands_are_applied_once(
    journal_settings: JournalSettings,
) -> None:
    """A real crash: the worker's process is killed (SIGKILL) after its handlers sent their
    commands and before its transaction committed; a new process takes the partition over
    once the lease expires, re-runs the events, and the ledger applies each command once."""
    orders = ["a1", "a2", "a3", "hang-1"]
    async with await start(
        ray=False, app="pm", entities=[OrderEntity, LedgerEntity], journal_settings=journal_settings
    ) as entities:
        await place(entities, *orders)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        journal_settings.model_dump_json(),
        env={**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{TESTS.parent}"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:

        async def hang_charged() -> bool:
            return "hang-1" in await _charges(journal_settings)

        await eventually(hang_charged, timeout=60)
    finally:
        child.kill()  # SIGKILL: no cleanup, the lease stays held until it expires
        await child.wait()
    before = await _charges(journal_settings)
    async with await start(
        ray=False, app="pm", entities=[OrderEntity, LedgerEntity], journal_settings=journal_settings
    ) as entities:
        async with start_process_managers(
            [Fulfil], entities=entities, journal_settings=journal_settings, run=False
        ) as managers:
            tag = OrderEntity.tag.for_entity("hang-1")
            (row,) = [s for s in await managers.status() if s.tag == tag]
            assert row.offset < await _offset_of(journal_settings, "hang-1")  # never committed
            for worker in managers.workers:
                await worker.catch_up()  # waits for the dead worker's lease to expire
            book = await ledger(entities)
            assert sorted(book.of("charge")) == sorted(orders)  # each once
            assert sorted(await _charges(journal_settings)) == sorted(orders)
            assert "hang-1" in before
            state = await managers.state("fulfil", "hang-1")
            assert state is not None and state.status == "charged"


async def _offset_of(settings: JournalSettings, order: str) -> int:
    async with await open_storage(settings=settings, entities=[OrderEntity]) as storage:
        (placed,) = await storage.journal.events("pm-order", order)
    return placed.offset


async def _charges(settings: JournalSettings) -> list[str]:
    """The orders charged, as the ledger's events in the journal say."""
    async with await open_storage(settings=settings, entities=[LedgerEntity]) as storage:
        events = await storage.journal.events("pm-ledger", "main")
    return [e.event.entry.order_id for e in events if e.event.entry.kind == "charge"]


async def test_a_topic_drives_a_process_manager(
    runtime: InProcessEntities, journal_settings: JournalSettings
) -> None:
    await place(runtime, "p1", "p2", "p3", amount=7)
    await runtime.ref_for(OrderEntity, "p2").ask(CancelOrder())  # filtered: no message
    async with start_process_managers(
        [ChargeFromTopic], entities=runtime, journal_settings=journal_settings
    ) as managers:
        await managers.wait_until_caught_up()

        async def charged() -> bool:
            return sorted((await ledger(runtime)).of("topic-charge")) == ["p1", "p2", "p3"]

        await eventually(charged)
        state = await managers.state("charge-from-topic", "p2")
        assert state == Fulfilment(status="charged", charged=7)
        statuses = await managers.status()
        assert {s.tag for s in statuses} == {"pm-orders0", "pm-orders1"}
        assert all(s.worker.lag_events == 0 for s in statuses)
    async with start_process_managers(
        [ChargeFromTopic], entities=runtime, journal_settings=journal_settings, run=False
    ) as managers:
        for worker in managers.workers:
            await worker.catch_up()
        assert len((await ledger(runtime)).of("topic-charge")) == 3  # handled once


# --------------------------------------------------------------------------- timers


async def test_a_timer_fires_once_after_a_restart(
    runtime: InProcessEntities, journal_settings: JournalSettings
) -> None:
    await place(runtime, "t1", remind_after=2.0)
    await place(runtime, "t2", remind_after=0.5)
    await runtime.ref_for(OrderEntity, "t2").ask(CancelOrder())  # cancels t2's reminder
    async with start_process_managers(
        [Fulfil], entities=runtime, journal_settings=journal_settings, **FAST
    ) as managers:
        await managers.wait_until_caught_up()
        assert (await ledger(runtime)).of("remind") == []
        assert sum(s.pending_timers for s in await managers.status()) == 1
    # Down while the timer falls due; the next start fires it.
    await asyncio.sleep(0.5)
    async with start_process_managers(
        [Fulfil], entities=runtime, journal_settings=journal_settings, **FAST
    ) as managers:

        async def reminded() -> bool:
            state = await managers.state("fulfil", "t1")  # committed after the send
            return state is not None and state.reminded and state.reminder is None

        await eventually(reminded)
        assert (await ledger(runtime)).of("remind") == ["t1"]
        assert await _pending(managers, 0)  # deleted with the state, in one transaction
    async with start_process_managers(
        [Fulfil], entities=runtime, journal_settings=journal_settings, **FAST
    ) as managers:
        await managers.wait_until_caught_up()
        await asyncio.sleep(1.2)
        assert (await ledger(runtime)).of("remind") == ["t1"]  # once
        assert sum(w.timers_fired for w in managers.workers) == 0


async def test_an_event_that_cancels_a_due_timer_is_handled_before_it(
    runtime: InProcessEntities, journal_settings: JournalSettings
) -> None:
    """After a restart, a timer that fell due while the managers were down does not fire
    before the events written before its due time are handled: here, the order's cancel."""
    await place(runtime, "cancelled-late", remind_after=0.3)
    # The first run only handles the order (no timer loop: under load a running one could
    # fire the reminder before the cancel below is even written).
    async with start_process_managers(
        [Fulfil], entities=runtime, journal_settings=journal_settings, run=False, **FAST
    ) as managers:
        await managers.worker("fulfil", OrderEntity.tag.for_entity("cancelled-late")).catch_up()
        assert await _pending(managers, 1)
    await runtime.ref_for(OrderEntity, "cancelled-late").ask(CancelOrder())
    await asyncio.sleep(0.5)  # the reminder is due; the cancel waits in the journal
    async with start_process_managers(
        [Fulfil], entities=runtime, journal_settings=journal_settings, **FAST
    ) as managers:
        await managers.wait_until_caught_up()
        await eventually(lambda: _pending(managers, 0))
        await asyncio.sleep(0.3)
        book = await ledger(runtime)
        assert book.of("refund") == ["cancelled-late"]
        assert book.of("remind") == []  # cancelled by end(), never fired


async def test_timers_fire_on_demand_in_tests(
    runtime: InProcessEntities, journal_settings: JournalSettings
) -> None:
    await place(runtime, "now", remind_after=0)
    async with start_process_managers(
        [Fulfil], entities=runtime, journal_settings=journal_settings, run=False
    ) as managers:
        worker = managers.worker("fulfil", OrderEntity.tag.for_entity("now"))
        await worker.catch_up()
        assert (await ledger(runtime)).of("remind") == []
        assert await worker.fire_due_timers() == 1
        assert await worker.fire_due_timers() == 0
        assert (await ledger(runtime)).of("remind") == ["now"]
        state = await managers.state("fulfil", "now")
        assert state is not None and state.reminded


async def _pending(managers: ProcessManagers, n: int) -> bool:
    return sum(s.pending_timers for s in await managers.status()) == n


# --------------------------------------------------------------------------- failures


async def test_a_failing_handler_stops_its_partition_until_skipped(
    runtime: InProcessEntities, journal_settings: JournalSettings
) -> None:
    bad = "bad-1"
    partition = OrderEntity.tag.for_entity(bad)
    await place(runtime, bad, amount=-1)
    await place(runtime, "good-1", "good-2", "good-3")
    component = ProcessManagersComponent(
        [Fulfil], entities=runtime, journal_settings=journal_settings, max_attempts=2, **FAST
    )
    await component.start()
    try:
        running = component.running

        async def failed() -> bool:
            return any(s.state == "failed" for s in await running.status())

        await eventually(failed)
        status = next(s for s in await running.status() if s.tag == partition)
        assert status.worker.failure is not None
        assert "negative amount -1" in status.worker.failure.error
        assert status.worker.failure.entity_id == bad
        ready = await component.ready()
        assert isinstance(ready, str) and "fulfil" in ready and "negative amount" in ready
        samples = await component.metric_samples()
        assert (
            "lagompy_process_manager_state",
            {"manager": "fulfil", "partition": partition, "state": "failed"},
        ) in [(name, labels) for name, _, _, labels, _ in samples]

        assert await running.skip("fulfil") == 1
        await running.wait_until_caught_up()
        good = {"good-1", "good-2", "good-3"}
        assert set((await ledger(runtime)).of("charge")) == good
        assert await component.ready() is True
        assert await running.state("fulfil", bad) is None
    finally:
        await component.stop()


async def test_on_failure_skip_moves_past_the_event(
    runtime: InProcessEntities, journal_settings: JournalSettings
) -> None:
    await place(runtime, "neg", amount=-5)
    await place(runtime, "pos")
    async with start_process_managers(
        [Fulfil],
        entities=runtime,
        journal_settings=journal_settings,
        run=False,
        max_attempts=2,
        on_failure="skip",
        **FAST,
    ) as managers:
        await catch_up(managers)
        assert (await ledger(runtime)).of("charge") == ["pos"]
        statuses = await managers.status()
        assert sum(s.worker.skipped for s in statuses) == 1


async def test_catch_up_raises_when_a_handler_keeps_failing(
    runtime: InProcessEntities, journal_settings: JournalSettings
) -> None:
    await place(runtime, "neg", amount=-5)
    async with start_process_managers(
        [Fulfil],
        entities=runtime,
        journal_settings=journal_settings,
        run=False,
        max_attempts=1,
        **FAST,
    ) as managers:
        worker = managers.worker("fulfil", OrderEntity.tag.for_entity("neg"))
        with pytest.raises(ReadSideHandlerFailed, match="negative amount -5"):
            await worker.catch_up()


class BrokenReminders(Fulfil):
    name = "broken-reminders"

    async def on_timer(self, ctx: ProcessContext, state: Fulfilment, message: object) -> Fulfilment:
        raise RuntimeError("the reminder service is down")


async def test_a_failing_timer_stops_its_partition_until_skipped(
    runtime: InProcessEntities, journal_settings: JournalSettings
) -> None:
    await place(runtime, "late", remind_after=0)
    partition = OrderEntity.tag.for_entity("late")
    async with start_process_managers(
        [BrokenReminders],
        entities=runtime,
        journal_settings=journal_settings,
        max_attempts=2,
        **FAST,
    ) as managers:

        async def failed() -> bool:
            return any(s.state == "failed" for s in await managers.status())

        await eventually(failed)
        status = next(s for s in await managers.status() if s.tag == partition)
        failure = status.worker.failure
        assert failure is not None
        assert "on_timer failed for timer 'e1.0' of key 'late'" in failure.error
        assert "the reminder service is down" in failure.error
        assert (failure.entity_type, failure.entity_id) == ("timer", "e1.0")
        assert status.pending_timers == 1
        assert status.offset == 1  # the event committed; the timer is what stopped it

        assert await managers.skip("broken-reminders") == 1

        async def running() -> bool:
            s = next(s for s in await managers.status() if s.tag == partition)
            return s.state == "running" and s.pending_timers == 0

        await eventually(running)
        assert (await ledger(runtime)).of("remind") == []
        state = await managers.state("broken-reminders", "late")
        assert state is not None and not state.reminded


# --------------------------------------------------------------------------- configuration


@dataclass
class Mutable:
    n: int = 0


def _manager(**attrs: Any) -> type[ProcessManager[Any]]:
    async def handle(self: Any, ctx: ProcessContext, state: Any, event: Any) -> Any:
        return state

    body: dict[str, Any] = {
        "name": "m",
        "source": OrderEntity,
        "initial_state": Fulfilment(),
        "handle": handle,
    }
    body.update(attrs)
    body = {k: v for k, v in body.items() if v is not _DROP}
    return type("Bad", (ProcessManager,), body)


_DROP = object()


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"name": _DROP}, "needs a name"),
        ({"name": "a:b"}, "without ':'"),
        ({"source": Fulfilment}, "source must be a PersistentEntity subclass"),
        ({"source": LedgerEntity}, "with a tag"),
        ({"initial_state": _DROP}, "needs an initial_state"),
        ({"initial_state": Mutable()}, "must be a frozen dataclass"),
        ({"initial_state": 3}, "must be a dataclass instance"),
        ({"handle": _DROP}, "does not override handle"),
        ({"timer_messages": (Remind,)}, "does not override on_timer"),
        ({"timer_messages": [Remind]}, "timer_messages must be a tuple"),
    ],
)
async def test_bad_configurations_are_refused(attrs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        _manager(**attrs).validate()
    with pytest.raises(ConfigurationError, match=message):
        ProcessManagersComponent([_manager(**attrs)])


async def test_bad_arguments_are_refused(
    runtime: InProcessEntities, journal_settings: JournalSettings
) -> None:
    with pytest.raises(ConfigurationError, match="at least one"):
        await start_process_managers([], entities=runtime, journal_settings=journal_settings)
    with pytest.raises(ConfigurationError, match="share a name"):
        await start_process_managers(
            [Fulfil, Fulfil()], entities=runtime, journal_settings=journal_settings
        )
    with pytest.raises(ConfigurationError, match="needs an entity runtime"):
        await start_process_managers(
            [Fulfil],
            entities=object(),  # type: ignore[arg-type]
            journal_settings=journal_settings,
        )
    # Read sides and subscribers park a failing event; a process manager does not (its retry
    # could not run the event again): refused naming the manager, as docs/process-managers.md
    # says.
    with pytest.raises(ConfigurationError, match="'process:fulfil': on_failure='park'"):
        await start_process_managers(
            [Fulfil], entities=runtime, journal_settings=journal_settings, on_failure="park"
        )
    with pytest.raises(ConfigurationError, match="not a ProcessManager subclass"):
        await start_process_managers(
            [OrderEntity],  # type: ignore[list-item]
            entities=runtime,
            journal_settings=journal_settings,
        )
    component = ProcessManagersComponent([Fulfil])
    with pytest.raises(ConfigurationError, match="not part of a Service"):
        await component.start()


class BadKey(ProcessManager[Fulfilment]):
    name = "bad-key"
    source = OrderEntity
    initial_state = Fulfilment()

    def associate(self, event: object, entity_id: str) -> str | None:
        return 42  # type: ignore[return-value]

    async def handle(self, ctx: ProcessContext, state: Fulfilment, event: object) -> Fulfilment:
        return state


class UndeclaredTimer(ProcessManager[Fulfilment]):
    name = "undeclared-timer"
    source = OrderEntity
    initial_state = Fulfilment()

    async def handle(self, ctx: ProcessContext, state: Fulfilment, event: object) -> Fulfilment:
        ctx.after(1, Remind(1))
        return state


class ForgetsToReturn(ProcessManager[Fulfilment]):
    name = "forgets-to-return"
    source = OrderEntity
    initial_state = Fulfilment()

    async def handle(  # type: ignore[empty-body]
        self, ctx: ProcessContext, state: Fulfilment, event: object
    ) -> Fulfilment:
        pass


@pytest.mark.parametrize(
    ("manager", "message"),
    [
        (BadKey, "associate\\(\\) must return a str"),
        (ForgetsToReturn, "handle\\(\\) returned None for key 'x'; it must return the new"),
        (UndeclaredTimer, "timer message Remind is not one of its timer_messages"),
    ],
)
async def test_handler_misuse_is_named_in_the_failure(
    runtime: InProcessEntities,
    journal_settings: JournalSettings,
    manager: type[ProcessManager[Any]],
    message: str,
) -> None:
    await place(runtime, "x")
    async with start_process_managers(
        [manager], entities=runtime, journal_settings=journal_settings, run=False, max_attempts=1
    ) as managers:
        worker = managers.worker(manager.name, OrderEntity.tag.for_entity("x"))
        with pytest.raises(ReadSideHandlerFailed, match=message):
            await worker.catch_up()
        with pytest.raises(ConfigurationError, match="no process manager 'nope'"):
            await managers.status("nope")


# --------------------------------------------------------------------------- in a service


async def test_the_component_in_a_service_on_ray(
    ray_session: Any, journal_settings: JournalSettings
) -> None:
    app_name = f"pm-{uuid.uuid4().hex[:8]}"
    component = ProcessManagersComponent([Fulfil], **FAST)
    service = Service(
        name=app_name,
        entities=[OrderEntity, LedgerEntity],
        journal_settings=journal_settings,
        ray=True,
        runtime_options={"hosts": 1, "shards": 8},
        components=[component],
    )
    app = FastAPI()
    service.install(app, console=ConsoleSettings())
    await service.start()
    try:
        await place(service.entities, "r1", "r2", remind_after=0.3)
        await component.wait_until_caught_up()

        async def reminded() -> bool:
            return sorted((await ledger(service.entities)).of("remind")) == ["r1", "r2"]

        await eventually(reminded)
        book = await ledger(service.entities)
        assert sorted(book.of("charge")) == ["r1", "r2"]
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as http:
            rows = (await http.get("/process-managers")).json()
            assert {r["tag"] for r in rows} == {"pm-orders0", "pm-orders1"}
            assert sum(r["active_keys"] for r in rows) == 2
            metrics = (await http.get("/metrics")).text
            assert "lagompy_process_manager_active_keys" in metrics
            assert "lagompy_process_manager_offset" in metrics
            ready = (await http.get("/health/ready")).json()
            assert ready["checks"]["process-managers"] == "ok", ready
            # The console lists their partitions with the read sides' (and operates them).
            console = (await http.get("/console/api/readsides")).json()
            assert {r["tag"] for r in console if r["processor"] == "process:fulfil"} == {
                "pm-orders0",
                "pm-orders1",
            }
    finally:
        await service.stop()
        await shutdown_app(app_name)


# --------------------------------------------------------------------------- a pure fold


@dataclass(frozen=True)
class Tally:
    placed: int = 0
    total: int = 0


class Tallies(ProcessManager[Tally]):
    """No commands: the state per key is a fold of its events; a cancel ends the key."""

    name = "tallies"
    source = OrderEntity
    initial_state = Tally()

    def associate(self, event: object, entity_id: str) -> str | None:
        return entity_id.split("/")[0]  # several orders share a key ("k1/3" -> "k1")

    async def handle(self, ctx: ProcessContext, state: Tally, event: object) -> Tally:
        match event:
            case OrderPlaced(amount=a):
                return replace(state, placed=state.placed + 1, total=state.total + a)
        ctx.end()
        return state


def _in_shard_of(key: str, n: int) -> str:
    """An order id ``key/n...`` whose events share the partition of ``key``'s (a key's events
    come from one partition)."""
    tag = OrderEntity.tag
    suffix = 0
    while tag.for_entity(f"{key}/{n}.{suffix}") != tag.for_entity(key):
        suffix += 1
    return f"{key}/{n}.{suffix}"


def fold(ops: list[tuple[str, int | None]]) -> dict[str, Tally]:
    states: dict[str, Tally] = {}
    for key, amount in ops:
        if amount is None:
            states.pop(key, None)
        else:
            t = states.get(key, Tally())
            states[key] = Tally(t.placed + 1, t.total + amount)
    return states


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["k1", "k2", "k3"]), st.none() | st.integers(0, 50)),
        min_size=1,
        max_size=25,
    ),
    batch=st.sampled_from([1, 3, 100]),
)
async def test_random_interleavings_fold_purely(
    runtime: InProcessEntities,
    journal_settings: JournalSettings,
    ops: list[tuple[str, int | None]],
    batch: int,
) -> None:
    run = uuid.uuid4().hex[:8]
    for n, (key, amount) in enumerate(ops):
        order = _in_shard_of(f"{key}-{run}", n)
        if amount is None:
            await runtime.ref_for(OrderEntity, order).ask(CancelOrder())
        else:
            await runtime.ref_for(OrderEntity, order).ask(PlaceOrder(amount))
    manager: type[Tallies] = type("T", (Tallies,), {"name": f"tallies-{run}"})
    async with start_process_managers(
        [manager], entities=runtime, journal_settings=journal_settings, run=False, max_batch=batch
    ) as managers:
        for worker in managers.workers:
            await worker.catch_up()
        expected = fold([(f"{k}-{run}", a) for k, a in ops])
        for key in {f"{k}-{run}" for k, _ in ops}:
            assert await managers.state(manager.name, key) == expected.get(key)


# --------------------------------------------------------------------------- the CLI


def test_the_cli_shows_and_operates_process_managers(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'orders.db'}"
    settings = JournalSettings(url=url)

    async def run_managers() -> None:
        async with await start(
            ray=False, app="pm-cli", entities=[OrderEntity, LedgerEntity], journal_settings=settings
        ) as entities:
            await place(entities, "a", "b", "c")
            await place(entities, "bad", amount=-1)
            async with start_process_managers(
                [Fulfil], entities=entities, journal_settings=settings, run=False, max_attempts=1
            ) as managers:
                for worker in managers.workers:
                    with contextlib.suppress(ReadSideHandlerFailed):
                        await worker.catch_up()

    asyncio.run(run_managers())
    runner = CliRunner()
    common = ["--url", url, "--journal-url", url]

    def lagompy(*args: str) -> tuple[int, str]:
        result = runner.invoke(build_app(), list(args))
        return result.exit_code, result.output

    code, out = lagompy("process-managers", "status", "--json", *common)
    assert code == 0, out
    rows = json.loads(out)
    assert {r["manager"] for r in rows} == {"fulfil"}
    assert sum(r["active_keys"] for r in rows) == 3
    assert sum(r["pending_timers"] for r in rows) == 3
    bad_tag = OrderEntity.tag.for_entity("bad")
    failed = [r for r in rows if r["state"] == "failed"]
    assert [r["tag"] for r in failed] == [bad_tag]
    assert "negative amount -1" in failed[0]["failure"]["error"]

    code, out = lagompy("process-managers", "status", *common)
    assert code == 0 and "process:fulfil" in out and "active keys" in out, out
    code, out = lagompy("process-managers", "pause", "fulfil", *common)
    assert code == 0 and "paused process manager 'fulfil' (2 partitions)" in out, out
    code, out = lagompy("process-managers", "resume", "fulfil", "--tag", bad_tag, *common)
    assert code == 0 and "(1 partition)" in out, out
    code, out = lagompy("process-managers", "skip", "fulfil", *common)
    assert code != 0 and "nothing to skip" in out, out  # resumed: no longer failed
    code, out = lagompy("process-managers", "status", "nope", *common)
    assert code == 0 and "no 'nope' here" in out, out
