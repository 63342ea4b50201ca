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
    CircuitBreakerOpen,
    CommandHandlerFailed,
    CommandRejected,
    ConcurrencyConflict,
    ConfigurationError,
    EventHandlerFailed,
    EventsMissing,
    InvalidCommand,
    JournalError,
    JournalUnavailable,
    LagompyError,
    NotFound,
    SerializationError,
    ServiceCallError,
    ServiceCallFailed,
    ServiceCallTimeout,
    ServiceUnavailable,
    UnhandledCommand,
    UnhandledEvent,
)
from lagompy.in_process import InProcessEntities, start_in_process
from lagompy.journal import AtomicWrite, EventEnvelope, Journal
from lagompy.readside import (
    ReadSideProcessor,
    ReadSideSettings,
    SqlReadSideProcessor,
    open_projections,
    start_readside,
)
from lagompy.refs import EntityRef
from lagompy.runtime import ShardedEntities, ShardedEntityRef, shutdown_app, start
from lagompy.serialization import Serializer, serializable
from lagompy.settings import JournalSettings, RuntimeSettings
from lagompy.snapshots import Snapshot, SnapshotStore
from lagompy.storage import Storage, open_storage
from lagompy.tailing import EventTailer, TailSettings, read_pages, tail

try:
    __version__ = version("lagompy")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "AtomicWrite",
    "CircuitBreakerOpen",
    "Command",
    "CommandHandlerFailed",
    "CommandRejected",
    "ConcurrencyConflict",
    "ConfigurationError",
    "Effect",
    "EntityRef",
    "EventEnvelope",
    "EventHandlerFailed",
    "EventTailer",
    "EventsMissing",
    "InProcessEntities",
    "InvalidCommand",
    "Journal",
    "JournalError",
    "JournalSettings",
    "JournalUnavailable",
    "LagompyError",
    "NotFound",
    "PersistentEntity",
    "ReadSideProcessor",
    "ReadSideSettings",
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
    "UnhandledCommand",
    "UnhandledEvent",
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
