"""The entity API: commands, effects, tags and ``PersistentEntity``.

This layer is pure: no I/O, no Ray, no SQL. A command handler looks at the current state and a
command and returns an :class:`Effect` (events to persist and a reply, a reply alone, or a
rejection); an event handler folds one event into the state.
"""

from __future__ import annotations

import types
import typing
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, is_dataclass
from typing import Any, ClassVar, Generic, NoReturn, TypeVar, get_args, get_origin

from lagompy.errors import CommandRejected, ConfigurationError, UnhandledCommand, UnhandledEvent

R = TypeVar("R")
C = TypeVar("C")
E = TypeVar("E")
S = TypeVar("S")

#: Version of the hash that maps entity ids to shards. Stored with the topology so that two
#: processes can never disagree on where an entity lives.
HASH_VERSION = 1


def stable_hash(value: str) -> int:
    """A hash of ``value``, the same in every process and Python version (CRC-32 of UTF-8)."""
    return zlib.crc32(value.encode("utf-8"))


# --------------------------------------------------------------------------- commands


class Command(Generic[R]):
    """Base class of commands; ``R`` is the type of the reply.

    Commands are frozen dataclasses::

        @dataclass(frozen=True)
        class RegisterUser(Command[User]):
            name: str
    """

    __slots__ = ()


def reply_type_of(command_cls: type) -> Any:
    """The reply type ``R`` a command class declares through ``Command[R]`` (``Any`` if none)."""
    for klass in command_cls.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            if get_origin(base) is Command:
                (reply,) = get_args(base)
                if isinstance(reply, TypeVar):
                    return Any
                return reply
    return Any


# --------------------------------------------------------------------------- tags

#: The most shards a sharded tag may have.
MAX_SHARDS = 1024
#: The longest entity id, command id or tag the journal's tables hold (characters): the
#: journal's id rule (``lagompy.journal.MAX_ID_LENGTH``), checked here for tags when they are
#: declared.
MAX_ID_LENGTH = 255


def _check_tag_length(name: str, longest: str) -> None:
    if len(longest) > MAX_ID_LENGTH:
        raise ConfigurationError(
            f"tag {name[:40]!r}... is too long: its events would carry {len(longest)} "
            f"characters where the journal stores at most {MAX_ID_LENGTH}"
        )


@dataclass(frozen=True)
class Tag:
    """A plain tag: every event of the entity carries ``name``."""

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigurationError(f"a tag needs a non-empty name, got {self.name!r}")
        _check_tag_length(self.name, self.name)

    def for_entity(self, entity_id: str) -> str:
        return self.name

    @property
    def all_tags(self) -> tuple[str, ...]:
        return (self.name,)


@dataclass(frozen=True)
class ShardedTag:
    """A tag split into ``shards`` parts so read sides can work on them in parallel.

    The event of entity ``id`` carries ``f"{name}{stable_hash(id) % shards}"``.
    """

    name: str
    shards: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigurationError(f"a sharded tag needs a non-empty name, got {self.name!r}")
        shards = self.shards
        if not isinstance(shards, int) or isinstance(shards, bool) or not 0 < shards <= MAX_SHARDS:
            raise ConfigurationError(
                f"sharded tag {self.name!r} needs shards from 1 to {MAX_SHARDS} (each shard is a "
                f"partition: a worker and a stored position per read side), got {shards!r}"
            )
        _check_tag_length(self.name, f"{self.name}{shards - 1}")

    def shard_of(self, entity_id: str) -> int:
        return stable_hash(entity_id) % self.shards

    def for_entity(self, entity_id: str) -> str:
        return f"{self.name}{self.shard_of(entity_id)}"

    @property
    def all_tags(self) -> tuple[str, ...]:
        return tuple(f"{self.name}{i}" for i in range(self.shards))


def tag(name: str) -> Tag:
    """A plain tag."""
    return Tag(name)


def sharded_tag(name: str, shards: int) -> ShardedTag:
    """A tag split into ``shards`` shards by a stable hash of the entity id."""
    return ShardedTag(name, shards)


# --------------------------------------------------------------------------- effects


