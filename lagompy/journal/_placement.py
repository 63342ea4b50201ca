"""Several databases: where each slice's events live.

A journal is one database by default. With ``JournalSettings.databases`` it is several: each
named database holds the slices it is given, and the *home* database (``JournalSettings.url``)
holds every other slice. Every database has lagompy's whole schema (its own offsets, ordering
markers and NOTIFY channel); an entity's events, snapshots, stored replies and deletions are all
in the database of its slice, so everything about one entity is one database's business:

* writers (the runtime's shard hosts) send each entity's writes to its slice's database
  (:class:`Placement.database_of`), one transaction per database a batch touches;
* consumers follow each database on its own: a consumer of a tag has one partition per
  (tag, database), keyed by :func:`partition_key` (the tag itself on the home database, so a
  journal that was one database keeps its positions when it gets a second).

Offsets are per database: an event's offset is its position in its database, and nothing orders
events of two databases (nor of two slices of one: see docs/explanation/consistency.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from lagompy.errors import ConfigurationError
from lagompy.journal._slices import SLICES, slice_of
from lagompy.settings import JournalSettings, parse_slice_ranges

#: The name of the home database (the one ``JournalSettings.url`` names) in a placement.
HOME = ""

#: What joins a tag and a database's name in a partition key (``user-events-2@b``).
PARTITION_SEPARATOR = "@"


def partition_key(tag: str, database: str) -> str:
    """The key of a consumer's partition that follows ``tag`` on ``database``: the tag itself on
    the home database, ``tag@database`` on another."""
    return tag if database == HOME else f"{tag}{PARTITION_SEPARATOR}{database}"


@dataclass(frozen=True)
class Placement:
    """Which database holds each slice, from a journal's settings
    (:meth:`Placement.of`)."""

    settings: JournalSettings
    #: The databases' names, the home one (:data:`HOME`) first.
    names: tuple[str, ...]
    #: The database of each slice, by slice number.
    owners: tuple[str, ...]

    @classmethod
    def of(cls, settings: JournalSettings) -> Placement:
        """The placement these settings describe. A database given the home database's url
        and schema is refused here, where slices are placed (a connection to one database
        made from settings that also name others is no placement)."""
        for name, placed in settings.databases.items():
            schema = placed.postgres_schema or settings.postgres_schema
            if (placed.url, schema) == (settings.url, settings.postgres_schema):
                raise ConfigurationError(
                    f"database {name!r} of the journal has the home database's url and schema: "
                    "each database of a journal holds its own tables (give it another url or "
                    "postgres_schema)"
                )
        owners = [HOME] * SLICES
        for name, placed in settings.databases.items():
            for first, last in parse_slice_ranges(placed.slices):
                owners[first : last + 1] = [name] * (last - first + 1)
        return cls(settings, (HOME, *settings.databases), tuple(owners))

    @property
    def several(self) -> bool:
        """Whether the journal is on more than one database."""
        return len(self.names) > 1

    def database_of(self, entity_id: str) -> str:
        """The name of the database that holds ``entity_id``'s events."""
        return self.owners[slice_of(entity_id)]

    def settings_of(self, name: str) -> JournalSettings:
        """The settings that open database ``name`` alone."""
        return self.settings.placed_on(name)

    def slices_of(self, name: str) -> tuple[int, ...]:
        """The slices database ``name`` holds."""
        if name not in self.names:
            raise ConfigurationError(f"the journal has no database named {name!r}")
        return tuple(s for s, owner in enumerate(self.owners) if owner == name)

    def partitions(self, tag: str) -> Iterator[tuple[str, str]]:
        """(partition key, database name) of each partition that follows ``tag``. A tag that
        ends in ``@<name of a database>`` would read as another tag's partition key: refused."""
        base, sep, suffix = tag.rpartition(PARTITION_SEPARATOR)
        if sep and suffix in self.names and suffix != HOME:
            raise ConfigurationError(
                f"tag {tag!r} ends in {PARTITION_SEPARATOR}{suffix}, which names a partition of "
                f"tag {base!r} on database {suffix!r}: rename the tag or the database"
            )
        for name in self.names:
            yield partition_key(tag, name), name

    def split(self, key: str) -> tuple[str, str]:
        """(tag, database name) of a partition key (:func:`partition_key`)."""
        tag, sep, name = key.rpartition(PARTITION_SEPARATOR)
        if sep and name in self.names and name != HOME:
            return tag, name
        return key, HOME

    def describe(self, name: str) -> str:
        """``"home"`` or ``"database 'b'"``, for messages."""
        return "the home database" if name == HOME else f"database {name!r}"
