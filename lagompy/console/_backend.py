"""What the console shows and does, as plain data: the service's health, hosts and breakers,
the read sides' status and operations, an entity's events and snapshot, and the audit log.

Every figure comes from an operation that exists anyway (``Service.readiness``, the runtime's
``host_stats``, :class:`~lagompy.readside.Projections`, the journal's tables, the breakers'
``status``): the pages and the JSON routes are two views of the same dicts."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, date, datetime
from enum import Enum
from typing import TYPE_CHECKING, Any

import msgpack
from sqlalchemy import select

from lagompy.console._audit import AuditEntry, AuditLog
from lagompy.console._settings import ConsoleSettings
from lagompy.errors import ConfigurationError, LagompyError
from lagompy.journal._journal import check_entity_id
from lagompy.journal._model import from_us
from lagompy.journal._placement import HOME, Placement
from lagompy.readside import ParkedEvent, ParkedFilter, Projections
from lagompy.sql import _schema as schema
from lagompy.sql._database import Database
from lagompy.sql._migrate import ensure_schema
from lagompy.topic._subscriber import GROUP_PREFIX, PRODUCER_PREFIX

if TYPE_CHECKING:
    from lagompy.readside import WorkerStatus
    from lagompy.serialization import Serializer
    from lagompy.service import Service

__all__ = ["MASK", "ActionError", "Backend", "FailedFilter", "error_class"]

log = logging.getLogger("lagompy.console")

#: What a masked value shows.
MASK = "***"

#: Seconds between two readings of a host's commands for a rate.
MIN_RATE_INTERVAL = 0.5

#: How many breaker state changes the console keeps (per process).
BREAKER_CHANGES = 100

#: How many of an entity's latest command replies the Entities page shows.
RECENT_COMMANDS = 20

#: How many recent read-side failures the overview lists.
RECENT_FAILURES = 10

#: How many parked events the Failed page lists at once (the count says how many match).
PARKED_PAGE = 200


@dataclass(frozen=True)
class RebuildProgress:
    """A rebuild started from the console (in this process): how far it got."""

    processor: str
    started_at: str
    #: ``running``, ``done`` or ``failed``.
    state: str = "running"
    done: int = 0
    total: int = 0
    detail: str | None = None

    @property
    def percent(self) -> int:
        """100 once the rebuild is ``done``; at most 99 while it runs, even when every event
        is replayed (it still releases its leases and records its end)."""
        if self.state == "done":
            return 100
        return 0 if self.total <= 0 else min(99, self.done * 100 // self.total)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "percent": self.percent}


class ActionError(Exception):
    """An action or lookup the console refuses: ``status`` is the HTTP status (404 unknown,
    409 refused by the operation, 503 unavailable), ``detail`` says why in public words."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def error_class(error: str) -> str:
    """The class of a read side's failure line: ``RuntimeError`` of ``handler failed at
    offset 7 (user/42 sequence number 1), attempt 3/3: RuntimeError: boom``; a database error
    as ``database error <driver class>``."""
    for part in error.split(": ")[:-1]:
        found = _ERROR_CLASS.match(part.strip())
        if found is not None:
            return found.group(1)
    return "other"


_ERROR_CLASS = re.compile(r"^([A-Za-z_][\w.]*|database error [\w.]+)(?: \(SQLSTATE \w+\))?$")


