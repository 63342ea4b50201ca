"""What a process manager declares and implements: :class:`ProcessManager`, and the
:class:`ProcessContext` its handlers act through."""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from lagompy.entity import Command, PersistentEntity, ShardedTag, Tag
from lagompy.errors import ConfigurationError
from lagompy.journal._placement import HOME, PARTITION_SEPARATOR
from lagompy.readside._store import GLOBAL_TAG
from lagompy.runtime._refs import EntityRef
from lagompy.topic._topic import Topic

__all__ = [
    "ProcessContext",
    "ProcessManager",
    "RefSource",
    "ScheduledTimer",
    "check_key",
    "event_origin",
    "offset_key",
    "timer_base",
]

S = TypeVar("S")
R = TypeVar("R")

#: The longest association key, timer id or name (the columns are 255 characters).
MAX_NAME = 255
#: The prefix of a manager's rows in the offset table: ``process:<name>``.
PREFIX = "process:"


def offset_key(name: str) -> str:
    """The key of a manager's positions in the offset store (one row per partition, beside
    the read sides' rows): ``process:<name>``."""
    return f"{PREFIX}{name}"


class RefSource(Protocol):
    """Where a process manager's commands go: an entity runtime (``lagompy.start``'s, or a
    service's ``entities``)."""

    def ref_for(
        self, entity: type[PersistentEntity[Any, Any, Any]] | str, entity_id: str
    ) -> EntityRef[Any]: ...


def check_key(manager: str, key: object) -> str:
    """``key`` if it is a usable association key (a ``str`` of 1 to 255 characters); else a
    ``ConfigurationError`` naming the manager and the key."""
    if type(key) is str and 0 < len(key) <= MAX_NAME and "\x00" not in key:
        return key
    raise ConfigurationError(
        f"process manager {manager!r}: associate() must return a str of 1 to {MAX_NAME} "
        f"characters (no NUL) or None, got {key!r:.80}"
    )


def _seconds(delay: timedelta | float) -> float:
    if isinstance(delay, timedelta):
        return delay.total_seconds()
    if isinstance(delay, (int, float)) and not isinstance(delay, bool):
        return float(delay)
    raise TypeError(f"a timer delay is a timedelta or seconds, got {delay!r}")


@dataclasses.dataclass(frozen=True)
class ScheduledTimer:
    """A timer a handler scheduled with :meth:`ProcessContext.after` (stored with its state)."""

    timer_id: str
    due_us: int
    message: Any


class ProcessContext:
    """What a process manager's handler acts through, for one key and one event (or timer).

    * :meth:`send` asks an entity, with a command id derived from the position being handled
      (``<manager>:<offset>:<n>`` for the n-th command of an event, ``<manager>:<offset>@<db>:<n>``
      for an event of database ``db`` of a journal placed on several, other than the home one;
      ``<manager>:timer:<timer id>:<n>`` of a timer): a re-run after a crash asks with the same
      ids and the entity answers from its stored replies instead of applying the command again.
    * :meth:`after` schedules a durable timer; :meth:`cancel` drops one; :meth:`end` finishes
      the key (its state is deleted and its pending timers cancelled, with the position).

    ``key``, ``offset`` (the journal offset of the event; for a timer, the worker's position),
    ``entity_id`` (the source entity of the event; None for a timer), ``timer_id`` (the timer
    being fired, else None) and ``now_us`` (the event's time, or the timer's due time, in
    microseconds: the base of :meth:`after`) describe what is being handled.
    """

    def __init__(
        self,
        manager: str,
        key: str,
        *,
        entities: RefSource,
        origin: str,
        timer_base: str,
        now_us: int,
        offset: int,
        entity_id: str | None = None,
        timer_id: str | None = None,
        timer_messages: tuple[type, ...] = (),
    ) -> None:
        self.manager = manager
        self.key = key
        self.offset = offset
        self.entity_id = entity_id
        self.timer_id = timer_id
        self.now_us = now_us
        self._entities = entities
        self._origin = origin
        self._timer_base = timer_base
        self._timer_messages = timer_messages
        self._sends = 0
        self._timers = 0
        #: Timers scheduled by this handler (stored with its state).
        self.scheduled: list[ScheduledTimer] = []
        #: Timer ids this handler cancelled.
        self.cancelled: list[str] = []
        #: The handler called :meth:`end`.
        self.ended = False

    def command_id(self, index: int) -> str:
        """The command id of this handler's ``index``-th command (from 0)."""
        return f"{self._origin}:{index}"

    async def send(
        self,
        entity: type[PersistentEntity[Any, Any, Any]] | str,
        entity_id: str,
        command: Command[R],
        *,
        timeout: float | None = None,
    ) -> R:
        """Ask entity ``entity_id`` of ``entity`` (its class or type name) and return its reply
        (a rejection raises, as ``ask`` does: catch it to decide, or let the handler fail).
        The command id is the next of this handler's (see the class docs)."""
        cid = self.command_id(self._sends)
        self._sends += 1
        ref = self._entities.ref_for(entity, entity_id)
        reply: R = await ref.ask(command, timeout=timeout, command_id=cid)
        return reply

    def after(self, delay: timedelta | float, message: Any) -> str:
        """Schedule ``message`` for :meth:`ProcessManager.on_timer` of this key, ``delay``
        (a ``timedelta`` or seconds) after the event's time (for a timer: after its due time).
        The timer is stored with the state; it fires once, also after a restart. Returns its
        id (derived from the position, so a re-run schedules the same timer)."""
        seconds = _seconds(delay)
        if seconds < 0:
            raise ValueError(f"a timer delay cannot be negative, got {delay!r}")
        if not isinstance(message, self._timer_messages):
            declared = ", ".join(t.__qualname__ for t in self._timer_messages) or "none"
            raise ConfigurationError(
                f"process manager {self.manager!r}: timer message {type(message).__qualname__} "
                f"is not one of its timer_messages ({declared}): declare its class there"
            )
        timer_id = f"{self._timer_base}.{self._timers}"
        self._timers += 1
        self.scheduled.append(ScheduledTimer(timer_id, self.now_us + int(seconds * 1e6), message))
        return timer_id

    def cancel(self, timer_id: str) -> None:
        """Drop the pending timer ``timer_id`` of this key (one :meth:`after` returned); a
        timer that fired or was cancelled already is ignored."""
        self.scheduled = [t for t in self.scheduled if t.timer_id != timer_id]
        self.cancelled.append(timer_id)

    def end(self) -> None:
        """Finish this key: its state is deleted and its pending timers cancelled when the
        position commits (a later event for the key starts again from ``initial_state``)."""
        self.ended = True
        self.scheduled = []


