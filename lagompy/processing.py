"""Run commands against live entities: decide, apply, group-commit, reply.

This is the heart of a shard: the Ray shard host and the in-process runtime both drive an
:class:`EntityProcessor`. A batch of commands for many entities is processed like this:

1. every entity named in the batch is activated if it is not in memory (latest snapshot plus
   the events after it);
2. per entity, in arrival order, each command goes through ``on_command`` and its events
   through ``on_event``, on a tentative state;
3. the events of all entities are appended in **one** journal transaction;
4. only then are replies released and ``then_run`` side effects run; an entity whose write
   failed is dropped from memory (it reloads from the journal next time) and its commands
   that depended on the write get the error.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lagompy.entity import Effect, PersistentEntity, unhandled_command, union_members
from lagompy.errors import (
    CommandHandlerFailed,
    CommandRejected,
    ConfigurationError,
    EventHandlerFailed,
    HandlerFailed,
    LagompyError,
    SerializationError,
    UnhandledCommand,
    UnhandledEvent,
)
from lagompy.journal import AtomicWrite, Journal
from lagompy.snapshots import SnapshotStore, SnapshotToSave

log = logging.getLogger("lagompy.processing")

EntityClass = type[PersistentEntity[Any, Any, Any]]


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


@dataclass
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
    snapshot_seq_nr: int = 0
    #: set when recovery could not use the latest snapshot and replayed everything
    recovery_warning: str | None = None
    recovered_from_snapshot: bool = False


async def recover(
    entity_cls: EntityClass, entity_id: str, journal: Journal, snapshots: SnapshotStore
) -> LiveEntity:
    """Rebuild an entity from its latest snapshot and the events after it.

    A snapshot that cannot be read is skipped with a warning: the events are replayed from the
    start instead (they are the source of truth).
    """
    entity = entity_cls(entity_id)
    state = entity_cls.initial_state
    seq_nr = 0
    warning = None
    from_snapshot = False
    if entity_cls.snapshot_every:
        try:
            snapshot = await snapshots.load(entity_cls.type_name, entity_id)
        except SerializationError as e:
            warning = (
                f"snapshot of {entity_cls.type_name}/{entity_id} cannot be read ({e}); "
                "replaying all events instead"
            )
            log.warning(warning)
            snapshot = None
        if snapshot is not None:
            state, seq_nr, from_snapshot = snapshot.state, snapshot.seq_nr, True
    snapshot_seq = seq_nr
    for envelope in await journal.replay(entity_cls.type_name, entity_id, from_seq_nr=seq_nr + 1):
        state = apply_event(entity, state, envelope.event)
        seq_nr = envelope.seq_nr
    if seq_nr == 0:
        # Nothing replayed: deleted events may still have advanced the sequence number.
        seq_nr = await journal.highest_seq_nr(entity_cls.type_name, entity_id)
    return LiveEntity(entity, state, seq_nr, snapshot_seq, warning, from_snapshot)


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Request:
    """One command for one entity."""

    entity_type: str
    entity_id: str
    command: Any


@dataclass
class Result:
    """The reply to one request, or the error that answers it."""

    reply: Any = None
    error: BaseException | None = None
    events: tuple[Any, ...] = ()

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.reply


@dataclass
class _Pending:
    index: int
    decision: Decision


@dataclass
class _EntityBatch:
    live: LiveEntity
    pending: list[_Pending] = field(default_factory=list)


class EntityProcessor:
    """Keeps live entities in memory and processes batches of commands against them."""

    def __init__(
        self,
        entities: Iterable[EntityClass],
        journal: Journal,
        snapshots: SnapshotStore,
        *,
        max_concurrent_recoveries: int = 16,
    ) -> None:
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
        self.live: dict[tuple[str, str], LiveEntity] = {}
        self._recoveries = asyncio.Semaphore(max_concurrent_recoveries)

    def entity_class(self, entity_type: str) -> EntityClass:
        try:
            return self.entity_classes[entity_type]
        except KeyError:
            raise ConfigurationError(
                f"no entity with type_name {entity_type!r} is registered "
                f"(known: {sorted(self.entity_classes)})"
            ) from None

    def evict(self, entity_type: str, entity_id: str) -> None:
        self.live.pop((entity_type, entity_id), None)

    async def activate(self, entity_type: str, entity_id: str) -> LiveEntity:
        key = (entity_type, entity_id)
        live = self.live.get(key)
        if live is None:
            async with self._recoveries:
                live = self.live.get(key)
                if live is None:
                    cls = self.entity_class(entity_type)
                    live = await recover(cls, entity_id, self.journal, self.snapshots)
                    self.live[key] = live
        return live

    async def process(self, requests: Sequence[Request]) -> list[Result]:
        """Process a batch; one result per request, in the same order. Replies are released
        only after the batch's events are committed."""
        results: list[Result | None] = [None] * len(requests)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, req in enumerate(requests):
            accepted = self._command_types.get(req.entity_type)
            if accepted is None:
                results[i] = Result(error=_unknown_entity(req.entity_type, self.entity_classes))
            elif accepted and not isinstance(req.command, accepted):
                results[i] = Result(
                    error=UnhandledCommand(
                        f"{self.entity_classes[req.entity_type].__qualname__} does not accept "
                        f"{type(req.command).__qualname__}: not one of its command types"
                    )
                )
            else:
                groups.setdefault((req.entity_type, req.entity_id), []).append(i)

        batches: dict[tuple[str, str], _EntityBatch] = {}
        activations = await asyncio.gather(
            *(self.activate(t, i) for (t, i) in groups), return_exceptions=True
        )
        for key, activated in zip(groups, activations, strict=True):
            if isinstance(activated, BaseException):
                if not isinstance(activated, Exception):
                    raise activated
                for i in groups[key]:
                    results[i] = Result(error=activated)
                continue
            batches[key] = _EntityBatch(activated)

        writes: list[AtomicWrite] = []
        write_keys: list[tuple[str, str]] = []
        for key, batch in batches.items():
            live = batch.live
            state = live.state
            events: list[Any] = []
            for i in groups[key]:
                decision = decide(live.entity, state, requests[i].command)
                if decision.error is not None:
                    results[i] = Result(error=decision.error)
                    continue
                state = decision.state_after
                events.extend(decision.events)
                batch.pending.append(_Pending(i, decision))
            if events:
                writes.append(
                    AtomicWrite(
                        entity_type=key[0],
                        entity_id=key[1],
                        expected_seq_nr=live.seq_nr,
                        events=events,
                        tags=[live.entity.tags_for(evt) for evt in events],
                    )
                )
                write_keys.append(key)
            else:
                # Read-only commands: nothing to wait for.
                for p in batch.pending:
                    results[p.index] = Result(reply=p.decision.reply)
                batch.pending.clear()

        failed: dict[tuple[str, str], BaseException] = {}
        if writes:
            try:
                write_results = await self.journal.append(writes)
            except Exception as e:
                # The outcome of the transaction is unknown: forget these entities (they reload
                # from the journal) and answer every command that waited on the write.
                for key in write_keys:
                    failed[key] = e
            else:
                for key, wr in zip(write_keys, write_results, strict=True):
                    if wr.error is not None:
                        failed[key] = wr.error

        to_snapshot: list[SnapshotToSave] = []
        side_effects: list[tuple[Callable[[Any], Any], Any, tuple[str, str]]] = []
        for key in write_keys:
            batch = batches[key]
            if key in failed:
                self.evict(*key)
                error = failed[key]
                for p in batch.pending:
                    results[p.index] = Result(error=error)
                continue
            live = batch.live
            previous_seq = live.seq_nr
            for p in batch.pending:
                live.state = p.decision.state_after
                live.seq_nr += len(p.decision.events)
                results[p.index] = Result(reply=p.decision.reply, events=p.decision.events)
                for fn in p.decision.side_effects:
                    side_effects.append((fn, p.decision.state_after, key))
            every = type(live.entity).snapshot_every
            if every and live.seq_nr // every > previous_seq // every:
                to_snapshot.append(SnapshotToSave(key[0], key[1], live.seq_nr, live.state))

        for fn, state, key in side_effects:
            await _run_side_effect(fn, state, key)
        if to_snapshot:
            try:
                await self.snapshots.save_many(to_snapshot)
            except Exception:
                log.warning("saving %d snapshots failed", len(to_snapshot), exc_info=True)
            else:
                for snap in to_snapshot:
                    live_entity = self.live.get((snap.entity_type, snap.entity_id))
                    if live_entity is not None:
                        live_entity.snapshot_seq_nr = snap.seq_nr
        return [r if r is not None else Result(error=RuntimeError("lost request")) for r in results]


async def _run_side_effect(fn: Callable[[Any], Any], state: Any, key: tuple[str, str]) -> None:
    try:
        outcome = fn(state)
        if inspect.isawaitable(outcome):
            await outcome
    except Exception:
        log.exception("then_run side effect of %s/%s failed", *key)


def _unknown_entity(entity_type: str, known: dict[str, EntityClass]) -> ConfigurationError:
    return ConfigurationError(
        f"no entity with type_name {entity_type!r} is registered (known: {sorted(known)})"
    )
