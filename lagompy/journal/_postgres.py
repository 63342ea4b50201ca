"""The journal on PostgreSQL.

Offsets come from the events table's sequence. Writers run concurrently: every write transaction
first places its marker (a shared advisory lock naming the sequence's value before it allocates;
see ``_LOCK_EVENTS`` and migration 0010), and a read by offset first asks ``lagompy_visible`` how
far it may go: below the lowest marker of a writer still in flight, so that it never skips an
event that commits late (the ordering fence, without making writers take turns). Every write
NOTIFYs the live tailers with the highest offset it allocated (delivered only if it commits).
Lists travel as arrays (``unnest``), large batches as binary COPY, and a batch of one write
of one event (a single ask's) as scalars, in a statement of its own (``_PG_WRITE_ONE``).
Writes and snapshot saves go through the kept write connection of
:class:`~lagompy.sql.Database` (``raw_writer`` and ``kept_transaction``) on the driver
(asyncpg) itself: SQLAlchemy's compiled statements cost the hot path more than the database
did.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from lagompy.errors import JournalError
from lagompy.journal._backend import (
    EVENT_COLUMNS,
    REPLY_COLUMNS,
    Batch,
    DriverStatements,
    JournalBackend,
    check_expected,
    columns,
    record_offsets,
    refused_encoding,
)
from lagompy.journal._model import WriteResult, now_us
from lagompy.sql._database import Database, _invalidate_if_broken, translate_errors

#: First key of the journal's write lock: b"lgmp" as a big-endian int4. The second key is the
#: events table's oid (shifted into the int4 range), so journals in other schemas of the same
#: database do not wait for each other.
WRITE_LOCK_CLASS = int.from_bytes(b"lgmp", "big")
#: The int4 key that names this journal (its events table, so journals in other schemas of
#: the same database never meet) in advisory locks.
_JOURNAL_KEY = "('lagompy_events'::regclass::oid::bigint - 2147483648)::int"
#: Taken first in every write transaction, before any offset is allocated (see
#: :attr:`PostgresBackend.ordering_fence`; migration 0010 explains it): the journal's former
#: exclusive write lock taken *shared* (writers of this version never wait for each other; a
#: writer of an older version, which takes it exclusive, waits for them and they for it), and
#: the writer's *marker*, a shared advisory lock keyed by the journal and the low 32 bits of
#: the offsets' sequence's last value: every offset this transaction allocates is above it, and
#: readers see the marker in ``pg_locks`` until the transaction ends (``lagompy_visible``).
#: Advisory locks, not ``LOCK TABLE``: they do not conflict with VACUUM, ANALYZE and
#: autovacuum.
_LOCK_EVENTS = (
    f"SELECT pg_advisory_xact_lock_shared({WRITE_LOCK_CLASS}, {_JOURNAL_KEY}), "
    f"pg_advisory_xact_lock_shared({_JOURNAL_KEY}, "
    "((COALESCE(pg_sequence_last_value("
    "pg_get_serial_sequence('lagompy_events', 'global_offset')::regclass), 0)"
    " & 4294967295) - 2147483648)::int)"
)
#: Before a read by offset: up to where it may read (``lagompy_visible``, migration 0010), given
#: the offsets' sequence (looked up once per backend, not at every read).
_PG_VISIBLE = "SELECT visible, last FROM lagompy_visible(CAST(:seq AS regclass))"
#: The same, sent to the driver by :meth:`PostgresBackend.read_page` ($1: the sequence).
_PG_VISIBLE_DRIVER = "SELECT visible, last FROM lagompy_visible(CAST($1::text AS regclass))"
#: Sent with ``BEGIN`` in every write transaction, before the fence. The journal's
#: statements take their row counts from arrays, so PostgreSQL re-planned them at every
#: execution (a custom plan for each set of parameters): measured ~0.4 ms of planning per
#: statement on a one-event write, as long as the statement itself. Their generic plan is the
#: same plan; ``SET LOCAL`` keeps it to this transaction.
_GENERIC_PLANS = "SET LOCAL plan_cache_mode = force_generic_plan"
#: A write transaction's first round trip, with the fence and without.
_BEGIN_FENCED = f"BEGIN; {_GENERIC_PLANS}; {_LOCK_EVENTS}"
_BEGIN = f"BEGIN; {_GENERIC_PLANS}"
#: The sequence that allocates offsets.
_PG_SEQUENCE = "SELECT pg_get_serial_sequence('lagompy_events', 'global_offset')"
#: The channel live tailers LISTEN on; the payload is the highest offset just allocated, then
#: the tags written, one per line (:func:`notify_tags`; lagompy_write: migration 0012).
NOTIFY_CHANNEL = "lagompy_events"
#: The most bytes the tags may take in a notification (PostgreSQL's payload limit is 8,000).
NOTIFY_TAGS_BYTES = 7900


def notify_tags(tags: Iterable[str]) -> str:
    """The end of a notification's payload that names the tags a write carried (a tailer of
    another tag need not read again; ``"\\n"``: none), or nothing (every tailer reads again)
    when they would not fit or a tag holds a line break."""
    distinct = set(tags)
    if any("\n" in t for t in distinct):
        return ""
    text = "\n" + "\n".join(distinct)
    return text if len(text.encode()) <= NOTIFY_TAGS_BYTES else ""


def _batch_tags(batch: Batch) -> str:
    return notify_tags(t for _, enc in batch for event_tags in enc.tags for t in event_tags)


#: Every entity's highest sequence number, deletions included, in the order of the writes
#: ($1, $2: their types and ids).
_PG_HIGHEST_ARRAY = """ARRAY(
    SELECT GREATEST(
        COALESCE((SELECT e.seq_nr FROM lagompy_events e
                  WHERE e.entity_type = k.t AND e.entity_id = k.i
                  ORDER BY e.seq_nr DESC LIMIT 1), 0),
        COALESCE((SELECT d.deleted_to FROM lagompy_deletions d
                  WHERE d.entity_type = k.t AND d.entity_id = k.i), 0))
    FROM unnest($1::text::text[], $2::text::text[]) WITH ORDINALITY AS k(t, i, n)
    ORDER BY k.n
)"""


def _pg_prepare(checks: str, tags: str) -> str:
    """The first statement of a large batch's transaction, one round trip: offsets for every
    event ($3: the sequence, $4: how many), the notification (delivered only if we commit;
    ``tags``: the parameter that ends its payload, see :func:`notify_tags`), and the
    ``checks`` columns."""
    return f"""