def _on(database: str) -> str:
    """The suffix that names a journal's database other than the home one in the ids derived
    from an offset (offsets of two databases collide): ``@<name>``, as in partition keys."""
    return "" if database == HOME else f"{PARTITION_SEPARATOR}{database}"


def _in(partition: int | None) -> str:
    """The suffix that names a topic's partition in the ids derived from a message's offset:
    a topic published from a journal placed on several databases numbers each partition's
    messages 1, 2, 3... (its relay log), so offsets of two partitions collide. Partition 0
    keeps the ids of a topic of one database's journal, whose offsets are unique."""
    return f"#{partition}" if partition else ""


def event_origin(
    manager: str, offset: int, database: str = HOME, partition: int | None = None
) -> str:
    """The origin of the command ids of an event at ``offset`` of ``database`` (of a journal
    placed on several): ``<manager>:<offset>`` on the home database (the ids of a journal on
    one database, kept so that a journal that gets a second database still absorbs re-runs),
    ``<manager>:<offset>@<database>`` on another; of a topic's message, its ``partition``
    after ``#`` (``<manager>:<offset>#<partition>``, from partition 1 on)."""
    return f"{manager}:{offset}{_on(database)}{_in(partition)}"


def timer_base(offset: int, database: str = HOME, partition: int | None = None) -> str:
    """The base of the ids of the timers an event at ``offset`` (of ``database``, or of a
    topic's ``partition``) schedules: timer ids are unique per manager, so one of another
    database or partition names it."""
    return f"e{offset}{_on(database)}{_in(partition)}"


def timer_base_of_timer(timer_id: str) -> str:
    """The base of the ids of the timers a timer schedules (short whatever the chain)."""
    return "t" + hashlib.sha1(timer_id.encode(), usedforsecurity=False).hexdigest()[:24]


