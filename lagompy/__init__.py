"""lagompy: event-sourced persistent entities, sharded on Ray, with SQL journals, CQRS read
sides and circuit-broken service calls. A Lagom-style framework for Python."""

from importlib.metadata import PackageNotFoundError, version

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
from lagompy.journal._journal import AtomicWrite, EventEnvelope, Journal
from lagompy.journal._snapshots import Snapshot, SnapshotStore
from lagompy.journal._storage import Storage, open_storage
from lagompy.journal._tailing import EventTailer, TailSettings, read_pages, tail
from lagompy.readside._processor import ReadSideProcessor, SqlReadSideProcessor
from lagompy.readside._projections import open_projections, start_readside
from lagompy.readside._settings import ReadSideSettings
from lagompy.runtime._in_process import InProcessEntities, start_in_process
from lagompy.runtime._ray import ShardedEntities, ShardedEntityRef, shutdown_app, start
from lagompy.runtime._refs import EntityRef
from lagompy.serialization import Serializer, serializable
from lagompy.settings import JournalSettings, RuntimeSettings

try:
    __version__ = version("lagompy")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

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
]