WITH offs AS MATERIALIZED (
    SELECT nextval($3::regclass) AS o FROM generate_series(1, $4)
), agg AS (
    SELECT array_agg(o ORDER BY o) AS offsets, max(o) AS top FROM offs
)
SELECT agg.offsets AS offsets,
       pg_notify('{NOTIFY_CHANNEL}', agg.top::text || {tags}::text) AS notified,
       {checks}
FROM agg
"""


#: The full check (a retry): every entity's highest sequence number, and the ordinals
#: ($5..$7, 1-based) of the given command replies already stored.
_PG_PREPARE = _pg_prepare(
    f"""{_PG_HIGHEST_ARRAY} AS highest,
       ARRAY(
           SELECT r.n
           FROM unnest($5::text::text[], $6::text::text[], $7::text::text[])
                WITH ORDINALITY AS r(t, i, c, n)
           WHERE EXISTS (SELECT 1 FROM lagompy_command_replies x
                         WHERE x.entity_type = r.t AND x.entity_id = r.i AND x.command_id = r.c)
       ) AS known""",
    "$8",
)
#: Large batches, first attempt: instead of each entity's highest sequence number (a backward
#: index scan per entity, ~3x the time of a point lookup on these machines) the 1-based
#: ordinals of the *suspect* writes ($5: their expected sequence numbers): those whose expected
#: event is not stored (a writer ahead of the journal, or a deletion that went that far) and
#: those that expect a new entity that has an event or a deletion. A write whose expected
#: number is behind (a zombie's) is not suspect here: its first event collides with the stored
#: one on the (entity, seq_nr) key, the batch rolls back and the next attempt runs the full
#: check (``_PG_PREPARE``). A write that expects a new entity is checked here, though: the
#: runtime presumes the entities it does not hold new (``EntityProcessor.presume_new``), so
#: such a write to an existing entity is common (after a restart), and must fail alone rather
#: than roll the batch back (measured 2026-12-06, 256 existing entities presumed new, medians:
#: 73.5 ms a batch with the rollback, 62.5-64.3 with this check, 60.2-62.9 recovered first);
#: the check costs batches of new entities ~0.08 of raw executemany's rate at 100 events
#: (docs/benchmarks.md, "Entities presumed new"). Scalar subqueries with LIMIT keep the plan a
#: point lookup per write whatever the statistics said when the generic plan was made.
_PG_PREPARE_FAST = _pg_prepare(
    """ARRAY(
           SELECT k.n
           FROM unnest($1::text::text[], $2::text::text[], $5::bigint[])
                WITH ORDINALITY AS k(t, i, x, n)
           WHERE CASE WHEN k.x > 0
               THEN (SELECT e.seq_nr FROM lagompy_events e
                     WHERE e.entity_type = k.t AND e.entity_id = k.i AND e.seq_nr = k.x
                     LIMIT 1) IS NULL
               ELSE (SELECT e.seq_nr FROM lagompy_events e
                     WHERE e.entity_type = k.t AND e.entity_id = k.i
                     LIMIT 1) IS NOT NULL
                 OR (SELECT d.deleted_to FROM lagompy_deletions d
                     WHERE d.entity_type = k.t AND d.entity_id = k.i
                     LIMIT 1) IS NOT NULL
           END
       ) AS suspect""",
    "$6",
)
#: The highest sequence number of each suspect write's entity, deletions included.
_PG_HIGHEST = f"SELECT {_PG_HIGHEST_ARRAY}"

#: From this many events in one append, PostgreSQL events are written with COPY (a transaction
#: of several round trips) rather than in one call of ``lagompy_write``. Measured 2026-12-06
#: (CPU reference 14-15 ms, one writer, batches interleaved, the writer's CPU per event, the
#: function's arrays in their text form): 100 events 9.7 (function) / 13.0-13.2 (COPY) us, 200
#: events 10.2 / 11.7, 300 events 13.7-15.9 / 11.7-12.7, 1,000 events 14.4 / 14.6, the
#: server's time per event about equal up to 200 and lower for COPY above.
_PG_COPY_FROM = 128

#: Small batches: every event ($1..$10, the columns of ``EVENT_COLUMNS`` up to the slice;
#: $11: written at), tag row ($12, $13) and command reply ($14..$18), as arrays, in one
#: statement (empty arrays insert nothing).
_PG_INSERT = """
WITH ev AS (
    INSERT INTO lagompy_events (global_offset, entity_type, entity_id, seq_nr, event_type,
                                event_version, payload, tags, metadata, slice, written_at_us)
    SELECT u.o, u.t, u.i, u.s, u.et, u.ev, u.p, u.tg, u.md, u.sl, $11
    FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::int[],
                $7::bytea[], $8::bytea[], $9::bytea[], $10::int[])
         AS u(o, t, i, s, et, ev, p, tg, md, sl)
), rp AS (
    INSERT INTO lagompy_command_replies (entity_type, entity_id, command_id, seq_nr, payload)
    SELECT * FROM unnest($14::text[], $15::text[], $16::text[], $17::bigint[], $18::bytea[])
)
INSERT INTO lagompy_event_tags (tag, global_offset)
SELECT * FROM unnest($12::text[], $13::bigint[])
"""
#: Small batches, first attempt: the whole write in one round trip, a call of the function that
#: migration 0004 creates (and 0013 last replaced), outside a transaction (the statement is its
#: own transaction). The function takes the fence ($1: whether to), then, per write ($2..$4:
#: type, id, expected sequence number; $20: its slice), reads the highest sequence number so
#: far, deletions included, with a
#: snapshot taken after the fence; the events ($6..$12, ``w`` the 1-based write they belong to)
#: of the writes that expect exactly that get offsets in their order ($5: the sequence) and are
#: inserted with their tags ($14, $15: tag and 1-based event) and command replies ($16..$19);
#: the notification goes out only when something was inserted. Returns every write's highest
#: sequence number (the caller tells conflicts from it) and the offsets of the inserted events,
#: in order. Its text and bytea arrays travel in their text form (:func:`text_array`,
#: :func:`bytea_array`), cast by the statement: ``$2::text::text[]``.
#: lagompy_write's arguments (migration 0013), in order: their types.
_PG_WRITE_TYPES = (
    "boolean text[] text[] bigint[] regclass bigint[] bigint[] text[] int[] bytea[] bytea[] "
    "bytea[] bigint text[] bigint[] bigint[] text[] bigint[] bytea[] int[]"
).split()
_PG_WRITE = "SELECT highest, offsets FROM lagompy_write({})".format(
    ", ".join(
        f"${n}::text::{t}" if t.endswith("[]") else f"${n}"
        for n, t in enumerate(_PG_WRITE_TYPES, 1)
    )
)


#: A batch of one write of one event (a single ask's, at one outstanding ask) with at most one
#: command reply: the same steps as ``lagompy_write`` in one statement of the journal's own
#: (its own transaction, one round trip) whose values are scalars, not arrays. Its steps, in
#: the order the statement's CTEs feed each other: the fence ($1: whether to take it; ``f``)
#: before anything else, the entity's ($2, $3) highest sequence number so far, deletions
#: included (``k``), the event ($4: the expected number; $5: the sequence; $6..$13: its
#: sequence number, type, version, payload, packed tags, metadata, slice, written at) inserted
#: with an offset only when the highest is the expected one, its tags ($14, a text array) and
#: its reply ($15..$17, or no reply when the command id is null), and the notification ($18:
#: the end of its payload, :func:`notify_tags`) only when the event was inserted. Returns the
#: highest number and the event's offset (null when refused). Measured 2026-12-07 (one
#: process, one-event writes interleaved in chunks of 100 with calls of ``lagompy_write`` on a
#: connection of their own, three runs, CPU reference 12.0-15.3 ms): PostgreSQL's backend used
#: 0.18-0.21 ms of CPU per write where the function's used 0.25-0.31, and the write took
#: 0.34-0.40 ms where the function's took 0.42-0.54 (p50); single asks through a shard host,
#: alternated, 1.34-1.37x the floor's base at p50 against 1.44-1.53x. The scalars are the
#: lever: the function without its ``SET`` clause, or its body sent as one statement of arrays,
#: saved 0.005-0.035 ms (docs/benchmarks.md, "A leaner one-event write").
_PG_WRITE_ONE = f"""
WITH f AS MATERIALIZED (
    SELECT CASE WHEN $1::boolean THEN
        pg_advisory_xact_lock_shared({WRITE_LOCK_CLASS}, {_JOURNAL_KEY})::text
        || pg_advisory_xact_lock_shared({_JOURNAL_KEY},
               ((COALESCE(pg_sequence_last_value($5::regclass), 0) & 4294967295)
                - 2147483648)::int)::text
    END AS fenced
), k AS MATERIALIZED (
    SELECT GREATEST(
               COALESCE((SELECT e.seq_nr FROM lagompy_events e
                         WHERE e.entity_type = $2::text AND e.entity_id = $3::text
                         ORDER BY e.seq_nr DESC LIMIT 1), 0),
               COALESCE((SELECT d.deleted_to FROM lagompy_deletions d
                         WHERE d.entity_type = $2::text AND d.entity_id = $3::text), 0)) AS h
    FROM f
), ev AS (
    INSERT INTO lagompy_events (global_offset, entity_type, entity_id, seq_nr, event_type,
                                event_version, payload, tags, metadata, slice, written_at_us)
    SELECT nextval($5::regclass), $2::text, $3::text, $6, $7, $8, $9, $10, $11, $12, $13
    FROM k WHERE k.h = $4::bigint
    RETURNING global_offset AS o
), tg AS (
    INSERT INTO lagompy_event_tags (tag, global_offset)
    SELECT x.tag, ev.o FROM ev, unnest($14::text::text[]) AS x(tag)
), rp AS (
    INSERT INTO lagompy_command_replies (entity_type, entity_id, command_id, seq_nr, payload)
    SELECT $2::text, $3::text, $15::text, $16, $17 FROM ev WHERE $15::text IS NOT NULL
)
SELECT (SELECT k.h FROM k) AS highest, (SELECT ev.o FROM ev) AS o,
       (SELECT pg_notify('{NOTIFY_CHANNEL}', ev.o::text || $18::text) FROM ev) AS notified