@dataclass(frozen=True)
class Effect(Generic[S]):
    """What a command handler decided.

    Build one with the static constructors::

        Effect.persist(UserRegistered(...)).then_reply(lambda state: state)
        Effect.persist(e1, e2)                 # atomically; the reply is None
        Effect.reply(state)                    # read-only command: nothing persisted
        Effect.reject(InvalidCommand("..."))   # or simply raise it
        Effect.unhandled()                     # -> UnhandledCommand
    """

    events: tuple[Any, ...] = ()
    reply_fn: Callable[[S], Any] | None = None
    reply_value: Any = None
    side_effects: tuple[Callable[[S], Any], ...] = ()
    rejection: CommandRejected | None = None
    is_unhandled: bool = False

    @staticmethod
    def persist(*events: Any) -> Effect[Any]:
        """Persist these events atomically (all or none); then reply ``None`` unless told.

        No events persists nothing, as ``Effect.persist_all([])``: the command is read-only
        and ``then_reply`` gets the unchanged state."""
        return _effect({"events": events})

    @staticmethod
    def persist_all(events: Iterable[Any]) -> Effect[Any]:
        """Persist a sequence of events atomically, as ``Effect.persist(*events)``; an empty
        one persists nothing (a handler that computes its events needs no special case)."""
        return _effect({"events": tuple(events)})

    @staticmethod
    def reply(value: Any = None) -> Effect[Any]:
        """Reply without persisting anything (a read-only command)."""
        return _effect({"reply_value": value})

    @staticmethod
    def none() -> Effect[Any]:
        """Persist nothing and reply ``None``."""
        return _effect({})

    @staticmethod
    def reject(rejection: CommandRejected) -> Effect[Any]:
        """Reject the command: nothing is persisted; the caller gets ``rejection``."""
        if not isinstance(rejection, CommandRejected):
            raise TypeError("Effect.reject takes a CommandRejected (or a subclass)")
        return _effect({"rejection": rejection})

    @staticmethod
    def unhandled() -> Effect[Any]:
        """The handler has no case for this command in this state (-> UnhandledCommand)."""
        return _effect({"is_unhandled": True})

    def then_reply(self, reply: Callable[[S], Any] | Any) -> Effect[S]:
        """Reply once the events are durable: a value, or a function of the new state."""
        fields = self.__dict__.copy()
        if callable(reply):
            fields["reply_fn"] = reply
            fields["reply_value"] = None
        else:
            fields["reply_fn"] = None
            fields["reply_value"] = reply
        return _effect(fields)

    def then_run(self, side_effect: Callable[[S], Any]) -> Effect[S]:
        """Run ``side_effect(new_state)`` after the events are durable (at most once).

        An exception it raises is logged; it does not undo the events or fail the command.
        A coroutine function is awaited by the runtime.
        """
        fields = self.__dict__.copy()
        fields["side_effects"] = (*self.side_effects, side_effect)
        return _effect(fields)


_new_effect = object.__new__


def _effect(fields: dict[str, Any]) -> Effect[Any]:
    """An Effect with ``fields`` set and the other fields at their defaults, built without the
    frozen dataclass ``__init__`` (one ``object.__setattr__`` per field): this runs once or
    twice per command. The defaults are the dataclass's class attributes, so an unset field
    reads as its default, and ``==``, ``repr`` and ``dataclasses.replace`` behave as usual."""
    effect: Effect[Any] = _new_effect(Effect)
    effect.__dict__.update(fields)
    return effect


# --------------------------------------------------------------------------- entities


