"""Run commands against live entities: decide, apply, group-commit, reply.

This is the heart of a shard: the Ray shard host and the in-process runtime both drive an
:class:`EntityProcessor`. A batch of commands for many entities is processed like this:

1. activate: the entities named in the batch that are not in memory are presumed new (see
   below), or recovered (latest snapshot plus the events after it), all together: a bounded
   number of queries per entity class in one read transaction (:func:`recover_many`), not a
   few queries each;
2. decide: per entity, in arrival order, each command goes through ``on_command`` and its
   events through ``on_event``, on a tentative state;
3. commit: the events of all entities are appended in **one** journal transaction;
4. release: only then are replies released and ``then_run`` side effects run; an entity whose
   write failed is dropped from memory (it reloads from the journal next time) and its
   commands that depended on the write get the error.

``EntityProcessor._run`` is these four steps, one method each.

Entities presumed new (``presume_new``, on by default): a command to an entity that is not in
memory is most often a command to an entity that does not exist yet (every workflow run, every
registration). Such an entity is not read first: its commands are decided on
``initial_state`` at sequence number 0, and only the journal's answer makes the decision
count. Its write expects sequence number 0, which the journal refuses
(``ConcurrencyConflict``, for that write alone) when the entity has any event or deletion; then
nothing of it was written, no reply of the decision is released, and the entity is recovered
and its commands decided again, in order, in the same batch (the refusal is not an error for
the caller and is no retry of ``conflict_retries``). So is an entity whose write the journal
refused for any other reason (events it cannot encode, data the database refuses): they were
decided on a state the entity may not have. When its commands persist nothing (read
only, rejected, unhandled), no write can confirm that the entity is new, so it is recovered
before its commands are decided again; so is an entity this processor dropped from memory
itself (it is known to exist). Measured with ``bench/cold_batch_probe.py`` (batches of 64 asks
with checked command ids, each to a new entity, no Ray, 2026-12-06): SQLite 3.8-4.9 ms a batch
before, 1.9-2.5 after; PostgreSQL 7.4-9.3 before, 1.8-2.5 after (the stored-reply lookup and
the recovery read are gone). The price, for an existing entity the processor does not hold
(after a restart): one refused write more, ~2 ms per batch of 64 on SQLite, within the noise
on PostgreSQL (docs/benchmarks.md, "Entities presumed new").

Safe retries: a request may carry a ``command_id``. The encoded reply of a command that
persisted events is written with those events (same transaction) under ``(entity, command id)``.
A request with ``check_duplicate`` whose id is already stored is answered with the stored reply
and not run again; the same id twice in one batch runs once and both get its result. Rejected
and read-only commands store nothing, so they simply run again. The id is looked up before
deciding only for an entity that is recovered in the batch. For an entity in memory (the usual
case) the command is decided at once, and what follows confirms it was new: a command that
persists events writes its reply under its id, which the journal refuses
(``DuplicateCommandId``, that entity's write alone) when the id is stored already; the entity
is then recovered and its commands run again after a lookup, which answers the duplicate with
its stored reply. A command that persists nothing is looked up after the commit (one query for
the batch), and answered with the stored reply if it has one: it changed no state, so the
decisions after it stand. Until then, the entity's rejections wait for its write like its
replies. Measured with ``bench/cold_batch_probe.py`` (batches of 64 asks with checked command
ids to entities in memory, no Ray, 2026-12-06, one run before and one after): SQLite 3.9 ms a
batch before, 2.7 after; PostgreSQL 3.5 and 3.3, within the noise between those two runs (in
them, batches to entities never written, which look nothing up either way, took 2.4 and 3.4).

Passivation: live entities are kept in least-recently-used order. After each batch the least
recently used beyond ``max_entities`` are dropped from memory, and :meth:`passivate_idle` drops
those unused for ``idle_timeout`` seconds. Entities used by a batch in progress are never
dropped; a dropped entity is recovered from the journal by its next command.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from lagompy.entity import (
    Effect,
    PersistentEntity,
    reply_type_of,
    unhandled_command,
    union_members,
)
from lagompy.errors import (
    CommandHandlerFailed,
    CommandRejected,
    ConcurrencyConflict,
    ConfigurationError,
    EncodeError,
    EventHandlerFailed,
    EventsMissing,
    HandlerFailed,
    InvalidEntityId,
    LagompyError,
    RefusedValue,
    SerializationError,
    UnhandledCommand,
    UnhandledEvent,
)
from lagompy.journal._journal import (
    MAX_ID_LENGTH,
    AtomicWrite,
    EventEnvelope,
    Journal,
    check_command_id,
    check_entity_id,
)
from lagompy.journal._model import atomic_write
from lagompy.journal._snapshots import Snapshot, SnapshotStore, SnapshotToSave
from lagompy.runtime._loading import EntityClass

log = logging.getLogger("lagompy.processing")


#: The stored reply ``None`` (msgpack nil), whatever the command's declared reply type: a
#: command that persists events without ``then_reply`` replies ``None``.
_NONE_REPLY = b"\xc0"


# --------------------------------------------------------------------------- pure steps


def apply_event(entity: PersistentEntity[Any, Any, Any], state: Any, event: Any) -> Any:
    """Fold one event into the state; handler errors become ``EventHandlerFailed``."""
    try:
        new_state = entity.on_event(state, event)
    except HandlerFailed:
        raise
    except Exception as e:
        raise EventHandlerFailed(
            f"{type(entity).__qualname__}.on_event raised {type(e).__name__}: {e} "
            f"(state {type(state).__qualname__}, event {type(event).__qualname__}, "
            f"entity {entity.entity_id!r})"
        ) from e
    if new_state is None:
        raise UnhandledEvent(
            f"{type(entity).__qualname__}.on_event does not handle event "
            f"{type(event).__qualname__} in state {type(state).__qualname__} "
            f"(entity {entity.entity_id!r}): it returned None"
        )
    return new_state


@dataclass(slots=True)
class Decision:
    """The outcome of one command on a tentative state (nothing is durable yet)."""

    events: tuple[Any, ...] = ()
    state_after: Any = None
    reply: Any = None
    side_effects: tuple[Callable[[Any], Any], ...] = ()
    error: LagompyError | None = None


def decide(entity: PersistentEntity[Any, Any, Any], state: Any, command: Any) -> Decision:
    """Run the command handler and the event handler for its events. Never raises for
    handler errors: they come back in ``Decision.error``."""
    try:
        effect = entity.on_command(state, command)
    except CommandRejected as rejection:
        return Decision(state_after=state, error=rejection)
    except Exception as e:
        return Decision(
            state_after=state,
            error=_handler_bug(entity, state, command, f"raised {type(e).__name__}: {e}", e),
        )
    if not isinstance(effect, Effect):
        return Decision(
            state_after=state,
            error=_handler_bug(
                entity, state, command, f"returned {type(effect).__qualname__}, not an Effect"
            ),
        )
    if effect.is_unhandled:
        return Decision(state_after=state, error=unhandled_command(entity, state, command))
    if effect.rejection is not None:
        return Decision(state_after=state, error=effect.rejection)
    new_state = state
    try:
        for event in effect.events:
            new_state = apply_event(entity, new_state, event)
    except EventHandlerFailed as e:
        return Decision(state_after=state, error=e)
    try:
        reply = effect.reply_fn(new_state) if effect.reply_fn is not None else effect.reply_value
    except CommandRejected as rejection:
        return Decision(state_after=state, error=rejection)
    except Exception as e:
        return Decision(
            state_after=state,
            error=_handler_bug(entity, state, command, f"reply raised {type(e).__name__}: {e}", e),
        )
    return Decision(
        events=effect.events,
        state_after=new_state,
        reply=reply,
        side_effects=effect.side_effects,
    )


def _handler_bug(
    entity: PersistentEntity[Any, Any, Any],
    state: Any,
    command: Any,
    what: str,
    cause: BaseException | None = None,
) -> CommandHandlerFailed:
    err = CommandHandlerFailed(
        f"{type(entity).__qualname__}.on_command {what} (command {type(command).__qualname__}, "
        f"state {type(state).__qualname__}, entity {entity.entity_id!r})"
    )
    err.__cause__ = cause
    return err


# --------------------------------------------------------------------------- live entities


@dataclass
class LiveEntity:
    """An entity in memory: its handler object, state and highest sequence number."""

    entity: PersistentEntity[Any, Any, Any]
    state: Any
    seq_nr: int
    #: the sequence number of the snapshot the entity was recovered from (0: none)
    snapshot_seq_nr: int = 0
    recovered_from_snapshot: bool = False
    #: ``time.monotonic()`` of the last batch that used the entity
    last_used: float = 0.0


async def recover(
    entity_cls: EntityClass, entity_id: str, journal: Journal, snapshots: SnapshotStore
) -> LiveEntity:
    """Rebuild an entity from its latest snapshot and the events after it.

    A snapshot that cannot be read is skipped with a warning: the events are replayed from the
    start instead (they are the source of truth). When the events after the snapshot (or from
    the start) do not follow on from it because some were deleted, ``EventsMissing`` is raised:
    the state would be wrong. An entity whose every event was deleted (and no snapshot kept)
    was forgotten: it starts again from its initial state at the highest sequence number it
    had then (:meth:`Journal.restarted_at <lagompy.journal.Journal.restarted_at>`), and
    replays the events it wrote since.

    The snapshot, the events and the deletions are read in one read transaction (the
    journal's reads join it: ``Database.read``).
    """
    async with journal.database.read():
        return await _recover(entity_cls, entity_id, journal, snapshots)


async def _recover(
    entity_cls: EntityClass, entity_id: str, journal: Journal, snapshots: SnapshotStore
) -> LiveEntity:
    loaded: Snapshot | SerializationError | None = None
    if entity_cls.snapshot_every:
        try:
            loaded = await snapshots.load(entity_cls.type_name, entity_id)
        except SerializationError as e:
            loaded = e
    rebuilt = _Rebuild(entity_cls, entity_id, loaded)
    events = await journal.replay(entity_cls.type_name, entity_id, from_seq_nr=rebuilt.seq_nr + 1)
    if events and events[0].seq_nr == rebuilt.seq_nr + 1:
        # The usual case: the events follow on from the snapshot (or the start), and the
        # deletions need not be read.
        rebuilt.replay(events)
        return rebuilt.live()
    # Nothing to replay, or a gap: what the journal recorded of deletions says whether the
    # entity was forgotten (and started again) or lost events. Read after the events: a write
    # that another writer (a zombie copy of this host) commits meanwhile never changes it, where
    # the entity's highest sequence number, read now, would count such events as deleted ones.
    # Such events are not in this state: the entity's next write expects ``seq_nr``, meets a
    # ConcurrencyConflict, and the entity reloads.
    deleted_to, restarted_at = await journal.deletions(entity_cls.type_name, entity_id)
    return rebuilt.rebuild(events, deleted_to, restarted_at)


async def recover_many(
    entity_cls: EntityClass, entity_ids: Sequence[str], journal: Journal, snapshots: SnapshotStore
) -> dict[str, LiveEntity | Exception]:
    """:func:`recover` for many entities of one class at once, with a bounded number of
    queries: one for their snapshots, one for their highest sequence numbers and deletions,
    then as few as hold their events (:meth:`Journal.replay_many`), in one read transaction
    (or the caller's). Each entity gets its live entity or the error its recovery raised, the
    same as :func:`recover` would give it alone: one entity's unreadable snapshot, missing
    events or failing event handler is its own."""
    type_name = entity_cls.type_name
    ids = list(dict.fromkeys(entity_ids))
    out: dict[str, LiveEntity | Exception] = {}
    async with journal.database.read():
        loaded: Mapping[str, Snapshot | SerializationError] = (
            await snapshots.load_many(type_name, ids) if entity_cls.snapshot_every else {}
        )
        rebuilds = {i: _Rebuild(entity_cls, i, loaded.get(i)) for i in ids}
        replayed = await journal.replay_many(
            type_name, {i: r.seq_nr + 1 for i, r in rebuilds.items()}
        )
    for entity_id, rebuilt in rebuilds.items():
        read = replayed[entity_id]
        try:
            if read.error is not None:
                raise read.error
            out[entity_id] = rebuilt.rebuild(read.events, read.deleted_to, read.restarted_at)
        except Exception as e:
            out[entity_id] = e
    return out


class _Rebuild:
    """One entity's recovery, from what was read of it: its snapshot (``loaded``: the
    snapshot, the error its state raised when decoded, or None), its later events and its
    deletions. The one fold behind :func:`recover` and :func:`recover_many`."""

    __slots__ = ("cls", "covered", "entity", "from_snapshot", "id", "replayed", "seq_nr", "state")

    def __init__(
        self, cls: EntityClass, entity_id: str, loaded: Snapshot | SerializationError | None
    ) -> None:
        self.cls = cls
        self.id = entity_id
        self.entity = cls(entity_id)
        self.state: Any = cls.initial_state
        self.seq_nr = 0
        self.from_snapshot = False
        self.replayed = False
        if isinstance(loaded, SerializationError):
            log.warning(
                "snapshot of %s/%s cannot be read (%s); replaying all events instead",
                cls.type_name,
                entity_id,
                loaded,
            )
        elif loaded is not None:
            self.state, self.seq_nr, self.from_snapshot = loaded.state, loaded.seq_nr, True
        #: the snapshot's sequence number when it was read, else None
        self.covered: int | None = self.seq_nr if self.from_snapshot else None

    def rebuild(
        self, envelopes: Sequence[EventEnvelope[Any]], deleted_to: int, restarted_at: int
    ) -> LiveEntity:
        """The entity, from the events that follow its snapshot (or start) and what the
        journal recorded of its deletions (:meth:`Journal.deletions
        <lagompy.journal.Journal.deletions>`); ``EventsMissing`` if events it needs were
        deleted."""
        self.restart(restarted_at)
        self.replay(envelopes)
        return self.live() if self.replayed else self.after_deletions(deleted_to)

    def restart(self, restarted_at: int) -> None:
        """A deletion left the entity no event at ``restarted_at``: it was forgotten there.
        Recovered from no snapshot, it starts again from its initial state at that number, and
        the events after it follow on from there. A snapshot at or beyond it is used as ever;
        one below it does not reach the deleted events (``EventsMissing``, as when events are
        deleted beyond a snapshot without forgetting the entity: delete its snapshots too)."""
        if restarted_at > self.seq_nr:
            if self.from_snapshot:
                raise _events_missing(self.cls, self.id, self.seq_nr, restarted_at, self.covered)
            self.state, self.seq_nr = self.cls.initial_state, restarted_at

    def replay(self, envelopes: Sequence[EventEnvelope[Any]]) -> None:
        """Fold the events that follow the snapshot (or the start, or the restart);
        ``EventsMissing`` on a gap: events were deleted (before this replay, or between two of
        its pages)."""
        cls, entity = self.cls, self.entity
        start = seq_nr = self.seq_nr
        state = self.state
        for envelope in envelopes:
            if envelope.seq_nr <= seq_nr:
                # Below a restart: only read when the entity was forgotten between the read
                # of its events and that of its deletions (single recovery reads them apart).
                continue
            if envelope.seq_nr != seq_nr + 1:
                raise _events_missing(cls, self.id, seq_nr, envelope.seq_nr - 1, self.covered)
            state = apply_event(entity, state, envelope.event)
            seq_nr = envelope.seq_nr
        self.state, self.seq_nr = state, seq_nr
        self.replayed = seq_nr > start

    def after_deletions(self, deleted: int) -> LiveEntity:
        """The entity when nothing followed its snapshot (or start), given the highest
        sequence number ever deleted: an entity whose every event was deleted starts again
        after them; one whose snapshot does not reach them cannot be recovered."""
        snapshot_seq = self.seq_nr
        if deleted > snapshot_seq:
            if self.from_snapshot:
                raise _events_missing(self.cls, self.id, snapshot_seq, deleted, self.covered)
            self.seq_nr = deleted
        return self.live()

    def live(self) -> LiveEntity:
        return LiveEntity(
            self.entity, self.state, self.seq_nr, self.covered or 0, self.from_snapshot
        )


def _events_missing(
    entity_cls: EntityClass, entity_id: str, after: int, upto: int, snapshot_seq: int | None
) -> EventsMissing:
    covered = (
        "no readable snapshot covers them"
        if snapshot_seq is None
        else f"its snapshot covers only up to {snapshot_seq}"
    )
    return EventsMissing(
        f"{entity_cls.type_name}/{entity_id} cannot be recovered: its events "
        f"{after + 1}..{upto} were deleted and {covered} (save a snapshot before deleting events)"
    )


# --------------------------------------------------------------------------- batches


class Request(NamedTuple):
    """One command for one entity.

    ``command_id`` identifies the command for safe retries: when the command persists events,
    its reply is stored with them under ``(entity, command_id)``. With ``check_duplicate``, a
    command whose id is known is answered with the stored reply instead of running again (looked
    up first, or confirmed by the write: see the module's docstring, "Safe retries").

    A named tuple rather than a dataclass: one is made per ask, and batches of them cross
    processes as plain tuples (``tuple(request)`` / ``Request._make``), which pickle in about a
    third of a dataclass's time.
    """

    entity_type: str
    entity_id: str
    command: Any
    command_id: str | None = None
    check_duplicate: bool = False
    #: Answer with a :class:`Receipt` (the reply and whether the command is applied) rather
    #: than the bare reply: whether asking again with this command id returns this reply.
    receipt: bool = False


class Receipt(NamedTuple):
    """The reply to a request that asked for a receipt. ``committed``: the command's events
    are committed (now or before) and its reply stored under its command id, so asking again
    with that id returns this very reply; False for a read-only command (it would run again)."""

    reply: Any
    committed: bool


@dataclass(slots=True)
class Result:
    """The reply to one request, or the error that answers it. ``events`` are the events the
    command committed in this batch; ``stored`` is set when the reply is the one stored when
    the command was applied before (a retry with its command id)."""

    reply: Any = None
    error: BaseException | None = None
    events: tuple[Any, ...] = ()
    stored: bool = False

    @property
    def committed(self) -> bool:
        """Whether the command is applied: its events committed, in this batch or before."""
        return self.error is None and (bool(self.events) or self.stored)

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.reply


@dataclass(slots=True)
class _Pending:
    index: int
    decision: Decision


@dataclass(slots=True)
class _EntityBatch:
    live: LiveEntity
    pending: list[_Pending] = field(default_factory=list)


class _Decided(NamedTuple):
    """What the decide step leaves for commit and release: the writes of the entities whose
    commands persist events, in one order (``writes[n]`` is the write of ``write_keys[n]``),
    and each such entity's pending commands."""

    batches: dict[tuple[str, str], _EntityBatch]
    writes: list[AtomicWrite]
    write_keys: list[tuple[str, str]]
    #: entities presumed new whose commands persist nothing: to recover and decide again
    unconfirmed: list[tuple[str, str]]

    def extend(self, other: _Decided) -> None:
        """Add the writes of other entities, decided apart."""
        self.batches.update(other.batches)
        self.writes.extend(other.writes)
        self.write_keys.extend(other.write_keys)


_MISSING: Any = object()

#: Entities dropped from memory that a processor remembers as existing (see
#: ``EntityProcessor._dropped``): about 200 bytes each.
MAX_DROPPED_KNOWN = 100_000

#: With ``defer_snapshots``, a batch that leaves this many snapshots due saves them itself
#: (a host whose saver never gets a turn keeps a bounded backlog).
MAX_DUE_SNAPSHOTS = 1_000


def _unstorable(command: Any, key: tuple[str, str], cause: SerializationError) -> EncodeError:
    where = f"the reply of {type(command).__qualname__} to {key[0]}/{key[1]}"
    error: EncodeError
    if isinstance(cause, RefusedValue):
        # The command's own data (a NUL character), not a reply of the wrong type.
        error = RefusedValue(
            f"{where} holds a value the journal refuses, so the command was not applied: {cause}"
        )
    else:
        error = EncodeError(
            f"{where} cannot be stored for safe retries (does it fit the reply type the command "
            f"declares?), so the command was not applied: {cause}"
        )
    error.__cause__ = cause
    return error


class EntityProcessor:
    """Keeps live entities in memory and processes batches of commands against them."""

    def __init__(
        self,
        entities: Iterable[EntityClass],
        journal: Journal,
        snapshots: SnapshotStore,
        *,
        max_concurrent_recoveries: int = 16,
        max_entities: int | None = None,
        idle_timeout: float | None = None,
        conflict_retries: int = 2,
        defer_snapshots: bool = False,
        presume_new: bool = True,
    ) -> None:
        if max_entities is not None and max_entities < 1:
            raise ConfigurationError(
                f"max_entities must be at least 1 (or None), got {max_entities}"
            )
        if idle_timeout is not None and not idle_timeout > 0:
            raise ConfigurationError(
                f"idle_timeout must be a positive number of seconds (or None), got {idle_timeout}"
            )
        if conflict_retries < 0:
            raise ConfigurationError(f"conflict_retries must be 0 or more, got {conflict_retries}")
        #: most entities kept in memory after a batch (None: no bound)
        self.max_entities = max_entities
        #: times the commands of an entity whose write met ConcurrencyConflict are run again,
        #: on the state reloaded from the journal, before the conflict is their answer
        self.conflict_retries = conflict_retries
        #: seconds without a command after which :meth:`passivate_idle` drops an entity
        self.idle_timeout = idle_timeout
        #: Decide the commands of an entity that is not in memory on its initial state, without
        #: reading the journal, when they persist events: the write, which expects sequence
        #: number 0, confirms the entity was new, or is refused and the entity is recovered
        #: and its commands decided again (see the module's docstring). Off: every such entity
        #: is recovered first.
        self.presume_new = presume_new
        self.entity_classes: dict[str, EntityClass] = {}
        for cls in entities:
            cls.validate()
            if cls.type_name in self.entity_classes:
                raise ConfigurationError(
                    f"two entity classes share type_name {cls.type_name!r}: "
                    f"{self.entity_classes[cls.type_name].__qualname__} and {cls.__qualname__}"
                )
            self.entity_classes[cls.type_name] = cls
        self._command_types = {
            name: tuple(t for t in union_members(cls.message_types()[0]) if isinstance(t, type))
            for name, cls in self.entity_classes.items()
        }
        self.journal = journal
        self.snapshots = snapshots
        #: live entities, least recently used first
        self.live: OrderedDict[tuple[str, str], LiveEntity] = OrderedDict()
        #: entities this processor dropped from memory, known to exist: their next command
        #: recovers them rather than presume them new (which would cost a refused write); the
        #: :data:`MAX_DROPPED_KNOWN` most recently dropped
        self._dropped: dict[tuple[str, str], None] = {}
        #: recoveries from the journal at once (a batch's cold entities are one recovery)
        self._recoveries = asyncio.Semaphore(max_concurrent_recoveries)
        #: the entities of each batch in progress (never passivated): one entry per batch, so
        #: starting and ending a batch costs nothing per entity
        self._in_use: list[Mapping[tuple[str, str], Any]] = []
        self._reply_types: dict[type, Any] = {}
        #: per entity class: whether it keeps the default ``tags_for`` (see ``_tags``)
        self._default_tags: dict[type, bool] = {}
        self._stats: Counter[str] = Counter()
        #: Keep the snapshots a batch makes due for :meth:`save_due_snapshots` instead of
        #: saving them before :meth:`process` returns (the shard host saves them after it
        #: replied: see ``ShardHost``).
        self.defer_snapshots = defer_snapshots
        self.due_snapshots: list[SnapshotToSave] = []

    def entity_class(self, entity_type: str) -> EntityClass:
        try:
            return self.entity_classes[entity_type]
        except KeyError:
            raise ConfigurationError(
                f"no entity with type_name {entity_type!r} is registered "
                f"(known: {sorted(self.entity_classes)})"
            ) from None

    def passivate_idle(self, now: float | None = None) -> int:
        """Drop the entities unused for more than ``idle_timeout`` seconds (``now`` defaults to
        ``time.monotonic()``); return how many. Entities a batch in progress uses stay. Without
        an ``idle_timeout`` nothing is dropped."""
        if self.idle_timeout is None:
            return 0
        deadline = (time.monotonic() if now is None else now) - self.idle_timeout
        idle: list[tuple[str, str]] = []
        for key, live in self.live.items():  # least recently used first
            if live.last_used > deadline:
                break
            if not self._used(key):
                idle.append(key)
        self._drop(idle)
        self._stats["passivations"] += len(idle)
        return len(idle)

    def _passivate_beyond_max(self) -> int:
        if self.max_entities is None or len(self.live) <= self.max_entities:
            return 0
        excess = len(self.live) - self.max_entities
        victims: list[tuple[str, str]] = []
        for key in self.live:  # least recently used first
            if len(victims) == excess:
                break
            if not self._used(key):
                victims.append(key)
        self._drop(victims)
        self._stats["passivations"] += len(victims)
        return len(victims)

    def _used(self, key: tuple[str, str]) -> bool:
        """Whether a batch in progress uses the entity."""
        return any(key in batch for batch in self._in_use)

    def stats(self) -> dict[str, int | float]:
        """This processor's counters since it was made:

        ``live_entities`` (in memory now), ``activations`` (recoveries from the journal),
        ``passivations`` (entities dropped from memory by ``max_entities`` or ``idle_timeout``),
        ``batches``, ``commands`` (requests received), ``events_persisted``, ``duplicates``
        (requests answered with a stored reply or with the result of the same command id
        earlier in the batch, without running), ``conflicts`` (writes refused because another
        writer appended first), ``conflict_retries`` (commands run again on the reloaded state
        after such a refusal), ``failed_writes`` (writes that failed for any reason,
        conflicts included), ``new_entities`` (activations without a read: entities presumed
        new whose first write confirmed it) and ``new_refused`` (entities presumed new that
        the journal said existed: recovered, and their commands decided again; neither
        conflicts nor failed writes).
        """
        counters: dict[str, int | float] = {
            name: self._stats[name]
            for name in (
                "activations",
                "passivations",
                "batches",
                "commands",
                "events_persisted",
                "duplicates",
                "conflicts",
                "conflict_retries",
                "failed_writes",
                "new_entities",
                "new_refused",
            )
        }
        counters["live_entities"] = len(self.live)
        return counters

    def evict(self, entity_type: str, entity_id: str) -> None:
        """Drop the entity from memory (it is recovered from the journal when next used)."""
        key = (entity_type, entity_id)
        if key in self.live:
            self._drop([key])

    def _drop(self, keys: Iterable[tuple[str, str]]) -> None:
        """Drop entities from memory, remembering that they exist (see ``_dropped``)."""
        live, dropped = self.live, self._dropped
        for key in keys:
            del live[key]
            dropped.pop(key, None)
            dropped[key] = None
        excess = len(dropped) - MAX_DROPPED_KNOWN
        if excess > 0:
            for key in list(itertools.islice(dropped, excess)):
                del dropped[key]

    def _tags(
        self, entity: PersistentEntity[Any, Any, Any], events: list[Any]
    ) -> Sequence[tuple[str, ...]]:
        """The tags of an entity's events: one tuple per event, or none at all when the entity
        tags nothing (no ``tag`` and the default ``tags_for``, which tags by entity alone)."""
        cls = type(entity)
        default = self._default_tags.get(cls)
        if default is None:
            default = self._default_tags[cls] = cls.tags_for is PersistentEntity.tags_for
        if not default:
            return [entity.tags_for(evt) for evt in events]
        tags = entity.tags_for(events[0])
        return [tags] * len(events) if tags else ()

    def _reply_type(self, command: Any) -> Any:
        cls = type(command)
        try:
            return self._reply_types[cls]
        except KeyError:
            reply_type = self._reply_types[cls] = reply_type_of(cls)
            return reply_type

    async def activate(self, entity_type: str, entity_id: str) -> LiveEntity:
        """The live entity, recovered from the journal first if it is not in memory; it becomes
        the most recently used."""
        key = (entity_type, entity_id)
        live = self.live.get(key)
        if live is None:
            async with self._recoveries:
                live = self.live.get(key)
                if live is None:
                    cls = self.entity_class(entity_type)
                    live = await recover(cls, entity_id, self.journal, self.snapshots)
                    self.live[key] = live
                    self._stats["activations"] += 1
        live.last_used = time.monotonic()
        if key in self.live:
            self.live.move_to_end(key)
        return live

    async def process(self, requests: Sequence[Request]) -> list[Result]:
        """Process a batch; one result per request, in the same order. Replies are released
        only after the batch's events are committed."""
        n = len(requests)
        results: list[Result | None] = [None] * n
        stats = self._stats
        stats["batches"] += 1
        stats["commands"] += n
        command_types = self._command_types
        groups: dict[tuple[str, str], list[int]] = {}
        # Same (entity, command id) again in this batch: index of the first -> the later ones.
        repeats: dict[int, list[int]] = {}
        first_of: dict[tuple[str, str, str], int] = {}
        to_check: list[int] = []
        receipts: list[int] = []
        for i, req in enumerate(requests):
            entity_type = req.entity_type
            accepted = command_types.get(entity_type)
            if accepted is None:
                results[i] = Result(error=_unknown_entity(entity_type, self.entity_classes))
                continue
            if accepted and not isinstance(req.command, accepted):
                results[i] = Result(
                    error=UnhandledCommand(
                        f"{self.entity_classes[entity_type].__qualname__} does not accept "
                        f"{type(req.command).__qualname__}: not one of its command types"
                    )
                )
                continue
            key = (entity_type, req.entity_id)
            group = groups.get(key)
            if group is None:
                refusal = _entity_id_refusal(req.entity_id)
                if refusal is not None:
                    results[i] = Result(error=refusal)
                    continue
            command_id = req.command_id
            if command_id is not None:
                # Refs check ids before they are sent; a request made otherwise is checked
                # here, so that a bad id (a NUL the database refuses, say) fails its request
                # alone rather than the batch's reply lookup or write.
                if not (
                    command_id.__class__ is str
                    and 0 < len(command_id) <= MAX_ID_LENGTH
                    and "\x00" not in command_id
                    and command_id.isascii()
                ):
                    try:
                        check_command_id(command_id)
                    except ValueError as e:
                        results[i] = Result(error=e)
                        continue
                id_key = (entity_type, req.entity_id, command_id)
                if req.receipt:
                    receipts.append(i)
                first = first_of.setdefault(id_key, i)
                if first != i:
                    repeats.setdefault(first, []).append(i)
                    continue
                if req.check_duplicate:
                    to_check.append(i)
            if group is None:
                groups[key] = [i]
            else:
                group.append(i)

        self._in_use.append(groups)
        try:
            conflicts = stats["conflicts"]
            await self._run(requests, groups, results, to_check)
            # Only a batch whose writes met a conflict looks for commands to run again.
            for _ in range(self.conflict_retries):
                if stats["conflicts"] == conflicts:
                    break
                conflicts = stats["conflicts"]
                await self._rerun_conflicts(requests, results)
        finally:
            self._in_use.remove(groups)
        self._passivate_beyond_max()

        for first, later in repeats.items():
            done = results[first]
            assert done is not None
            for i in later:
                results[i] = Result(done.reply, done.error, done.events, done.stored)
            stats["duplicates"] += len(later)
        final = [
            r if r is not None else Result(error=RuntimeError("lost request")) for r in results
        ]
        for i in receipts:
            r = final[i]
            if r.error is None:
                final[i] = Result(Receipt(r.reply, r.committed), None, r.events, r.stored)
        return final

    async def _rerun_conflicts(
        self, requests: Sequence[Request], results: list[Result | None]
    ) -> None:
        """Run again, in arrival order, the commands of the entities whose write another writer
        refused (a zombie copy of this host, or its successor): they were decided on a state
        that was not the latest. The entities were evicted, so they reload from the journal
        first; a command with an id is answered from the journal if the other writer already
        applied it."""
        groups: dict[tuple[str, str], list[int]] = {}
        to_check: list[int] = []
        for i, result in enumerate(results):
            if result is not None and isinstance(result.error, ConcurrencyConflict):
                req = requests[i]
                groups.setdefault((req.entity_type, req.entity_id), []).append(i)
                if req.command_id is not None:
                    to_check.append(i)
        if not groups:
            return
        self._stats["conflict_retries"] += sum(len(g) for g in groups.values())
        if to_check:
            await self._answer_stored(requests, to_check, groups, results)
        self._in_use.append(groups)
        try:
            # They are known to exist: recover them rather than presume them new.
            await self._run(requests, groups, results, presume=False)
        finally:
            self._in_use.remove(groups)

    async def _answer_stored(
        self,
        requests: Sequence[Request],
        to_check: list[int],
        groups: dict[tuple[str, str], list[int]],
        results: list[Result | None],
    ) -> None:
        """Answer the requests whose command id has a stored reply (one journal query), and
        take them out of ``groups``: they are not run again."""
        answered = await self._stored_results(requests, to_check)
        for i, result in answered.items():
            results[i] = result
            entity = (requests[i].entity_type, requests[i].entity_id)
            remaining = [j for j in groups[entity] if j != i]
            if remaining:
                groups[entity] = remaining
            else:
                del groups[entity]

    async def _stored_results(
        self, requests: Sequence[Request], to_check: list[int]
    ) -> dict[int, Result]:
        """The results of the requests whose command id has a stored reply (one journal
        query): the reply, or the error decoding it; every request's the query's error when
        it failed (without the answer, running the command could apply it twice)."""
        keys = []
        for i in to_check:
            req = requests[i]
            assert req.command_id is not None
            keys.append((req.entity_type, req.entity_id, req.command_id))
        try:
            stored = await self.journal.stored_replies(keys)
        except Exception as e:
            # Without the answer, running the command could apply it twice: fail these alone.
            answered = {i: Result(error=e) for i in to_check}
        else:
            answered = {}
            for i, key in zip(to_check, keys, strict=True):
                payload = stored.get(key)
                if payload is None:
                    continue
                command = requests[i].command
                try:
                    reply = (
                        None
                        if payload == _NONE_REPLY
                        else self.journal.serializer.decode_value(
                            payload, self._reply_type(command)
                        )
                    )
                except SerializationError as e:
                    answered[i] = Result(error=e)
                else:
                    answered[i] = Result(reply=reply, stored=True)
                    self._stats["duplicates"] += 1
        return answered

    async def _run(
        self,
        requests: Sequence[Request],
        groups: dict[tuple[str, str], list[int]],
        results: list[Result | None],
        to_check: Sequence[int] = (),
        *,
        presume: bool = True,
    ) -> None:
        """Run the commands of ``groups`` (entity -> indices of its requests, in arrival order)
        in four steps: activate the entities (those not in memory presumed new, or recovered:
        awaited only when there are some to recover, so that a batch of live entities awaits
        nothing before its commit), decide every command on a tentative state, commit all
        their events in one journal transaction, then release the replies, the side effects
        and the snapshots. Fills ``results``. The requests ``to_check`` are first answered
        with their stored replies, if they have one, and not run.

        Entities presumed new (``presume`` and :attr:`presume_new`) skip that lookup too (a new
        entity has no stored reply). Those whose commands persist nothing are looked up and
        recovered, and their commands decided again, before the commit; those whose write the
        journal refused (they existed) are looked up, recovered and run again after it. So do
        the requests ``to_check`` of entities in memory: their write confirms their ids (one
        the journal refuses as stored already sends the entity to recovery, a lookup and a run
        again, ``presume`` off), and those that persisted nothing are looked up after it."""
        lives, missing = self._activate(groups)
        presumed: set[tuple[str, str]] | tuple[()] = ()
        if missing and presume and self.presume_new:
            dropped = self._dropped
            known = [key for key in missing if key in dropped] if dropped else []
            if known:
                missing = [key for key in missing if key not in dropped]
            presumed, unmade = self._presume_new(missing, lives)
            missing = known + unmade if unmade else known
        deferred: list[int] = []
        # Requests to entities in memory whose command id is not looked up before deciding:
        # the write confirms it is new (see the module's docstring, "Safe retries").
        optimistic: list[int] = []
        optimistic_keys: set[tuple[str, str]] = set()
        if to_check:
            check_now: list[int] = []
            for i in to_check:
                req = requests[i]
                key = (req.entity_type, req.entity_id)
                if presumed and key in presumed:
                    deferred.append(i)
                elif presume and key in lives:
                    optimistic.append(i)
                    optimistic_keys.add(key)
                else:
                    check_now.append(i)
            if check_now:
                await self._answer_stored(requests, check_now, groups, results)
                missing = [key for key in missing if key in groups]
        if missing:
            await self._recover(missing, groups, lives, results)
        decided = self._decide(requests, groups, lives, results, presumed, optimistic_keys)
        if decided.unconfirmed:
            # No longer presumed: recovered, decided again, written as any other.
            presumed = set(presumed).difference(decided.unconfirmed)
            unconfirmed = {key: groups[key] for key in decided.unconfirmed}
            if deferred:
                await self._answer_stored(
                    requests, _of(requests, deferred, unconfirmed), unconfirmed, results
                )
            if unconfirmed:
                await self._recover(list(unconfirmed), unconfirmed, lives, results)
                decided.extend(self._decide(requests, unconfirmed, lives, results))
        failed, refused_keys = await self._commit(decided, presumed, optimistic_keys)
        await self._release(decided, failed, results, presumed)
        if optimistic:
            # Those that persisted nothing were confirmed by no write: a retry of a command
            # applied before (now rejected, or read only) gets the stored reply.
            unconfirmed_ids = []
            for i in optimistic:
                req = requests[i]
                result = results[i]
                if (
                    result is not None
                    and not result.events
                    and (req.entity_type, req.entity_id) not in failed
                ):
                    unconfirmed_ids.append(i)
            if unconfirmed_ids:
                for i, result in (await self._stored_results(requests, unconfirmed_ids)).items():
                    results[i] = result
        if refused_keys:
            refused = {key: groups[key] for key in refused_keys}
            self._stats["new_refused"] += sum(1 for key in refused if key in presumed)
            await self._run(
                requests,
                refused,
                results,
                _of(requests, deferred + optimistic, refused),
                presume=False,
            )

    def _activate(
        self, groups: dict[tuple[str, str], list[int]]
    ) -> tuple[dict[tuple[str, str], LiveEntity], list[tuple[str, str]]]:
        """The live entities of ``groups`` that are in memory (the usual case: no task, no
        await), now the most recently used; and the keys of those to recover."""
        live_map = self.live
        lives: dict[tuple[str, str], LiveEntity] = {}
        missing: list[tuple[str, str]] = []
        now = time.monotonic()
        move_to_end = live_map.move_to_end
        for key in groups:
            live = live_map.get(key)
            if live is None:
                missing.append(key)
            else:
                live.last_used = now
                move_to_end(key)
                lives[key] = live
        return lives, missing

    def _presume_new(
        self, missing: list[tuple[str, str]], lives: dict[tuple[str, str], LiveEntity]
    ) -> tuple[set[tuple[str, str]], list[tuple[str, str]]]:
        """The ``missing`` entities as new ones, into ``lives``: their initial state at
        sequence number 0, not read from the journal and not put in memory (their write
        confirms them, see :meth:`_release`). Returns them, and those whose handler object
        could not be made (left to recovery, which answers them with that error)."""
        classes = self.entity_classes
        presumed: set[tuple[str, str]] = set()
        failed: list[tuple[str, str]] = []
        for key in missing:
            cls = classes[key[0]]
            try:
                entity = cls(key[1])
            except Exception:
                failed.append(key)
                continue
            lives[key] = LiveEntity(entity, cls.initial_state, 0)
            presumed.add(key)
        return presumed, failed

    async def _recover(
        self,
        missing: list[tuple[str, str]],
        groups: dict[tuple[str, str], list[int]],
        lives: dict[tuple[str, str], LiveEntity],
        results: list[Result | None],
    ) -> None:
        """Recover the ``missing`` entities from the journal together, into ``lives``: per
        entity class a bounded number of queries (:func:`recover_many`), all in one read
        transaction, rather than a few queries and a transaction for each entity. An entity
        that cannot be recovered answers its requests with the error and is left out."""
        by_type: dict[str, list[str]] = {}
        for entity_type, entity_id in missing:
            by_type.setdefault(entity_type, []).append(entity_id)
        recovered: dict[tuple[str, str], LiveEntity | Exception] = {}
        async with self._recoveries:
            try:
                async with self.journal.database.read():
                    for entity_type, ids in by_type.items():
                        cls = self.entity_class(entity_type)
                        outcomes = await recover_many(cls, ids, self.journal, self.snapshots)
                        for entity_id, outcome in outcomes.items():
                            recovered[(entity_type, entity_id)] = outcome
            except Exception as e:
                # The read itself failed (the database is out of reach...): every entity it
                # had not recovered yet gets the error.
                for key in missing:
                    recovered.setdefault(key, e)
        live_map = self.live
        now = time.monotonic()
        activations = 0
        for key in missing:
            outcome = recovered[key]
            if isinstance(outcome, Exception):
                for i in groups[key]:
                    results[i] = Result(error=outcome)
                continue
            live = live_map.get(key)
            if live is None:
                live = live_map[key] = outcome
                activations += 1
            else:  # another batch recovered it meanwhile (and may have moved it on): that one
                live_map.move_to_end(key)
            live.last_used = now
            lives[key] = live
        self._stats["activations"] += activations

    def _decide(
        self,
        requests: Sequence[Request],
        groups: dict[tuple[str, str], list[int]],
        lives: dict[tuple[str, str], LiveEntity],
        results: list[Result | None],
        presumed: Collection[tuple[str, str]] = (),
        optimistic: Collection[tuple[str, str]] = (),
    ) -> _Decided:
        """Per entity, in arrival order, each command on the state its previous commands left
        (nothing is durable yet): the writes to commit, with the replies to store for safe
        retries. Rejections, and read-only entities' replies, are answered at once, except
        those of entities ``presumed`` new: their rejections wait for their write like their
        replies, and an entity whose commands persist nothing is left undecided (in
        ``unconfirmed``: no write will confirm it is new). The rejections of the entities
        ``optimistic`` (whose command ids were not looked up) wait for their write too, when
        they have one: a command applied before and decided again could have changed the
        state they were decided on."""
        batches: dict[tuple[str, str], _EntityBatch] = {}
        writes: list[AtomicWrite] = []
        write_keys: list[tuple[str, str]] = []
        unconfirmed: list[tuple[str, str]] = []
        serializer = self.journal.serializer
        reply_types = self._reply_types
        for key, indices in groups.items():
            live = lives.get(key)
            if live is None:
                continue  # its activation failed: answered already
            entity = live.entity
            state = live.state
            events: list[Any] = []
            replies: list[tuple[str, int, bytes]] = []
            pending: list[_Pending] = []
            # Presumed new: every answer waits for the write that confirms the state it was
            # decided on (``_Pending`` with the error; ``_release`` answers it).
            held = (bool(presumed) and key in presumed) or (bool(optimistic) and key in optimistic)
            for i in indices:
                request = requests[i]
                command = request.command
                decision = decide(entity, state, command)
                if decision.error is not None:
                    if held:
                        pending.append(_Pending(i, decision))
                    else:
                        results[i] = Result(error=decision.error)
                    continue
                decided = decision.events
                command_id = request.command_id
                if command_id is not None and decided:
                    reply = decision.reply
                    if reply is None:
                        payload = _NONE_REPLY
                    else:
                        reply_type = reply_types.get(command.__class__, _MISSING)
                        if reply_type is _MISSING:
                            reply_type = self._reply_type(command)
                        try:
                            payload = serializer.encode_value(reply, reply_type)
                        except SerializationError as e:
                            error = _unstorable(command, key, e)
                            if held:
                                pending.append(
                                    _Pending(i, Decision(state_after=state, error=error))
                                )
                            else:
                                results[i] = Result(error=error)
                            continue
                    replies.append((command_id, live.seq_nr + len(events) + len(decided), payload))
                state = decision.state_after
                events.extend(decided)
                pending.append(_Pending(i, decision))
            if events:
                batches[key] = _EntityBatch(live, pending)
                writes.append(
                    atomic_write(
                        key[0], key[1], live.seq_nr, events, self._tags(entity, events), replies
                    )
                )
                write_keys.append(key)
            elif presumed and key in presumed:
                unconfirmed.append(key)
            else:
                # Read-only commands (and rejections held): nothing to wait for.
                for p in pending:
                    decision = p.decision
                    results[p.index] = (
                        Result(reply=decision.reply)
                        if decision.error is None
                        else Result(error=decision.error)
                    )
        return _Decided(batches, writes, write_keys, unconfirmed)

    async def _commit(
        self,
        decided: _Decided,
        presumed: Collection[tuple[str, str]] = (),
        optimistic: Collection[tuple[str, str]] = (),
    ) -> tuple[dict[tuple[str, str], BaseException], list[tuple[str, str]]]:
        """Append every write in one journal transaction; the entities whose write failed,
        with the error that answers their commands, and those of them ``presumed`` new whose
        own write the journal refused (any error of its write's result: a conflict says the
        entity exists, and any other refusal came from commands decided on a state it may not
        have): they are to recover and run again, and count as neither conflicts nor failed
        writes. So are those ``optimistic`` (command ids not looked up) whose write was
        refused for another reason than a conflict: a command id already stored
        (``DuplicateCommandId``), or a failure that a command applied before and decided again
        may have caused. When the append itself fails (its outcome unknown), every command
        that waited on it gets the error, presumed new or not."""
        failed: dict[tuple[str, str], BaseException] = {}
        refused: list[tuple[str, str]] = []
        write_keys = decided.write_keys
        if decided.writes:
            try:
                write_results = await self.journal.append(decided.writes)
            except Exception as e:
                # The outcome of the transaction is unknown: forget these entities (they reload
                # from the journal) and answer every command that waited on the write.
                for key in write_keys:
                    failed[key] = e
            else:
                for key, wr in zip(write_keys, write_results, strict=True):
                    if wr.error is not None:
                        failed[key] = wr.error
                        if presumed and key in presumed:
                            refused.append(key)
                        elif isinstance(wr.error, ConcurrencyConflict):
                            self._stats["conflicts"] += 1
                        elif optimistic and key in optimistic:
                            refused.append(key)
        self._stats["failed_writes"] += len(failed) - len(refused)
        return failed, refused

    async def _release(
        self,
        decided: _Decided,
        failed: dict[tuple[str, str], BaseException],
        results: list[Result | None],
        presumed: Collection[tuple[str, str]] = (),
    ) -> None:
        """After the commit: the committed entities take their new state and their commands
        get their replies, then the side effects run and the due snapshots are saved. An
        entity whose write failed is dropped from memory and its commands get the error.
        An entity ``presumed`` new is put in memory once its write committed (it was not
        before: a failed one has nothing to drop)."""
        to_snapshot: list[SnapshotToSave] = []
        side_effects: list[tuple[Callable[[Any], Any], Any, tuple[str, str]]] = []
        persisted = 0
        batches = decided.batches
        for key in decided.write_keys:
            batch = batches[key]
            if failed and key in failed:
                if not (presumed and key in presumed):
                    self.evict(*key)
                error = failed[key]
                for p in batch.pending:
                    results[p.index] = Result(error=error)
                continue
            live = batch.live
            previous_seq = seq_nr = live.seq_nr
            last: Decision | None = None
            for p in batch.pending:
                last = p.decision
                if last.error is not None:  # held for an entity presumed new
                    results[p.index] = Result(error=last.error)
                    continue
                seq_nr += len(last.events)
                results[p.index] = Result(last.reply, None, last.events)
                if last.side_effects:
                    for fn in last.side_effects:
                        side_effects.append((fn, last.state_after, key))
            assert last is not None
            live.state = last.state_after
            live.seq_nr = seq_nr
            if presumed and key in presumed:
                self._adopt(key, live)
            persisted += seq_nr - previous_seq
            every = type(live.entity).snapshot_every
            if every and seq_nr // every > previous_seq // every:
                to_snapshot.append(SnapshotToSave(key[0], key[1], seq_nr, live.state))
        self._stats["events_persisted"] += persisted

        for fn, state, key in side_effects:
            await _run_side_effect(fn, state, key)
        if to_snapshot:
            if not self.defer_snapshots:
                await self._save_snapshots(to_snapshot)
                return
            self.due_snapshots.extend(to_snapshot)
            if len(self.due_snapshots) >= MAX_DUE_SNAPSHOTS:
                await self.save_due_snapshots()

    def _adopt(self, key: tuple[str, str], live: LiveEntity) -> None:
        """Put an entity confirmed new in memory, the most recently used, unless another batch
        put a copy there meanwhile that is as far along (a copy behind this one is replaced:
        its next write would be refused)."""
        current = self.live.get(key)
        if current is None or current.seq_nr < live.seq_nr:
            self.live[key] = live
        self.live.move_to_end(key)
        self.live[key].last_used = time.monotonic()
        self._stats["activations"] += 1
        self._stats["new_entities"] += 1

    async def save_due_snapshots(self) -> int:
        """Save the snapshots that ``defer_snapshots`` kept due (they are no longer due after);
        return how many."""
        due, self.due_snapshots = self.due_snapshots, []
        if len(due) > 1:
            # The latest of each entity's (older ones would only be overwritten in effect).
            due = list({(d.entity_type, d.entity_id): d for d in due}.values())
        if due:
            await self._save_snapshots(due)
        return len(due)

    async def _save_snapshots(self, snapshots: list[SnapshotToSave]) -> None:
        # A failure is logged, never raised: snapshots only shorten recoveries, and the events
        # they cover are committed already.
        try:
            await self.snapshots.save_many(snapshots)
        except Exception:
            log.warning("saving %d snapshots failed", len(snapshots), exc_info=True)


async def _run_side_effect(fn: Callable[[Any], Any], state: Any, key: tuple[str, str]) -> None:
    try:
        outcome = fn(state)
        if inspect.isawaitable(outcome):
            await outcome
    except Exception:
        log.exception("then_run side effect of %s/%s failed", *key)


def _of(
    requests: Sequence[Request], indices: list[int], keys: Collection[tuple[str, str]]
) -> list[int]:
    """The ``indices`` whose request is for one of the entities ``keys``."""
    return [i for i in indices if (requests[i].entity_type, requests[i].entity_id) in keys]


def _entity_id_refusal(entity_id: Any) -> LagompyError | None:
    """None for a valid entity id, else the error that answers its requests (checked once per
    entity and batch; refs check ids before they are sent)."""
    if (
        entity_id.__class__ is str
        and 0 < len(entity_id) <= MAX_ID_LENGTH
        and "\x00" not in entity_id
        and entity_id.isascii()
    ):
        return None
    try:
        check_entity_id(entity_id)
    except InvalidEntityId as e:
        return e
    return None


def _unknown_entity(entity_type: str, known: dict[str, EntityClass]) -> ConfigurationError:
    return ConfigurationError(
        f"no entity with type_name {entity_type!r} is registered (known: {sorted(known)})"
    )