class ProcessManager(Generic[S]):
    """Reacts to an entity's events by sending commands to entities, with state per
    association key (an order id, say)::

        class Fulfilment(ProcessManager[FulfilmentState]):
            name = "fulfilment"
            source = OrderEntity                    # follows its (sharded) tag
            initial_state = FulfilmentState()
            timer_messages = (PaymentOverdue,)

            def associate(self, event, entity_id):  # the key; None: not for this manager
                return entity_id

            async def handle(self, ctx, state, event):
                match event:
                    case OrderPlaced(amount=a):
                        await ctx.send(PaymentEntity, ctx.key, Charge(a))
                        ctx.after(timedelta(minutes=30), PaymentOverdue())
                        return replace(state, placed=True)
                return state

            async def on_timer(self, ctx, state, message):
                ...

    One worker per partition (tag shard) of the source, under a fenced lease, handles the
    events in offset order: for each event, ``associate`` gives the key (None: ignored, the
    position still advances), ``handle`` gets the key's state and returns the new one; the
    new states, the timers scheduled and the position commit in one transaction. Commands
    are sent *before* that commit, with ids derived from the position: a worker that dies in
    between re-runs the events, asks again with the same ids, and the entities answer from
    their stored replies. Hence the contract:

    * handlers are deterministic given (state, event) and the replies they get: no clock,
      no randomness, no I/O other than ``ctx.send`` (a re-run must send the same commands in
      the same order);
    * a command the entity rejected stored nothing: a re-run asks it again;
    * a key's events come from one partition of the source (key = the source entity's id, as
      the default ``associate`` does, or a value the entity's events carry): a key met in two
      partitions stops the second one with a clear error.

    A handler that raises is retried with backoff, then ``on_failure`` (of the settings)
    applies: ``stop`` (the partition is ``failed`` until resumed or skipped) or ``skip``.
    """

    #: The manager's name: the key of its positions, states and timers (renaming it starts
    #: from scratch).
    name: ClassVar[str]
    #: What drives the manager: an entity class (its tag's events; sharded: one worker per
    #: shard), or a :class:`~lagompy.topic.Topic` (its messages' payloads, one worker per
    #: partition, read through a topic transport like a subscriber's).
    source: ClassVar[type[PersistentEntity[Any, Any, Any]] | Topic[Any]]
    #: The state of a key before its first event (a frozen dataclass).
    initial_state: ClassVar[Any]
    #: The classes of the messages :meth:`ProcessContext.after` may schedule.
    timer_messages: ClassVar[tuple[type, ...]] = ()
    #: More entity classes whose events the source's tag carries (for decoding).
    entities: ClassVar[Sequence[type[PersistentEntity[Any, Any, Any]]]] = ()

    def associate(self, event: Any, entity_id: str) -> str | None:
        """The association key of ``event`` of source entity ``entity_id`` (default: the
        entity id), or None for an event this manager ignores. With a topic source, ``event``
        is the message's payload and ``entity_id`` its key."""
        return entity_id

    async def handle(self, ctx: ProcessContext, state: S, event: Any) -> S:
        """React to one event of the key: send commands, schedule timers; return the new
        state (or call ``ctx.end()``)."""
        raise NotImplementedError

    async def on_timer(self, ctx: ProcessContext, state: S, message: Any) -> S:
        """React to a timer of the key that fell due; return the new state."""
        raise NotImplementedError

    # ------------------------------------------------------------------ configuration

    @classmethod
    def topic(cls) -> Topic[Any] | None:
        """The source when it is a topic."""
        source = getattr(cls, "source", None)
        return source if isinstance(source, Topic) else None

    @classmethod
    def source_entities(cls) -> tuple[type[PersistentEntity[Any, Any, Any]], ...]:
        """The entity classes whose events the manager reads (for decoding)."""
        topic = cls.topic()
        source = topic.source if topic is not None else cls.source
        assert isinstance(source, type)
        return (source, *cls.entities)

    @classmethod
    def tag_of(cls) -> Tag | ShardedTag:
        source = getattr(cls, "source", None)
        if isinstance(source, Topic):
            return source.tag
        tag = getattr(source, "tag", None)
        if not isinstance(tag, (Tag, ShardedTag)):
            raise ConfigurationError(
                f"process manager {cls.__qualname__}: source must be an entity class with a "
                f"tag (tag(...) or sharded_tag(...)), got {source!r} whose tag is {tag!r}"
            )
        return tag

    @classmethod
    def state_annotation(cls) -> Any:
        """The state's type: ``S`` of ``ProcessManager[S]``, else the initial state's class."""
        for klass in cls.__mro__:
            for base in klass.__dict__.get("__orig_bases__", ()):
                if typing.get_origin(base) is ProcessManager:
                    (arg,) = typing.get_args(base)
                    if not isinstance(arg, TypeVar) and arg is not Any:
                        return arg
        return type(cls.initial_state)

    @classmethod
    def validate(cls) -> None:
        """Raise ``ConfigurationError`` naming what is wrong with this manager class."""
        what = f"process manager {cls.__qualname__}"
        name = getattr(cls, "name", None)
        if (
            not isinstance(name, str)
            or not name
            or len(name) > 200
            or name == GLOBAL_TAG
            or ":" in name
        ):
            raise ConfigurationError(
                f"{what} needs a name (a non-empty string of at most 200 characters, without "
                f"':'), got {name!r}"
            )
        source = getattr(cls, "source", None)
        if not (
            isinstance(source, Topic)
            or (isinstance(source, type) and issubclass(source, PersistentEntity))
        ):
            raise ConfigurationError(
                f"{what}: source must be a PersistentEntity subclass or a lagompy.topic.Topic, "
                f"got {source!r}"
            )
        cls.tag_of()
        if not hasattr(cls, "initial_state"):
            raise ConfigurationError(f"{what} needs an initial_state (a frozen dataclass)")
        state = cls.initial_state
        if not dataclasses.is_dataclass(state) or isinstance(state, type):
            raise ConfigurationError(
                f"{what}: initial_state must be a dataclass instance, got {state!r}"
            )
        if not type(state).__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise ConfigurationError(
                f"{what}: initial_state must be a frozen dataclass (@dataclass(frozen=True))"
            )
        messages = cls.timer_messages
        if not isinstance(messages, tuple) or not all(
            isinstance(t, type) and dataclasses.is_dataclass(t) for t in messages
        ):
            raise ConfigurationError(
                f"{what}: timer_messages must be a tuple of dataclasses, got {messages!r}"
            )
        if cls.handle is ProcessManager.handle:
            raise ConfigurationError(f"{what} does not override handle(ctx, state, event)")
        if messages and cls.on_timer is ProcessManager.on_timer:
            raise ConfigurationError(
                f"{what} declares timer_messages but does not override "
                "on_timer(ctx, state, message)"
            )