"""


def text_array(items: Sequence[str]) -> str:
    """``items`` as the text form of a PostgreSQL array (``{"a","b"}``), for a parameter the
    statement casts (``$1::text::text[]``). asyncpg's binary array encoder checks every
    element against the ``collections.abc`` classes (nested arrays): ~0.28 us per text or bytea
    element on these machines, as much as the rest of a one-event write's parameters; one
    ``str.join`` costs ~0.03 (2026-12-06, CPU reference 14 ms: a batch of 100 one-event writes,
    interleaved, 13.8 -> 12.8 us of the writer's CPU per event, the server's unchanged within
    the measurement's noise)."""
    if not items:
        return "{}"
    flat = "".join(items)
    if '"' in flat or "\\" in flat:
        items = [x.replace("\\", "\\\\").replace('"', '\\"') for x in items]
    return '{"' + '","'.join(items) + '"}'


def text_columns(rows: Sequence[tuple[str, ...]], width: int) -> list[str]:
    """``rows`` as ``width`` columns, each in a text array's text form (:func:`text_array`):
    the keys a large batch's checks take, and its tags. 1,000-event batches, one writer,
    2026-12-06 (CPU reference 13.6-14.7 ms): 16.8-17.8 -> 13.8-15.6 us of the writer's CPU per
    event, the server's unchanged."""
    return [text_array([r[c] for r in rows]) for c in range(width)]


def int_array(items: Iterable[int]) -> str:
    """``items`` (ints) as the text form of a PostgreSQL integer array (``{1,2}``): see
    :func:`text_array`. asyncpg's binary encoder checks the array and every element against
    abstract base classes; the one-event write of a single ask passes eight such arrays."""
    return "{" + ",".join(map(str, items)) + "}"


def bytea_array(items: Sequence[bytes | None]) -> str:
    """``items`` as the text form of a PostgreSQL ``bytea[]`` (hex, ``NULL`` for None): see
    :func:`text_array`. Equal values (a batch's events mostly share their packed tags and
    metadata) are turned into hex once."""
    hexes: dict[bytes | None, str] = {None: "NULL"}
    out: list[str] = []
    for b in items:
        h = hexes.get(b)
        if h is None:
            assert b is not None
            h = hexes[b] = '"\\\\x' + b.hex() + '"'
        out.append(h)
    return "{" + ",".join(out) + "}"


#: After a COPY of the events and replies: the tags, as arrays.
_PG_INSERT_TAGS = """
INSERT INTO lagompy_event_tags (tag, global_offset)
SELECT * FROM unnest($1::text::text[], $2::bigint[])
"""

#: The stored replies of the given (entity type, entity id, command id) triples, one query.
_PG_STORED_REPLIES = """
SELECT r.entity_type, r.entity_id, r.command_id, r.payload
FROM unnest(CAST(:t AS text[]), CAST(:i AS text[]), CAST(:c AS text[])) AS k(t, i, c)
JOIN lagompy_command_replies r
  ON r.entity_type = k.t AND r.entity_id = k.i AND r.command_id = k.c
"""

#: Save snapshots ($2..$7, as arrays, in the order of ``_SNAPSHOT_ARRAYS``, written
#: at $1), replacing any at the same (entity, seq_nr).
_PG_SAVE = """
INSERT INTO lagompy_snapshots (entity_type, entity_id, seq_nr, written_at_us, state_type,
                               state_version, payload)
SELECT u.t, u.i, u.s, $1, u.st, u.sv, u.p
FROM unnest($2::text[], $3::text[], $4::bigint[], $5::text[], $6::int[], $7::bytea[])
     AS u(t, i, s, st, sv, p)
ON CONFLICT ON CONSTRAINT pk_lagompy_snapshots DO UPDATE
SET written_at_us = EXCLUDED.written_at_us, state_type = EXCLUDED.state_type,
    state_version = EXCLUDED.state_version, payload = EXCLUDED.payload
"""
_SNAPSHOT_ARRAYS = ("entity_type", "entity_id", "seq_nr", "state_type", "state_version", "payload")


class PostgresBackend(JournalBackend):
    """The journal's PostgreSQL flavour (see the module's docstring)."""

    def __init__(self, database: Database, *, ordering_fence: bool = True) -> None:
        self.database = database
        #: Every write transaction first places its marker, and every read by offset stops
        #: below the markers of writers still in flight, so a reader tailing by offset can never
        #: skip an event that commits late, while writers never wait for each other. Turning it
        #: off (no marker, reads unbounded) exists only to demonstrate, in the tests, the skips
        #: it prevents.
        self.ordering_fence = ordering_fence
        self._pg_sequence: str | None = None
        #: read_page's statements, compiled once
        self._statements = DriverStatements(database.engine.dialect)

    async def visible(self, conn: AsyncConnection) -> tuple[int, int] | None:
        if not self.ordering_fence:
            return None
        if self._pg_sequence is None:
            self._pg_sequence = (await conn.execute(text(_PG_SEQUENCE))).scalar_one()
        visible, last = (await conn.execute(text(_PG_VISIBLE), {"seq": self._pg_sequence})).one()
        return int(visible), int(last)

    async def read_page(
        self, statement: Any, parameters: Mapping[str, Any]
    ) -> tuple[Sequence[Sequence[Any]], bool] | None:
        """The page on a pooled connection's driver (asyncpg), outside a transaction: the
        fence's bound (``lagompy_visible``), then the page's statement as it was compiled the
        first time, bounded by it: two statements, so the page's snapshot is taken after the
        bound was read, as in the read transaction of :meth:`visible`; each is prepared once
        per connection (asyncpg's statement cache) and used again for every page. Through
        SQLAlchemy the same page took a BEGIN, the bound, the statement and a COMMIT (four
        round trips) and its rows went through the adapter's cursor and the result's
        processing."""
        compiled = self._statements.compiled(statement)
        if compiled is None:
            return None
        held = False
        with translate_errors("read"):
            async with self.database.engine.connect() as conn:
                fairy = await conn.get_raw_connection()
                pg: Any = fairy.driver_connection
                try:
                    if self.ordering_fence:
                        visible, last = await pg.fetchrow(
                            _PG_VISIBLE_DRIVER, await self._sequence(pg)
                        )
                        held = visible < last
                        parameters = {**parameters, "visible": visible}
                    sql, args = self._statements.positional(compiled, parameters)
                    rows = await pg.fetch(sql, *args)
                except BaseException as e:
                    _invalidate_if_broken(fairy, e)
                    raise
        return rows, held

    async def append(self, batch: Batch, full_check: bool) -> dict[int, WriteResult]:
        # Small batches: one round trip (_PG_WRITE, a transaction of its own; _PG_WRITE_ONE for
        # one write of one event). Large batches,
        # and a retry that runs the full check: BEGIN + the fence; check + offsets + notify (one
        # statement: _PG_PREPARE_FAST first, _PG_PREPARE on a retry); the events, tags and
        # replies (one statement, or a COPY of the events and of the replies, and one statement
        # for the tags); COMMIT.
        keys = [enc.write.key for _, enc in batch]
        count = sum(len(enc.rows) for _, enc in batch)
        if count < _PG_COPY_FROM and not full_check:
            async with self.database.raw_writer() as pg:
                return await self._write(pg, batch, keys)
        reply_keys = [r[:3] for _, enc in batch for r in enc.replies] if full_check else []
        async with self.database.kept_transaction(
            _BEGIN_FENCED if self.ordering_fence else _BEGIN
        ) as pg:
            known: set[tuple[str, str, str]] = set()
            if full_check:
                row = await pg.fetchrow(
                    _PG_PREPARE,
                    *text_columns(keys, 2),
                    await self._sequence(pg),
                    count,
                    *text_columns(reply_keys, 3),
                    _batch_tags(batch),
                )
                known = {reply_keys[n - 1] for n in row["known"]}
                highest = {k: n for k, n in zip(keys, row["highest"], strict=True) if n}
            else:
                expected = [enc.write.expected_seq_nr for _, enc in batch]
                row = await pg.fetchrow(
                    _PG_PREPARE_FAST,
                    *text_columns(keys, 2),
                    await self._sequence(pg),
                    count,
                    expected,
                    _batch_tags(batch),
                )
                highest = dict(zip(keys, expected, strict=True))
                if row["suspect"]:
                    suspect = [keys[n - 1] for n in row["suspect"]]
                    found = await pg.fetchval(_PG_HIGHEST, *text_columns(suspect, 2))
                    highest.update(zip(suspect, found, strict=True))
            offsets_all: list[int] = row["offsets"]
            results, accepted = check_expected(batch, highest, known)
            if not accepted:
                return results
            written_at = now_us()
            rows = [r for _, enc in accepted for r in enc.rows]
            offsets = offsets_all[: len(rows)]
            tag_rows = record_offsets(accepted, offsets, written_at, results)
            tags_arrays = ([t for t, _ in tag_rows], [o for _, o in tag_rows])
            reply_rows = [r for _, enc in accepted for r in enc.replies]
            if len(rows) < _PG_COPY_FROM:
                # Small batches: events, tags and replies in one statement, as arrays.
                await pg.execute(
                    _PG_INSERT,
                    offsets,
                    *zip(*rows, strict=True),
                    written_at,
                    *tags_arrays,
                    *columns(reply_rows, 5),
                )
            else:
                # Large batches: binary COPY of the events (measured 1.5x faster than the
                # arrays at 1,000 events) and of the command replies (~8% less time per event
                # at 513 events than as arrays, whose encoder checks every element against
                # abstract base classes), then the tags as arrays.
                await pg.copy_records_to_table(
                    "lagompy_events",
                    records=[(o, *r, written_at) for o, r in zip(offsets, rows, strict=True)],
                    columns=EVENT_COLUMNS,
                )
                if reply_rows:
                    await pg.copy_records_to_table(
                        "lagompy_command_replies", records=reply_rows, columns=REPLY_COLUMNS
                    )
                if tag_rows:
                    await pg.execute(_PG_INSERT_TAGS, text_array(tags_arrays[0]), tags_arrays[1])
        return results

    async def _sequence(self, pg: Any) -> str:
        """The sequence that allocates offsets (looked up once)."""
        if self._pg_sequence is None:
            self._pg_sequence = await pg.fetchval(_PG_SEQUENCE)
        return self._pg_sequence

    async def _write(
        self, pg: Any, batch: Batch, keys: list[tuple[str, str]]
    ) -> dict[int, WriteResult]:
        """A small batch in one statement that is its own transaction (``_PG_WRITE``, or
        ``_PG_WRITE_ONE`` for one write of one event); ``keys`` are the writes' (entity type,
        entity id), in order."""
        if len(batch) == 1 and len(batch[0][1].rows) == 1 and len(batch[0][1].replies) <= 1:
            return await self._write_one(pg, batch)
        # The columns in one pass over the events (zip transposes their rows in C); the
        # text and bytea arrays in their text form (text_array).
        rows = [r for _, enc in batch for r in enc.rows]
        _, _, seq_nrs, types, versions, payloads, packed_tags, metas, _ = zip(*rows, strict=True)
        if len(rows) == len(batch):  # one event per write, a shard host's usual batch
            event_write: Sequence[int] = range(1, len(rows) + 1)
        else:
            event_write = [n for n, (_, enc) in enumerate(batch, 1) for _ in enc.rows]
        tags: list[str] = []
        tag_event: list[int] = []
        m = 0
        for _, enc in batch:
            for event_tags in enc.tags:
                m += 1
                for t in event_tags:
                    tags.append(t)
                    tag_event.append(m)
        replies = [(n, *r[2:]) for n, (_, enc) in enumerate(batch, 1) for r in enc.replies]
        reply_write, command_ids, reply_seq_nrs, reply_payloads = columns(replies, 4)
        written_at = now_us()
        row = await pg.fetchrow(
            _PG_WRITE,
            self.ordering_fence,
            text_array([k[0] for k in keys]),
            text_array([k[1] for k in keys]),
            int_array([enc.write.expected_seq_nr for _, enc in batch]),
            await self._sequence(pg),
            int_array(event_write),
            int_array(seq_nrs),
            text_array(types),
            int_array(versions),
            bytea_array(payloads),
            bytea_array(packed_tags),
            bytea_array(metas),
            written_at,
            text_array(tags),
            int_array(tag_event),
            int_array(reply_write),
            text_array(command_ids),
            int_array(reply_seq_nrs),
            bytea_array(reply_payloads),
            int_array([enc.rows[0][8] for _, enc in batch]),
        )
        highest = {k: h for k, h in zip(keys, row["highest"], strict=True) if h}
        results, accepted = check_expected(batch, highest)
        offsets: list[int] = row["offsets"]
        wanted = sum(len(enc.rows) for _, enc in accepted)
        if len(offsets) != wanted:
            raise JournalError(
                f"the journal inserted {len(offsets)} events where {wanted} were expected"
            )
        record_offsets(accepted, offsets, written_at, results, with_tags=False)
        return results

    async def _write_one(self, pg: Any, batch: Batch) -> dict[int, WriteResult]:
        """One write of one event, with at most one reply, in one statement that is its own
        transaction (``_PG_WRITE_ONE``)."""
        enc = batch[0][1]
        entity_type, entity_id, seq_nr, type_, version, payload, packed, meta, slice_ = enc.rows[0]
        tags = enc.tags[0]
        reply = enc.replies[0][2:] if enc.replies else (None, None, None)
        written_at = now_us()
        row = await pg.fetchrow(
            _PG_WRITE_ONE,
            self.ordering_fence,
            entity_type,
            entity_id,
            enc.write.expected_seq_nr,
            await self._sequence(pg),
            seq_nr,
            type_,
            version,
            payload,
            packed,
            meta,
            slice_,
            written_at,
            text_array(tags),
            *reply,
            notify_tags(tags),
        )
        highest, offset = row["highest"], row["o"]
        results, accepted = check_expected(batch, {enc.write.key: highest} if highest else {})
        if (offset is None) == bool(accepted):
            raise JournalError(
                f"the journal inserted {0 if offset is None else 1} events where "
                f"{len(accepted)} were expected"
            )
        record_offsets(
            accepted, [] if offset is None else [offset], written_at, results, with_tags=False
        )
        return results

    def is_unique_violation(self, error: BaseException | None) -> bool:
        return isinstance(error, (IntegrityError, asyncpg.UniqueViolationError))

    def refused_data(self, cause: BaseException) -> bool:
        if isinstance(cause, asyncpg.PostgresError):
            # Class 22: data exception (a value too long, an invalid byte sequence...); class 23:
            # integrity constraint (a CHECK, a NOT NULL), the unique key aside (a race, retried
            # with the full check); P0001: an exception a trigger raised.
            state = str(getattr(cause, "sqlstate", "") or "")
            return (state[:2] in ("22", "23") and state != "23505") or state == "P0001"
        if isinstance(cause, asyncpg.InterfaceError):
            # The driver could not encode a parameter (its DataError is also a ValueError).
            return isinstance(cause, ValueError)
        return refused_encoding(cause)

    async def stored_replies(
        self, keys: Sequence[tuple[str, str, str]]
    ) -> dict[tuple[str, str, str], bytes]:
        params = dict(zip(("t", "i", "c"), columns(keys, 3), strict=True))
        async with self.database.read() as conn:
            rows = (await conn.execute(text(_PG_STORED_REPLIES), params)).all()
        return {(t, i, c): bytes(payload) for t, i, c, payload in rows}

    async def save_snapshots(self, written_at: int, rows: Sequence[Mapping[str, Any]]) -> None:
        # One statement on the journal's kept write connection, a transaction of its own:
        # the shard hosts save snapshots after most batches, and SQLAlchemy's compiled
        # DELETE + INSERT cost them ~2 ms of CPU and two round trips more each time.
        arrays = [[row[c] for row in rows] for c in _SNAPSHOT_ARRAYS]
        async with self.database.raw_writer() as pg:
            await pg.execute(_PG_SAVE, written_at, *arrays)
