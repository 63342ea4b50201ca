"""The journal on SQLite.

Writers take turns: every write transaction starts with ``BEGIN IMMEDIATE``, which takes
SQLite's write lock up front, so offsets are allocated here, under the lock, and commit in order
without a further fence; both tables are written with plain executemany. Lists of keys travel as
one JSON parameter (``json_each``). The offsets continue ``AUTOINCREMENT``'s counter, so an
offset is never handed out again after a deletion.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import delete, insert, text, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from lagompy.journal._backend import (
    EVENT_COLUMNS,
    Batch,
    DriverStatements,
    JournalBackend,
    check_expected,
    record_offsets,
    refused_encoding,
)
from lagompy.journal._model import WriteResult, now_us
from lagompy.sql import _schema as schema
from lagompy.sql._database import Database, in_sqlite_thread, translate_errors

#: The highest offset ever used (AUTOINCREMENT keeps it in sqlite_sequence, even after deletes),
#: then the highest sequence number of each entity of the batch, deletions included.
_SQLITE_CHECK = """
SELECT NULL, NULL,
       max(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'lagompy_events'), 0),
           COALESCE((SELECT max(global_offset) FROM lagompy_events), 0))
UNION ALL
SELECT * FROM (
SELECT json_extract(k.value, '$[0]') AS t, json_extract(k.value, '$[1]') AS i,
       max(COALESCE((SELECT max(e.seq_nr) FROM lagompy_events e
                     WHERE e.entity_type = json_extract(k.value, '$[0]')
                       AND e.entity_id = json_extract(k.value, '$[1]')), 0),
           COALESCE((SELECT d.deleted_to FROM lagompy_deletions d
                     WHERE d.entity_type = json_extract(k.value, '$[0]')
                       AND d.entity_id = json_extract(k.value, '$[1]')), 0))
FROM json_each(?) AS k
)
"""
_SQLITE_INSERT_EVENTS = (
    f"INSERT INTO lagompy_events ({', '.join(EVENT_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(EVENT_COLUMNS))})"
)
_SQLITE_INSERT_TAGS = "INSERT INTO lagompy_event_tags (tag, global_offset) VALUES (?, ?)"
_SQLITE_INSERT_REPLIES = (
    "INSERT INTO lagompy_command_replies (entity_type, entity_id, command_id, seq_nr, payload) "
    "VALUES (?, ?, ?, ?, ?)"
)
_SQLITE_STORED_REPLIES = """
SELECT r.entity_type, r.entity_id, r.command_id, r.payload
FROM json_each(:keys) AS k
JOIN lagompy_command_replies r
  ON r.entity_type = json_extract(k.value, '$[0]')
 AND r.entity_id = json_extract(k.value, '$[1]')
 AND r.command_id = json_extract(k.value, '$[2]')