def jsonable(value: Any, *, masked: bool) -> Any:
    """``value`` (a decoded event or state) as JSON-able data: dataclasses and mappings by
    field, sequences as lists; every leaf replaced by :data:`MASK` when ``masked``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: jsonable(getattr(value, f.name), masked=masked)
            for f in dataclasses.fields(value)
        }
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, masked=masked) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v, masked=masked) for v in value]
    if masked:
        return MASK
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Enum):
        return jsonable(value.value, masked=False)
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return repr(value)[:1000]


@dataclass(frozen=True)
class FailedFilter:
    """Which failed tags: of a processor, an error class (see :func:`error_class`) and an
    entity (``type`` or ``type/id``); None matches any."""

    processor: str | None = None
    error: str | None = None
    entity: str | None = None

    def matches(self, s: WorkerStatus) -> bool:
        failure = s.failure
        if s.state != "failed" or failure is None:
            return False
        if self.processor and s.processor != self.processor:
            return False
        if self.error and error_class(failure.error) != self.error:
            return False
        if self.entity:
            kind, _, entity_id = self.entity.partition("/")
            if failure.entity_type != kind or (entity_id and failure.entity_id != entity_id):
                return False
        return True

    def describe(self) -> str:
        return (
            f"processor={self.processor or '*'}, error={self.error or '*'}, "
            f"entity={self.entity or '*'}"
        )


def filter_failed(statuses: list[WorkerStatus], which: FailedFilter) -> list[WorkerStatus]:
    """The statuses stopped at an event (``failed``) that ``which`` matches."""
    return [s for s in statuses if which.matches(s)]


def is_topic(processor: str) -> bool:
    """True for the rows of topic subscriber groups and broker producers (the Topics page's),
    which share the read sides' offset table."""
    return processor.startswith((GROUP_PREFIX, PRODUCER_PREFIX))


def summarize(statuses: list[WorkerStatus]) -> list[dict[str, Any]]:
    """One line per processor: its tags, how many are in each state, the lowest offset and
    the events/s of all its tags."""
    lines: dict[str, dict[str, Any]] = {}
    for s in statuses:
        line = lines.setdefault(
            s.processor,
            {"processor": s.processor, "tags": 0, "states": {}, "lowest_offset": s.offset,
             "events_per_s": 0.0},
        )  # fmt: skip
        line["tags"] += 1
        line["states"][s.state] = line["states"].get(s.state, 0) + 1
        line["lowest_offset"] = min(line["lowest_offset"], s.offset)
        line["events_per_s"] += s.events_per_s
    return list(lines.values())


class Backend:
    """The console's view of one service (see the module docs)."""

    def __init__(self, service: Service, settings: ConsoleSettings) -> None:
        self.service = service
        self.settings = settings
        #: The journal's databases opened so far, by name (HOME: the home one).
        self._databases: dict[str, Database] = {}
        #: Which database holds each entity (read from the settings on first use).
        self._placement: Placement | None = None
        self._serializer: Serializer | None = None
        self._audit: AuditLog | None = None
        self._lock = asyncio.Lock()
        #: The rebuilds started here, by processor, and their tasks.
        self.rebuilds: dict[str, RebuildProgress] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: Held by an action from its start to its audit row, and by a rebuild's end.
        self.audit_order = asyncio.Lock()
        #: The last stats read of each host: (monotonic time, commands, rate).
        self._host_samples: dict[Any, tuple[float, float, float | None]] = {}
        #: The breakers' state changes seen by this process, newest last.
        self.breaker_changes: deque[dict[str, Any]] = deque(maxlen=BREAKER_CHANGES)
        service.breakers.add_listener(self._breaker_event)

    def _breaker_event(self, breaker: Any, event: str) -> None:
        if event == "state":
            self.breaker_changes.append(
                {"at": datetime.now(UTC).isoformat(), "breaker": breaker.id,
                 "state": breaker.last_state}
            )  # fmt: skip

    # ------------------------------------------------------------------ lifecycle

    @property
    def name(self) -> str:
        return "console"

    async def start(self) -> None:
        """Nothing to start: the journal's database is opened on first use."""

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        databases, self._databases, self._audit = self._databases, {}, None
        for database in databases.values():
            await database.dispose()

    async def _journal(self, entity_id: str | None = None) -> Database:
        """The journal's database (the home one, where the audit log is), or the one that
        holds ``entity_id`` when the journal is placed on several."""
        if self._placement is None:
            runtime = self.service._runtime
            settings = (None if runtime is None else runtime.local_journal) or (
                self.service.journal_settings
            )
            self._placement = Placement.of(settings)
        placement = self._placement
        name = HOME if entity_id is None else placement.database_of(entity_id)
        database = self._databases.get(name)
        if database is None:
            async with self._lock:
                database = self._databases.get(name)
                if database is None:
                    database = Database.create(
                        placement.settings_of(name), pool_size=2, max_overflow=2
                    )
                    self._databases[name] = database
        return database

    async def audit_log(self) -> AuditLog:
        """The audit log, its table checked (or, where ``auto_migrate`` says so, created)."""
        if self._audit is None:
            database = await self._journal()
            try:
                await ensure_schema(database)
            except ConfigurationError:
                raise ActionError(
                    503,
                    "the console's audit table is missing or outdated in the journal's "
                    "database: run `lagompy migrate` on it",
                ) from None
            self._audit = AuditLog(database, self.service.name)
        return self._audit

    def serializer(self) -> Serializer:
        if self._serializer is None:
            from lagompy.journal import serializer_for

            self._serializer = serializer_for(self.service.entity_classes)
        return self._serializer

    # ------------------------------------------------------------------ read sides

    def projections(self) -> list[Projections]:
        """The :class:`~lagompy.readside.Projections` of the service's read-side components
        that are running."""
        from lagompy.process import ProcessManagersComponent
        from lagompy.readside import ReadSideComponent
        from lagompy.topic import SubscribersComponent, TopicsComponent

        found = []
        for component in self.service.components:
            if isinstance(component, ReadSideComponent) and component._running is not None:
                found.append(component._running.projections)
            # Topic subscribers and broker producers keep their rows in the same kind of
            # offset table: the same status and operations apply (see the Topics page).
            elif isinstance(component, SubscribersComponent) and component._running is not None:
                found.append(component._running.projections)
            elif isinstance(component, TopicsComponent) and component.producers is not None:
                producing = component.producers.projections()
                if producing is not None:
                    found.append(producing)
            elif isinstance(component, ProcessManagersComponent) and component._running is not None:
                # Process managers' rows too (``process:<name>``), with their operations.
                found.append(component._running.projections)
        return found

    def topics(self) -> list[dict[str, Any]]:
        """The topics this service publishes (name, partitions, message type and version, the
        transport carrying them, messages its producers published) and the subscriber groups
        it runs."""
        from lagompy.topic import SubscribersComponent, TopicsComponent

        found: list[dict[str, Any]] = []
        for component in self.service.components:
            if isinstance(component, TopicsComponent):
                producers = component.producers
                kind = "embedded" if producers is None else producers.transport.kind
                for t in component.topics:
                    found.append(
                        {
                            "role": "published",
                            "topic": t.name,
                            "partitions": t.partitions,
                            "type": t.type_name,
                            "version": t.version,
                            "transport": kind,
                            "published": None if producers is None else producers.published(t.name),
                        }
                    )
            elif isinstance(component, SubscribersComponent):
                kind = "embedded" if component.transport is None else component.transport.kind
                for sub in component.subscribers:
                    cls = sub if isinstance(sub, type) else type(sub)
                    t = cls.topic
                    found.append(
                        {
                            "role": f"subscribed (group {cls.group})",
                            "topic": t.name,
                            "partitions": t.partitions,
                            "type": t.type_name,
                            "version": t.version,
                            "transport": kind,
                            "published": None,
                        }
                    )
        return found

    async def readsides(
        self, processor: str | None = None, *, lag: bool = True
    ) -> list[WorkerStatus]:
        """The status of every (processor, tag) (of ``processor``: 404 if unknown). Without
        ``lag`` the journal is not consulted (``head_offset`` and the lags are None): the
        status costs one query instead of one per tag."""
        statuses: list[WorkerStatus] = []
        for projections in self.projections():
            if not lag:
                projections = Projections(projections.projection, settings=projections.settings)
            try:
                statuses += await projections.status(processor)
            except ConfigurationError:
                continue  # not this read side's processor
        if processor is not None and not statuses:
            raise ActionError(404, f"no read-side processor {processor!r} in this service")
        return statuses

    async def failed(self, which: FailedFilter = FailedFilter()) -> list[WorkerStatus]:
        """The (processor, tag) stopped at an event (state ``failed``) that ``which``
        matches."""
        return filter_failed(await self.readsides(lag=False), which)

    async def _projections_of(self, processor: str, tag: str | None) -> Projections:
        for projections in self.projections():
            try:
                statuses = await projections.status(processor)
            except ConfigurationError:
                continue
            if tag is not None and tag not in {s.tag for s in statuses}:
                raise ActionError(404, f"read-side processor {processor!r} has no tag {tag!r}")
            return projections
        if not self.projections():
            raise ActionError(503, "this service runs no read side (or it is not running)")
        raise ActionError(404, f"no read-side processor {processor!r} in this service")

    async def pause(self, processor: str, tag: str | None) -> str:
        count = await (await self._projections_of(processor, tag)).pause(processor, tag)
        return f"paused {count} tag(s)"

    async def resume(self, processor: str, tag: str | None) -> str:
        count = await (await self._projections_of(processor, tag)).resume(processor, tag)
        return f"resumed {count} tag(s)"

    async def skip(self, processor: str, tag: str | None) -> str:
        count = await (await self._projections_of(processor, tag)).skip(processor, tag)
        return f"skipped the failing event of {count} tag(s)"

    async def set_offset(self, processor: str, tag: str, offset: int, force: bool) -> str:
        projections = await self._projections_of(processor, tag)
        await projections.set_offset(processor, tag, offset, force=force)
        return f"set the offset of tag {tag!r} to {offset}"

    async def retry_failed(self, which: FailedFilter) -> str:
        """Resume every failed (processor, tag) matching the filter: each retries its event."""
        matching = await self.failed(which)
        if not matching:
            raise ActionError(409, "no failed read-side tag matches the filter")
        for s in matching:
            await self.resume(s.processor, s.tag)
        return f"retried {len(matching)} failed tag(s)"

    async def skip_failed(self, which: FailedFilter) -> str:
        """Skip the failing event of every failed (processor, tag) matching the filter."""
        matching = await self.failed(which)
        if not matching:
            raise ActionError(409, "no failed read-side tag matches the filter")
        for s in matching:
            await self.skip(s.processor, s.tag)
        return f"skipped the failing event of {len(matching)} tag(s)"

    # ------------------------------------------------------------------ parked events

    def parked_sources(self) -> list[Projections]:
        """One :class:`~lagompy.readside.Projections` per database that may hold parked
        events (read sides and subscriber groups may share one: it is asked once)."""
        found: dict[str, Projections] = {}
        for projections in self.projections():
            settings = projections.projection.settings
            found.setdefault(f"{settings.url} {settings.postgres_schema}", projections)
        return list(found.values())

    async def parked(
        self, which: ParkedFilter, *, limit: int = PARKED_PAGE, after_id: int = 0
    ) -> tuple[list[ParkedEvent], int]:
        """The parked events ``which`` matches (``limit`` after ``after_id``, by id within
        each database) and how many match in all."""
        rows: list[ParkedEvent] = []
        total = 0
        for projections in self.parked_sources():
            rows += await projections.parked(which, limit=limit, after_id=after_id)
            total += await projections.count_parked(which)
        return rows[:limit], total

    async def parked_facets(self) -> tuple[list[str], list[str]]:
        """The consumers and error classes that have parked events (the filter's choices)."""
        consumers: set[str] = set()
        classes: set[str] = set()
        for projections in self.parked_sources():
            c, e = await projections.parked_store.facets()
            consumers.update(c)
            classes.update(e)
        return sorted(consumers), sorted(classes)

    async def _on_parked(self, operation: str, which: ParkedFilter) -> int:
        sources = self.parked_sources()
        if not sources:
            raise ActionError(503, "this service runs no read side nor subscriber group")
        count = 0
        for projections in sources:
            try:
                count += await getattr(projections, operation)(which)
            except ConfigurationError:
                continue  # none of them in this database
        if not count:
            raise ActionError(409, f"no parked event matches ({which.describe()})")
        return count

    async def retry_parked(self, which: ParkedFilter) -> str:
        """Ask for a retry of the parked events ``which`` matches: each one's worker runs its
        handler again (out of order) and deletes it in the same transaction."""
        count = await self._on_parked("retry_parked", which)
        return f"asked for a retry of {count} parked event(s)"

    async def discard_parked(self, which: ParkedFilter) -> str:
        """Delete the parked events ``which`` matches."""
        count = await self._on_parked("discard_parked", which)
        return f"discarded {count} parked event(s)"

    async def rebuild(self, processor: str, actor: str) -> str:
        """Start rebuilding ``processor`` (``Projections.rebuild``) in the background; its
        progress is in :attr:`rebuilds`, its end in the audit log."""
        from lagompy.readside import ReadSideComponent

        for component in self.service.components:
            if not isinstance(component, ReadSideComponent) or component._running is None:
                continue
            for cls in component.processors:
                if cls.name == processor:
                    return self._start_rebuild(cls, component._running.projections, actor)
        raise ActionError(404, f"no read-side processor {processor!r} runs in this service")

    def _start_rebuild(self, cls: type[Any], projections: Projections, actor: str) -> str:
        name = cls.name
        if not cls.can_reset():
            raise ActionError(
                409, f"read-side processor {name!r} defines no reset(conn): it cannot be rebuilt"
            )
        if projections.journal is None:
            raise ActionError(503, "the read side runs without its journal: it cannot rebuild")
        current = self.rebuilds.get(name)
        if current is not None and current.state == "running":
            raise ActionError(409, f"a rebuild of {name!r} is already running")
        self.rebuilds[name] = RebuildProgress(name, datetime.now(UTC).isoformat())
        task = asyncio.create_task(self._run_rebuild(cls, projections, actor))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return "rebuild started"

    async def _run_rebuild(self, cls: type[Any], projections: Projections, actor: str) -> None:
        from lagompy.journal._storage import open_placed_storage
        from lagompy.readside._processor import serializer_for_processors

        name = cls.name
        instance = cls()

        def progress(done: int, total: int) -> None:
            self.rebuilds[name] = replace(self.rebuilds[name], done=done, total=total)

        settings = projections.journal_settings
        assert settings is not None
        try:
            # Every database of the journal (one, unless it is placed on several).
            async with await open_placed_storage(
                settings=settings, serializer=serializer_for_processors([instance])
            ) as storage:
                count = await projections.rebuild(instance, journal=storage, progress=progress)
        except Exception as e:
            log.exception("console: the rebuild of %r failed", name)
            detail = f"{type(e).__name__} (see the service's log)"
            end: dict[str, Any] = {"state": "failed", "detail": detail}
            result = "failed"
        else:
            detail = f"replayed {count} events"
            end = {"state": "done", "done": count, "detail": detail}
            result = "ok"
        try:
            audit = await self.audit_log()
            async with self.audit_order:  # after the audit row of the rebuild's start
                await audit.record(
                    actor=actor,
                    action="rebuild-finished",
                    target=f"read side {name}",
                    result=result,
                    detail=detail,
                )
        except Exception:
            log.exception("console: could not audit the end of the rebuild of %r", name)
        finally:
            # The end shows once it is all over (its audit row written): a page that sees
            # `done` finds the row in the audit log too.
            self.rebuilds[name] = replace(self.rebuilds[name], **end)

    # ------------------------------------------------------------------ overview

    async def overview(self) -> dict[str, Any]:
        service = self.service
        checks = await service.readiness()
        hosts: list[dict[str, Any]] = []
        hosts_error = None
        runtime = service._runtime
        if runtime is not None:
            try:
                hosts = await asyncio.wait_for(
                    runtime.host_stats(require_journal=False), service.settings.ready_timeout
                )
            except Exception as e:  # the page still answers
                log.warning("console: could not read the shard hosts' stats: %s", e)
                hosts_error = f"the hosts' stats are not available ({type(e).__name__})"
            topology = getattr(runtime, "topology", None)
            for host in hosts:
                index = host.get("index")
                if topology is not None and isinstance(index, int):
                    host["shards"] = len(range(index, topology.shards, topology.hosts))
                host["commands_per_s"] = self._rate(host)
        breakers = service.breakers.status()
        readsides = await self.readsides(lag=False)
        failures = sorted(
            (s for s in readsides if s.failure is not None),
            key=lambda s: s.failure.at.isoformat() if s.failure and s.failure.at else "",
            reverse=True,
        )[:RECENT_FAILURES]
        return {
            "service": service.name,
            "checks": checks,
            "hosts": [_host(h) for h in sorted(hosts, key=lambda h: int(h.get("index") or 0))],
            "hosts_error": hosts_error,
            "entity_types": [cls.type_name for cls in service.entity_classes],
            "breakers": {
                "total": len(breakers),
                "open": sum(1 for b in breakers if b["state"] != "closed"),
                "not_closed": [b["id"] for b in breakers if b["state"] != "closed"],
            },
            "readsides": {
                "tags": len(readsides),
                "failed": sum(1 for s in readsides if s.state == "failed"),
                "paused": sum(1 for s in readsides if s.state == "paused"),
                "parked": sum(s.parked for s in readsides),
            },
            "recent_failures": [s.to_dict() for s in failures],
        }

    def _rate(self, host: dict[str, Any]) -> float | None:
        """Commands per second of a host since the console last read its stats (None the
        first time, or after the host restarted)."""
        key, commands, now = (
            (host.get("index"), host.get("pid")),
            host.get("commands"),
            time.monotonic(),
        )
        if not isinstance(commands, int | float):
            return None
        before = self._host_samples.get(key)
        if before is not None and now - before[0] < MIN_RATE_INTERVAL:
            return before[2]  # too close to the last reading: its rate again
        rate = None
        if before is not None and commands >= before[1]:
            rate = round((commands - before[1]) / (now - before[0]), 1)
        self._host_samples[key] = (now, commands, rate)
        return rate

    def breakers(self) -> list[dict[str, Any]]:
        return self.service.breakers.status()

    # ------------------------------------------------------------------ entities

    def entity_types(self) -> list[str]:
        return [cls.type_name for cls in self.service.entity_classes]

    async def entity(self, entity_type: str, entity_id: str, from_seq_nr: int) -> dict[str, Any]:
        """An entity's events from ``from_seq_nr`` (one page) and its latest snapshot."""
        known = self.entity_types()
        if entity_type not in known:
            raise ActionError(
                404,
                f"no entity type {entity_type!r} in this service (known: "
                f"{', '.join(known) or 'none'})",
            )
        try:
            check_entity_id(entity_id)
        except LagompyError as e:
            raise ActionError(400, str(e)) from None
        if from_seq_nr < 1:
            raise ActionError(400, "from_seq_nr must be 1 or more")
        database = await self._journal(entity_id)
        t = schema.events
        size = self.settings.page_size
        stmt = (
            select(
                t.c.seq_nr,
                t.c.global_offset,
                t.c.written_at_us,
                t.c.event_type,
                t.c.event_version,
                t.c.payload,
            )
            .where(t.c.entity_type == entity_type, t.c.entity_id == entity_id)
            .where(t.c.seq_nr >= from_seq_nr)
            .order_by(t.c.seq_nr)
            .limit(size + 1)
        )
        s = schema.snapshots
        snap_stmt = (
            select(s.c.seq_nr, s.c.written_at_us, s.c.state_type, s.c.state_version, s.c.payload)
            .where(s.c.entity_type == entity_type, s.c.entity_id == entity_id)
            .order_by(s.c.seq_nr.desc())
            .limit(1)
        )
        r = schema.command_replies
        replies_stmt = (
            select(r.c.command_id, r.c.seq_nr, r.c.payload)
            .where(r.c.entity_type == entity_type, r.c.entity_id == entity_id)
            .order_by(r.c.seq_nr.desc())
            .limit(RECENT_COMMANDS)
        )
        async with database.read() as conn:
            rows = (await conn.execute(stmt)).all()
            snap = (await conn.execute(snap_stmt)).first()
            replies = (await conn.execute(replies_stmt)).all()
            highest = None
            if rows or snap is not None:
                highest = (
                    await conn.execute(
                        select(t.c.seq_nr)
                        .where(t.c.entity_type == entity_type, t.c.entity_id == entity_id)
                        .order_by(t.c.seq_nr.desc())
                        .limit(1)
                    )
                ).scalar()
        if not rows and snap is None and from_seq_nr == 1:
            raise ActionError(404, f"entity {entity_type}/{entity_id} has no events")
        masked = not self.settings.show_payloads
        events = [
            {
                "seq_nr": int(seq_nr),
                "offset": int(offset),
                "time": from_us(int(at)).isoformat(),
                "type": type_name,
                "version": int(version),
                "payload": self._decode(type_name, version, payload, masked),
            }
            for seq_nr, offset, at, type_name, version, payload in rows[:size]
        ]
        snapshot = None
        if snap is not None:
            seq_nr, at, type_name, version, payload = snap
            snapshot = {
                "seq_nr": int(seq_nr),
                "time": from_us(int(at)).isoformat(),
                "type": type_name,
                "version": int(version),
                "state": self._decode(type_name, version, payload, masked),
            }
        return {
            "entity_type": entity_type,
            "entity_id": entity_id,
            "state": await self._current_state(entity_type, entity_id, masked),
            "highest_seq_nr": None if highest is None else int(highest),
            "from_seq_nr": from_seq_nr,
            "next_seq_nr": events[-1]["seq_nr"] + 1 if len(rows) > size else None,
            "masked": masked,
            "events": events,
            "commands": [
                {
                    "command_id": command_id,
                    "seq_nr": int(seq_nr),
                    "reply": _plain_reply(payload, masked),
                }
                for command_id, seq_nr, payload in replies
            ],
            "snapshot": snapshot,
        }

    async def _current_state(self, entity_type: str, entity_id: str, masked: bool) -> Any:
        """The entity's state now, recovered from its snapshot and later events exactly as a
        shard host recovers it; what went wrong instead, when it cannot be."""
        from lagompy.journal import Journal, SnapshotStore
        from lagompy.runtime._processing import recover

        (cls,) = [c for c in self.service.entity_classes if c.type_name == entity_type]
        database = await self._journal(entity_id)
        serializer = self.serializer()
        try:
            live = await recover(
                cls, entity_id, Journal(database, serializer), SnapshotStore(database, serializer)
            )
        except LagompyError as e:
            return {"cannot recover": type(e).__name__}
        return jsonable(live.state, masked=masked)

    def _decode(self, type_name: str, version: int, payload: bytes, masked: bool) -> Any:
        try:
            value = self.serializer().decode(type_name, version, payload)
        except LagompyError as e:
            return {"cannot decode": type(e).__name__}
        return jsonable(value, masked=masked)

    # ------------------------------------------------------------------ audit

    async def audit(self, limit: int = 200) -> list[AuditEntry]:
        return await (await self.audit_log()).recent(limit)


def _plain_reply(payload: bytes, masked: bool) -> Any:
    """A stored reply as plain data: its bytes are msgpack (see ``Serializer.encode_value``),
    read here without the reply's type (the row does not name the command)."""
    try:
        value = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:  # any malformed payload: the page still answers
        return {"cannot decode": type(e).__name__}
    return jsonable(value, masked=masked)


#: The host figures the console shows, in order.
HOST_FIELDS = (
    "index",
    "pid",
    "shards",
    "live_entities",
    "commands",
    "commands_per_s",
    "events_persisted",
    "activations",
    "new_entities",
    "new_refused",
    "passivations",
    "conflicts",
    "failed_writes",
)


def _host(stats: Mapping[str, Any]) -> dict[str, Any]:
    host = {name: stats.get(name) for name in HOST_FIELDS}
    if host["index"] is None:
        host["index"] = "local"
    journal = stats.get("journal")
    if isinstance(journal, str):
        host["journal"] = journal
    return host
