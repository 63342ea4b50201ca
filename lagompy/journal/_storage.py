"""Open the journal and snapshot store for a set of entity classes.

::

    async with open_storage("sqlite:///users.db", entities=[UserEntity]) as storage:
        await storage.journal.events("user", "42")
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lagompy._collector import tune_collector_once
from lagompy.closing import AsyncClosing, opener
from lagompy.entity import PersistentEntity, reply_type_of, union_members
from lagompy.errors import ConfigurationError
from lagompy.journal._journal import Journal
from lagompy.journal._placement import HOME, Placement
from lagompy.journal._snapshots import SnapshotStore
from lagompy.serialization import Serializer
from lagompy.settings import JournalSettings, make_settings
from lagompy.sql._database import Database
from lagompy.sql._migrate import ensure_schema


def serializer_for(entities: Iterable[type[PersistentEntity[Any, Any, Any]]]) -> Serializer:
    """A serializer that knows every command, event, state and reply type of these entities."""
    serializer = Serializer()
    for cls in entities:
        cls.validate()
        command_t, event_t, state_t = cls.message_types()
        serializer.register(command_t)
        serializer.register(event_t)
        serializer.register(state_t)
        for command_cls in union_members(command_t):
            if isinstance(command_cls, type):
                serializer.register(reply_type_of(command_cls))
    return serializer


@dataclass
class Storage(AsyncClosing):
    """The journal and the snapshot store of one database, sharing its connection pool."""

    database: Database
    serializer: Serializer
    journal: Journal
    snapshots: SnapshotStore

    @property
    def parts(self) -> dict[str, Storage]:
        """This storage by database name, as :attr:`PlacedStorage.parts` (the home one only)."""
        return {HOME: self}

    @property
    def settings(self) -> JournalSettings:
        """The settings of the journal this storage opened."""
        return self.database.settings

    async def close(self) -> None:
        await self.database.dispose()


@opener
async def open_storage(
    url: str | None = None,
    *,
    entities: Iterable[type[PersistentEntity[Any, Any, Any]]] = (),
    serializer: Serializer | None = None,
    settings: JournalSettings | None = None,
    **overrides: Any,
) -> Storage:
    """Connect to the journal database (``url``, else ``LAGOMPY_JOURNAL_URL``, else
    ``./lagompy.db``) and check that lagompy's tables are at this version's revision.

    ``settings`` and keyword ``overrides`` (fields of :class:`~lagompy.settings.JournalSettings`)
    combine by lagompy's one rule (:func:`~lagompy.settings.make_settings`): ``settings`` is the
    base, ``url`` and each keyword replace their field.

    With ``auto_migrate`` (by default on SQLite) missing or outdated tables are created or
    upgraded here; otherwise (by default on PostgreSQL) they raise ``ConfigurationError`` naming
    the ``lagompy migrate`` command to run. See :mod:`lagompy.sql`.

    Once the storage is open, this process's garbage collector is tuned as shard hosts tune
    theirs (:func:`~lagompy.tune_collector`, once per process), unless ``collector="default"``
    (``LAGOMPY_JOURNAL_COLLECTOR=default``; see :class:`~lagompy.settings.JournalSettings`).
    """
    if url is not None:
        overrides["url"] = url
    settings = make_settings(JournalSettings, settings, **overrides)
    if settings.databases:
        raise ConfigurationError(
            "open_storage() opens one database, and this journal is placed on several (home, "
            f"{', '.join(settings.databases)}): open them all with open_placed_storage(), or "
            "one with settings.placed_on(name)"
        )
    database = Database.create(settings)
    serializer = serializer or serializer_for(entities)
    journal = Journal(database, serializer)
    try:
        await ensure_schema(database)
    except BaseException:
        await database.dispose()
        raise
    if settings.collector == "tuned":
        # The process that writes or reads the journal: a batch's events, results and
        # envelopes are short-lived containers its collector would walk with its whole
        # start-up heap (see lagompy/_collector.py). Once per process.
        tune_collector_once()
    return Storage(database, serializer, journal, SnapshotStore(database, serializer))


@dataclass
class PlacedStorage(AsyncClosing):
    """The storage of each database of a journal placed on several (``JournalSettings.databases``),
    by database name (:data:`~lagompy.journal._placement.HOME` for the home one)."""

    placement: Placement
    parts: dict[str, Storage]

    @property
    def serializer(self) -> Serializer:
        """The serializer every database's journal shares."""
        return next(iter(self.parts.values())).serializer

    @property
    def settings(self) -> JournalSettings:
        """The settings of the whole journal (every database's)."""
        return self.placement.settings

    def of(self, entity_id: str) -> Storage:
        """The storage of the database that holds ``entity_id``."""
        return self.parts[self.placement.database_of(entity_id)]

    async def close(self) -> None:
        for storage in self.parts.values():
            await storage.close()


@opener
async def open_placed_storage(
    *,
    entities: Iterable[type[PersistentEntity[Any, Any, Any]]] = (),
    serializer: Serializer | None = None,
    settings: JournalSettings | None = None,
    **overrides: Any,
) -> PlacedStorage:
    """:func:`open_storage` for each database of the journal (one when ``databases`` is empty),
    sharing one serializer; a database that fails to open closes the ones opened before it."""
    settings = make_settings(JournalSettings, settings, **overrides)
    placement = Placement.of(settings)
    serializer = serializer or serializer_for(entities)
    parts: dict[str, Storage] = {}
    try:
        for name in placement.names:
            parts[name] = await open_storage(
                settings=placement.settings_of(name), serializer=serializer
            )
    except BaseException:
        for storage in parts.values():
            await storage.close()
        raise
    return PlacedStorage(placement, parts)
