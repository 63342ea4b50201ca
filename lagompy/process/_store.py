"""A process manager's states and timers in SQL: :class:`ProcessStore`.

States (``lagompy_process_states``) and timers (``lagompy_process_timers``) are read outside
the worker's transaction (under its lease nobody else writes its keys) and written inside it,
with the position: :meth:`ProcessStore.write` checks the version each state was read at, so a
key written meanwhile (by a worker of another partition) fails the transaction instead of
losing an update.

On a journal placed on several databases, an entity whose slice moved to another database
(``lagompy journal move-slices``) goes on in the partition of the same tag on that database: a
key stored by a *sibling* partition (the same tag, another database) is taken over, its row and
timers moving to the new partition with its next commit; a key of another tag is still a
conflict."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable
from typing import Any

from sqlalchemy import and_, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from lagompy.errors import ProcessKeyConflict
from lagompy.journal._journal import now_us
from lagompy.process._manager import ProcessContext, ScheduledTimer, offset_key
from lagompy.readside._store import FAILED, OffsetStore
from lagompy.serialization import Serializer
from lagompy.sql import _schema as schema
from lagompy.sql._database import Database

__all__ = ["TIMER", "KeyEntry", "ProcessStore", "TimerRow", "drop_stopping_timers"]

#: The entity type of a failure line about a timer (its entity id is the timer's id).
TIMER = "timer"

_S = schema.process_states
_T = schema.process_timers


@dataclasses.dataclass
class KeyEntry:
    """One key's state while a batch handles it: as read (``version``: 0 when it has no row),
    and what the handlers did to it."""

    key: str
    version: int
    state: Any
    #: The state as read (the row is written only when it changed).
    stored: Any
    initial: Any
    #: The stored row and timers go (a handler ended the key; a later event of the batch may
    #: start it again from ``initial``).
    reset: bool = False
    #: The key is ended (no state to store).
    ended: bool = False
    scheduled: list[ScheduledTimer] = dataclasses.field(default_factory=list)
    cancelled: list[str] = dataclasses.field(default_factory=list)
    #: The partition that stored the key, when it is a sibling of the one handling it (the
    #: key's entity moved to another database): the row and timers move with the commit.
    moved_from: str | None = None

    def current(self) -> Any:
        """The state the next handler gets (``initial`` after an end)."""
        return self.initial if self.ended else self.state

    def apply(self, state: Any, ctx: ProcessContext) -> None:
        """What one handler returned and did."""
        if ctx.ended:
            self.reset = self.ended = True
            self.state, self.scheduled, self.cancelled = self.initial, [], []
            return
        self.ended = False
        self.cancelled += ctx.cancelled
        dropped = set(ctx.cancelled)
        self.scheduled = [t for t in self.scheduled if t.timer_id not in dropped] + ctx.scheduled
        self.state = state


@dataclasses.dataclass(frozen=True)
class TimerRow:
    timer_id: str
    key: str
    due_us: int
    message: Any


class ProcessStore:
    """The states and timers of one process manager (``manager``: its name)."""

    def __init__(self, database: Database, manager: str, serializer: Serializer) -> None:
        self.database = database
        self.manager = manager
        self.serializer = serializer

    async def load(
        self, key: str, tag: str, initial: Any, *, siblings: Collection[str] = ()
    ) -> KeyEntry:
        """The state of ``key`` (``initial`` when it has none), checked to belong to ``tag``
        (or to one of its ``siblings``: see :meth:`load_many`)."""
        return (await self.load_many([key], tag, initial, siblings=siblings))[key]

    async def load_many(
        self, keys: list[str], tag: str, initial: Any, *, siblings: Collection[str] = ()
    ) -> dict[str, KeyEntry]:
        """The states of ``keys`` (``initial`` for those with none), in one query, checked to
        belong to partition ``tag``, or to one of its ``siblings`` (the partitions of the same
        journal tag on the other databases of a placed journal: the key's entity moved; the
        entry's ``moved_from`` says from where)."""
        async with self.database.read() as conn:
            rows = (
                await conn.execute(
                    select(
                        _S.c.key,
                        _S.c.tag,
                        _S.c.version,
                        _S.c.state_type,
                        _S.c.state_version,
                        _S.c.payload,
                    ).where(_S.c.manager == self.manager, _S.c.key.in_(keys))
                )
            ).all()
        found = {key: KeyEntry(key, 0, initial, initial, initial) for key in keys}
        for row in rows:
            if row.tag != tag and row.tag not in siblings:
                raise ProcessKeyConflict(
                    f"process manager {self.manager!r}: key {row.key!r} belongs to partition "
                    f"tag {row.tag!r}, and an event of tag {tag!r} associates with it: a key's "
                    "events must come from one partition of the source (associate by the "
                    "source entity's id, or by a value all of one entity's events carry)"
                )
            state = self.serializer.decode(row.state_type, row.state_version, row.payload)
            entry = KeyEntry(row.key, row.version, state, state, initial)
            if row.tag != tag:
                entry.moved_from = row.tag
            found[row.key] = entry
        return found

    async def write(self, conn: AsyncConnection, tag: str, entries: Iterable[KeyEntry]) -> None:
        """Store what the handlers did to ``entries`` in ``conn``'s transaction."""
        now = now_us()
        for entry in entries:
            owned = and_(_S.c.manager == self.manager, _S.c.key == entry.key)
            timers_of_key = and_(_T.c.manager == self.manager, _T.c.key == entry.key)
            version, stored = entry.version, entry.stored
            if entry.moved_from is not None and version and not entry.reset:
                # The key's entity moved to this partition's database: its row and its pending
                # timers follow (fenced by the version, as any write of the row).
                done = await conn.execute(
                    update(_S)
                    .where(owned, _S.c.version == version, _S.c.tag == entry.moved_from)
                    .values(tag=tag, version=version + 1)
                )
                self._check(done.rowcount, entry)
                await conn.execute(update(_T).where(timers_of_key).values(tag=tag))
                version += 1
            if entry.reset:  # ended (and maybe started again): the old row and timers go
                if version:
                    done = await conn.execute(delete(_S).where(owned, _S.c.version == version))
                    self._check(done.rowcount, entry)
                await conn.execute(delete(_T).where(timers_of_key))
                version, stored = 0, entry.initial
                if entry.ended:
                    continue
            if entry.state != stored or (version == 0 and entry.scheduled):
                name, state_version, payload = self.serializer.encode(entry.state)
                values = {
                    "state_type": name,
                    "state_version": state_version,
                    "payload": payload,
                    "updated_us": now,
                }
                if version == 0:
                    await conn.execute(
                        insert(_S).values(
                            manager=self.manager, key=entry.key, tag=tag, version=1, **values
                        )
                    )
                else:
                    done = await conn.execute(
                        update(_S)
                        .where(owned, _S.c.version == version)
                        .values(version=version + 1, **values)
                    )
                    self._check(done.rowcount, entry)
            if entry.cancelled and not entry.reset:
                await conn.execute(
                    delete(_T).where(timers_of_key, _T.c.timer_id.in_(entry.cancelled))
                )
            if entry.scheduled:
                ids = [t.timer_id for t in entry.scheduled]
                # A replay (after set-offset) schedules the same ids again: the new ones win.
                await conn.execute(
                    delete(_T).where(_T.c.manager == self.manager, _T.c.timer_id.in_(ids))
                )
                rows = []
                for t in entry.scheduled:
                    name, message_version, payload = self.serializer.encode(t.message)
                    rows.append(
                        {
                            "manager": self.manager,
                            "timer_id": t.timer_id,
                            "tag": tag,
                            "key": entry.key,
                            "due_us": t.due_us,
                            "message_type": name,
                            "message_version": message_version,
                            "payload": payload,
                        }
                    )
                await conn.execute(insert(_T), rows)

    def _check(self, rowcount: int, entry: KeyEntry) -> None:
        if rowcount != 1:
            raise ProcessKeyConflict(
                f"process manager {self.manager!r}: the state of key {entry.key!r} changed "
                f"since it was read (version {entry.version}): another worker wrote it"
            )

    async def fired(self, conn: AsyncConnection, timer_id: str) -> None:
        """Delete the timer being fired, in the transaction that stores its effect."""
        done = await conn.execute(
            delete(_T).where(_T.c.manager == self.manager, _T.c.timer_id == timer_id)
        )
        if done.rowcount != 1:
            raise ProcessKeyConflict(
                f"process manager {self.manager!r}: timer {timer_id!r} is gone (fired or "
                "cancelled by another worker)"
            )

    async def drop_timer(self, timer_id: str) -> None:
        """Delete a timer (an operator skips it)."""
        async with self.database.write() as conn:
            await conn.execute(
                delete(_T).where(_T.c.manager == self.manager, _T.c.timer_id == timer_id)
            )

    async def due(self, tag: str, at_us: int, limit: int) -> list[TimerRow]:
        """The timers of ``tag`` due at ``at_us``, the earliest first."""
        async with self.database.read() as conn:
            rows = (
                await conn.execute(
                    select(_T)
                    .where(_T.c.manager == self.manager, _T.c.tag == tag, _T.c.due_us <= at_us)
                    .order_by(_T.c.due_us, _T.c.timer_id)
                    .limit(limit)
                )
            ).all()
        return [
            TimerRow(
                r.timer_id,
                r.key,
                r.due_us,
                self.serializer.decode(r.message_type, r.message_version, r.payload),
            )
            for r in rows
        ]

    async def next_due(self, tag: str) -> int | None:
        """When the next timer of ``tag`` is due (microseconds), or None."""
        async with self.database.read() as conn:
            value = (
                await conn.execute(
                    select(func.min(_T.c.due_us)).where(
                        _T.c.manager == self.manager, _T.c.tag == tag
                    )
                )
            ).scalar()
        return None if value is None else int(value)

    async def state(self, key: str) -> Any | None:
        """The stored state of ``key`` (None: it has none: never handled, or ended)."""
        async with self.database.read() as conn:
            row = (
                await conn.execute(
                    select(_S.c.state_type, _S.c.state_version, _S.c.payload).where(
                        _S.c.manager == self.manager, _S.c.key == key
                    )
                )
            ).first()
        if row is None:
            return None
        return self.serializer.decode(row.state_type, row.state_version, row.payload)

    async def counts(self) -> dict[str, tuple[int, int]]:
        """Per partition tag: (keys with a state, pending timers)."""
        out: dict[str, tuple[int, int]] = {}
        async with self.database.read() as conn:
            for tag, n in await conn.execute(
                select(_S.c.tag, func.count())
                .where(_S.c.manager == self.manager)
                .group_by(_S.c.tag)
            ):
                out[tag] = (int(n), 0)
            for tag, n in await conn.execute(
                select(_T.c.tag, func.count())
                .where(_T.c.manager == self.manager)
                .group_by(_T.c.tag)
            ):
                out[tag] = (out.get(tag, (0, 0))[0], int(n))
        return out


async def drop_stopping_timers(offsets: OffsetStore, states: ProcessStore, tag: str | None) -> None:
    """Before a skip: drop the timers that stopped partitions of the manager (``tag``: of one
    partition), whose positions a skip leaves where they are."""
    for row in await offsets.rows(offset_key(states.manager)):
        if row.state == FAILED and row.error_entity_type == TIMER and row.error_entity_id:
            if tag is None or row.tag == tag:
                await states.drop_timer(row.error_entity_id)