class PersistentEntity(Generic[C, E, S]):
    """An event-sourced entity. Subclass it with concrete command, event and state types::

        class UserEntity(PersistentEntity[UserCommand, UserEvent, UserState]):
            type_name = "user"
            initial_state = NoUser()
            tag = sharded_tag("user-events", shards=4)
            snapshot_every = 100

            def on_command(self, state, command) -> Effect: ...
            def on_event(self, state, event) -> UserState: ...

    ``type_name`` names the entity in the journal (keep it stable). ``tag`` (a plain or sharded
    tag, or ``None``) is attached to every event for read sides. ``snapshot_every`` saves a
    snapshot every N events; ``None`` or ``0`` turns snapshots off.
    """

    type_name: ClassVar[str]
    initial_state: ClassVar[Any]
    tag: ClassVar[Tag | ShardedTag | None] = None
    snapshot_every: ClassVar[int | None] = 100

    def __init__(self, entity_id: str) -> None:
        self.entity_id = entity_id

    def on_command(self, state: S, command: C) -> Effect[S]:
        raise NotImplementedError

    def on_event(self, state: S, event: E) -> S:
        raise NotImplementedError

    def unhandled_event(self, state: S, event: E) -> NoReturn:
        """Raise ``UnhandledEvent`` naming the state and the event: end ``on_event`` with it."""
        raise UnhandledEvent(
            f"{type(self).__qualname__}.on_event does not handle event "
            f"{type(event).__qualname__} in state {type(state).__qualname__} "
            f"(entity {self.entity_id!r})"
        )

    def tags_for(self, event: E) -> tuple[str, ...]:
        """The tags stored with ``event``; by default the entity's ``tag`` for this entity id."""
        t = type(self).tag
        return () if t is None else (t.for_entity(self.entity_id),)

    # ------------------------------------------------------------------ class introspection

    @classmethod
    def message_types(cls) -> tuple[Any, Any, Any]:
        """The (command, event, state) annotations given to ``PersistentEntity[C, E, S]``."""
        for klass in cls.__mro__:
            for base in getattr(klass, "__orig_bases__", ()):
                if get_origin(base) is PersistentEntity:
                    args = get_args(base)
                    if len(args) == 3 and not any(isinstance(a, TypeVar) for a in args):
                        return args[0], args[1], args[2]
        raise ConfigurationError(
            f"{cls.__qualname__} must subclass PersistentEntity[Command, Event, State] "
            "with concrete types"
        )

    @classmethod
    def validate(cls) -> None:
        """Check the class definition; raise ``ConfigurationError`` naming what is wrong."""
        name = cls.__qualname__
        type_name = getattr(cls, "type_name", None)
        if not isinstance(type_name, str) or not type_name:
            raise ConfigurationError(f"{name} needs a non-empty `type_name` string")
        if not hasattr(cls, "initial_state"):
            raise ConfigurationError(f"{name} needs an `initial_state`")
        if cls.on_command is PersistentEntity.on_command:
            raise ConfigurationError(f"{name} must define on_command(self, state, command)")
        if cls.on_event is PersistentEntity.on_event:
            raise ConfigurationError(f"{name} must define on_event(self, state, event)")
        every = cls.snapshot_every
        if every is not None and (not isinstance(every, int) or every < 0):
            raise ConfigurationError(f"{name}.snapshot_every must be None or an int >= 0")
        tag_value = cls.tag
        if tag_value is not None and not isinstance(tag_value, (Tag, ShardedTag)):
            raise ConfigurationError(
                f"{name}.tag must be lagompy.tag(...) or lagompy.sharded_tag(...), "
                f"not {tag_value!r}"
            )
        _, _, state_t = cls.message_types()
        if not is_dataclass(cls.initial_state):
            raise ConfigurationError(f"{name}.initial_state must be a dataclass instance")
        if not _isinstance_of_annotation(cls.initial_state, state_t):
            raise ConfigurationError(
                f"{name}.initial_state is a {type(cls.initial_state).__qualname__}, "
                f"which is not one of the declared state types"
            )


def union_members(annotation: Any) -> tuple[Any, ...]:
    """The members of a union annotation (or the annotation itself)."""
    origin = get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return tuple(get_args(annotation))
    return (annotation,)


def _isinstance_of_annotation(value: Any, annotation: Any) -> bool:
    for member in union_members(annotation):
        if member is Any:
            return True
        if isinstance(member, type) and isinstance(value, member):
            return True
    return False


def unhandled_command(
    entity: PersistentEntity[Any, Any, Any], state: Any, command: Any
) -> UnhandledCommand:
    return UnhandledCommand(
        f"{type(entity).__qualname__} {entity.entity_id!r} does not handle "
        f"{type(command).__qualname__} in state {type(state).__qualname__}"
    )


__all__ = [
    "HASH_VERSION",
    "Command",
    "Effect",
    "PersistentEntity",
    "ShardedTag",
    "Tag",
    "reply_type_of",
    "sharded_tag",
    "stable_hash",
    "tag",
    "union_members",
]