"""


def _fetch_all(conn: sqlite3.Connection, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
    """In the driver's thread: ``sql``'s rows, all fetched (nothing left stepping)."""
    return conn.execute(sql, args).fetchall()


#: SQLite's extended result codes of a unique (or primary key) constraint violation.
_SQLITE_UNIQUE_CODES = (2067, 1555)


class SqliteBackend(JournalBackend):
    """The journal's SQLite flavour (see the module's docstring)."""

    def __init__(self, database: Database, *, ordering_fence: bool = True) -> None:
        self.database = database
        #: Kept for the front's sake: SQLite's writers always take turns (``BEGIN IMMEDIATE``).
        self.ordering_fence = ordering_fence
        #: read_page's statements, compiled once
        self._statements = DriverStatements(database.engine.dialect)

    async def visible(self, conn: AsyncConnection) -> None:
        """Writers take turns (``BEGIN IMMEDIATE``): offsets commit in order, every committed
        event may be read."""
        return None

    async def read_page(
        self, statement: Any, parameters: Mapping[str, Any]
    ) -> tuple[Sequence[Sequence[Any]], bool] | None:
        """The page's rows in one call to the driver's thread: the statement as it was
        compiled the first time (its SQL and positional parameters, as SQLAlchemy would send
        them), executed and fetched there, in SQLite's autocommit (one statement: one read
        snapshot; never held back, see :meth:`visible`). Through SQLAlchemy the same page took
        a BEGIN, the statement, a fetch and a COMMIT, each a hop to the driver's thread, and
        its rows went through the adapter's cursor and the result's processing: 7.8 us per
        event against 3.2 us for the query in sqlite3 alone (pages of 1,000, 2026-12-06, CPU
        reference 15 ms)."""
        compiled = self._statements.compiled(statement)
        if compiled is None:
            return None
        sent = self._statements.positional(compiled, parameters)
        with translate_errors("read"):
            async with self.database.engine.connect() as conn:
                fairy = await conn.get_raw_connection()
                driver: Any = fairy.driver_connection
                rows = await in_sqlite_thread(driver, _fetch_all, *sent)
        return rows, False

    async def append(self, batch: Batch, full_check: bool) -> dict[int, WriteResult]:
        # The transaction starts with BEGIN IMMEDIATE, so writers take turns and offsets
        # are committed in order without a further fence. Offsets are assigned here, under the
        # write lock, so both tables are written with plain executemany.
        keys = [enc.write.key for _, enc in batch]
        async with self.database.pooled_transaction(self.database.begin_immediate) as db:
            # One call: the highest offset so far (first row), then each entity's highest seq nr.
            found = await db.execute_fetchall(_SQLITE_CHECK, (json.dumps(keys),))
            last = found[0][2]
            highest = {(t, i): n for t, i, n in found[1:] if n}
            known: set[tuple[str, str, str]] = set()
            reply_keys = [r[:3] for _, enc in batch for r in enc.replies] if full_check else []
            if reply_keys:
                stored = await db.execute_fetchall(
                    _SQLITE_STORED_REPLIES, {"keys": json.dumps(reply_keys)}
                )
                known = {(t, i, c) for t, i, c, _ in stored}
            results, accepted = check_expected(batch, highest, known)
            if not accepted:
                return results
            written_at = now_us()
            rows = [r for _, enc in accepted for r in enc.rows]
            offsets = range(last + 1, last + 1 + len(rows))
            await db.executemany(
                _SQLITE_INSERT_EVENTS,
                [(o, *r, written_at) for o, r in zip(offsets, rows, strict=True)],
            )
            tag_rows = record_offsets(accepted, offsets, written_at, results)
            if tag_rows:
                await db.executemany(_SQLITE_INSERT_TAGS, tag_rows)
            reply_rows = [r for _, enc in accepted for r in enc.replies]
            if reply_rows:
                await db.executemany(_SQLITE_INSERT_REPLIES, reply_rows)
        return results

    def is_unique_violation(self, error: BaseException | None) -> bool:
        if isinstance(error, sqlite3.IntegrityError):
            # A CHECK constraint, a NOT NULL or a trigger's RAISE is an IntegrityError too: the
            # write's data, not a race (see refused_data).
            code = getattr(error, "sqlite_errorcode", None)
            return code in _SQLITE_UNIQUE_CODES if code is not None else "UNIQUE" in str(error)
        return isinstance(error, IntegrityError)

    def refused_data(self, cause: BaseException) -> bool:
        if isinstance(cause, sqlite3.IntegrityError):
            return not self.is_unique_violation(cause)
        return isinstance(cause, sqlite3.DataError) or refused_encoding(cause)

    async def stored_replies(
        self, keys: Sequence[tuple[str, str, str]]
    ) -> dict[tuple[str, str, str], bytes]:
        async with self.database.read() as conn:
            rows = (
                await conn.execute(text(_SQLITE_STORED_REPLIES), {"keys": json.dumps(list(keys))})
            ).all()
        return {(t, i, c): bytes(payload) for t, i, c, payload in rows}

    async def save_snapshots(self, written_at: int, rows: Sequence[Mapping[str, Any]]) -> None:
        t = schema.snapshots
        keys = [(row["entity_type"], row["entity_id"], row["seq_nr"]) for row in rows]
        async with self.database.write() as conn:
            # Replace any snapshot at the same sequence number, in one statement.
            await conn.execute(
                delete(t).where(tuple_(t.c.entity_type, t.c.entity_id, t.c.seq_nr).in_(keys))
            )
            await conn.execute(insert(t), list(rows))
