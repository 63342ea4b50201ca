"""The event journal: events and snapshots in SQL, and reading them back by offset.

* :class:`Journal` (``_journal.py``): appends batches of :class:`AtomicWrite` in one transaction
  (group commit), reads an entity's events and a tag's events in offset order. It is the front;
  what each database does its own way is a ``JournalBackend`` (``_backend.py``), one module per
  database (``_sqlite.py``, ``_postgres.py``), picked once when the journal is built. The values
  both sides share are in ``_model.py``.
* :class:`SnapshotStore` (``_snapshots.py``): saved states of entities.
* :func:`slice_of`, :class:`SliceRange` (``_slices.py``): the slice of every event, derived from
  its entity, and ranges of slices to read by (:meth:`Journal.read_slices`).
* :func:`open_storage` (``_storage.py``): the journal and the snapshot store of one database,
  sharing its connections, with lagompy's tables checked (or upgraded) on open.
* :func:`read_pages`, :func:`tail`, :class:`EventTailer` (``_tailing.py``): every event after an
  offset, once each, then the new ones as they commit (woken by PostgreSQL's NOTIFY through a
  :class:`JournalNotifier`); :class:`PageTailer`, the same tail loop by pages, which the
  consumer core (:mod:`lagompy.consumer`) drives.

It builds on :mod:`lagompy.sql` and knows nothing of Ray, shards or read sides: the runtime
(:mod:`lagompy.runtime`) writes through it, the read sides (:mod:`lagompy.readside`) read it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lagompy._lazy import on_first_use

if TYPE_CHECKING:
    from lagompy.journal._journal import (
        AtomicWrite,
        EventEnvelope,
        Journal,
        Replayed,
        TagPage,
        WriteResult,
    )
    from lagompy.journal._moving import MoveReport, move_slices
    from lagompy.journal._slices import SLICES, SliceRange, slice_of, slice_ranges
    from lagompy.journal._snapshots import Snapshot, SnapshotStore, SnapshotToSave
    from lagompy.journal._storage import (
        PlacedStorage,
        Storage,
        open_placed_storage,
        open_storage,
        serializer_for,
    )
    from lagompy.journal._tailing import (
        EventTailer,
        JournalNotifier,
        PageTailer,
        SqliteWatcher,
        Subscription,
        TailSettings,
        WakeReason,
        read_pages,
        tail,
    )

#: The public names, by the module that defines them; each is imported on first use
#: (:mod:`lagompy._lazy`).
_HOMES = {
    "lagompy.journal._journal": (
        "AtomicWrite",
        "EventEnvelope",
        "Journal",
        "Replayed",
        "TagPage",
        "WriteResult",
    ),
    "lagompy.journal._moving": (
        "MoveReport",
        "move_slices",
    ),
    "lagompy.journal._slices": (
        "SLICES",
        "SliceRange",
        "slice_of",
        "slice_ranges",
    ),
    "lagompy.journal._snapshots": (
        "Snapshot",
        "SnapshotStore",
        "SnapshotToSave",
    ),
    "lagompy.journal._storage": (
        "PlacedStorage",
        "Storage",
        "open_placed_storage",
        "open_storage",
        "serializer_for",
    ),
    "lagompy.journal._tailing": (
        "EventTailer",
        "JournalNotifier",
        "PageTailer",
        "SqliteWatcher",
        "Subscription",
        "TailSettings",
        "WakeReason",
        "read_pages",
        "tail",
    ),
}

__all__ = [
    "SLICES",
    "AtomicWrite",
    "EventEnvelope",
    "EventTailer",
    "Journal",
    "JournalNotifier",
    "MoveReport",
    "PageTailer",
    "PlacedStorage",
    "Replayed",
    "SliceRange",
    "Snapshot",
    "SnapshotStore",
    "SnapshotToSave",
    "SqliteWatcher",
    "Storage",
    "Subscription",
    "TagPage",
    "TailSettings",
    "WakeReason",
    "WriteResult",
    "move_slices",
    "open_placed_storage",
    "open_storage",
    "read_pages",
    "serializer_for",
    "slice_of",
    "slice_ranges",
    "tail",
]

if not TYPE_CHECKING:  # mypy sees the names above and flags any other
    __getattr__, __dir__ = on_first_use(__name__, _HOMES, globals())
