"""lagompy: event-sourced persistent entities, sharded on Ray, with SQL journals, CQRS read
sides and circuit-broken service calls. A Lagom-style framework for Python.

The package's own exports are the names most programs need. The rest lives in one subpackage
per family, each one's ``__init__`` its public surface: :mod:`lagompy.sql` (connections, tables,
migrations), :mod:`lagompy.journal` (events, snapshots, tailing), :mod:`lagompy.runtime`
(entity refs, shards, hosts, Ray), :mod:`lagompy.readside` (processors, workers, projections),
:mod:`lagompy.service` (FastAPI glue, clients, circuit breakers) and :mod:`lagompy.testkit`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lagompy._collector import tune_collector
from lagompy._lazy import on_first_use
from lagompy.entity import (
    Command,
    Effect,
    PersistentEntity,
    ShardedTag,
    Tag,
    sharded_tag,
    stable_hash,
    tag,
)
from lagompy.errors import (
    AskTimeout,
    CircuitBreakerOpen,
    CommandHandlerFailed,
    CommandRejected,
    ConcurrencyConflict,
    ConfigurationError,
    DuplicateCommandId,
    EventHandlerFailed,
    EventsMissing,
    IdempotencyKeyReused,
    InvalidCommand,
    InvalidCommandId,
    InvalidEntityId,
    InvalidId,
    JournalError,
    JournalUnavailable,
    LagompyError,
    NotFound,
    OutcomeUnknown,
    Overloaded,
    RefusedValue,
    SerializationError,
    ServiceCallError,
    ServiceCallFailed,
    ServiceCallTimeout,
    ServiceUnavailable,
    UndeliverableOutcome,
    UnhandledCommand,
    UnhandledEvent,
    WriteRefused,
)

if TYPE_CHECKING:
    from lagompy.journal import (
        AtomicWrite,
        EventEnvelope,
        EventTailer,
        Journal,
        Snapshot,
        SnapshotStore,
        Storage,
        TailSettings,
        open_storage,
        read_pages,
        tail,
    )
    from lagompy.readside import (
        ReadSideProcessor,
        ReadSideSettings,
        SqlReadSideProcessor,
        open_projections,
        start_readside,
    )
    from lagompy.runtime import (
        EntityRef,
        EntityRuntime,
        InProcessEntities,
        ShardedEntities,
        ShardedEntityRef,
        shutdown_app,
        start,
        start_in_process,
    )
    from lagompy.serialization import Serializer, serializable
    from lagompy.settings import JournalSettings, RuntimeSettings

    __version__: str

#: The names that need SQLAlchemy, pydantic, asyncpg or Ray, by the module that defines them,
#: imported on first use (:mod:`lagompy._lazy`): ``import lagompy`` loads only the entity API,
#: the errors and the standard library.
_HOMES = {
    "lagompy.journal": (
        "AtomicWrite",
        "EventEnvelope",
        "EventTailer",
        "Journal",
        "Snapshot",
        "SnapshotStore",
        "Storage",
        "TailSettings",
        "open_storage",
        "read_pages",
        "tail",
    ),
    "lagompy.readside": (
        "ReadSideProcessor",
        "ReadSideSettings",
        "SqlReadSideProcessor",
        "open_projections",
        "start_readside",
    ),
    "lagompy.runtime": (
        "EntityRef",
        "EntityRuntime",
        "InProcessEntities",
        "ShardedEntities",
        "ShardedEntityRef",
        "shutdown_app",
        "start",
        "start_in_process",
    ),
    "lagompy.serialization": (
        "Serializer",
        "serializable",
    ),
    "lagompy.settings": (
        "JournalSettings",
        "RuntimeSettings",
    ),
}

__all__ = [
    "AskTimeout",
    "AtomicWrite",
    "CircuitBreakerOpen",
    "Command",
    "CommandHandlerFailed",
    "CommandRejected",
    "ConcurrencyConflict",
    "ConfigurationError",
    "DuplicateCommandId",
    "Effect",
    "EntityRef",
    "EntityRuntime",
    "EventEnvelope",
    "EventHandlerFailed",
    "EventTailer",
    "EventsMissing",
    "IdempotencyKeyReused",
    "InProcessEntities",
    "InvalidCommand",
    "InvalidCommandId",
    "InvalidEntityId",
    "InvalidId",
    "Journal",
    "JournalError",
    "JournalSettings",
    "JournalUnavailable",
    "LagompyError",
    "NotFound",
    "OutcomeUnknown",
    "Overloaded",
    "PersistentEntity",
    "ReadSideProcessor",
    "ReadSideSettings",
    "RefusedValue",
    "RuntimeSettings",
    "SerializationError",
    "Serializer",
    "ServiceCallError",
    "ServiceCallFailed",
    "ServiceCallTimeout",
    "ServiceUnavailable",
    "ShardedEntities",
    "ShardedEntityRef",
    "ShardedTag",
    "Snapshot",
    "SnapshotStore",
    "SqlReadSideProcessor",
    "Storage",
    "Tag",
    "TailSettings",
    "UndeliverableOutcome",
    "UnhandledCommand",
    "UnhandledEvent",
    "WriteRefused",
    "__version__",
    "open_projections",
    "open_storage",
    "read_pages",
    "serializable",
    "sharded_tag",
    "shutdown_app",
    "stable_hash",
    "start",
    "start_in_process",
    "start_readside",
    "tag",
    "tail",
    "tune_collector",
]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lagompy")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0.0.0"


if not TYPE_CHECKING:  # mypy sees the names above and flags any other
    _getattr, __dir__ = on_first_use(__name__, _HOMES, globals())

    def __getattr__(name: str) -> Any:
        if name == "__version__":
            value = globals()["__version__"] = _version()  # read once, from the metadata
            return value
        return _getattr(name)
