"""Event slices: every event row names its entity's slice.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06

``lagompy_events.slice``
    New, ``NOT NULL``: the slice of the event's entity, ``crc32(entity_id UTF-8) % 1024`` (the
    hash that places entities on the runtime's shards and on a sharded tag's shards), the same
    for every event of an entity. Existing rows are filled in by this revision: on PostgreSQL
    the column is added, filled from a temporary table of every distinct entity id and its
    slice (computed by a temporary PL/pgSQL CRC-32, in SQL, so ``lagompy migrate --sql`` prints
    all of it; one pass over the events) and then made ``NOT NULL``; on SQLite, which cannot
    add a ``NOT NULL`` column without a default, the table is rebuilt (renamed away, created
    again with the column, copied in offset order with the slices of a temporary table made by
    a CRC-32 in SQL, dropped) and the offsets' ``AUTOINCREMENT`` counter is carried over, so
    an offset is never handed out again.

``lagompy_write(...)`` (PostgreSQL)
    Replaced by a version that takes each write's slice (one more array, last) and stores it with
    the write's events. The previous one is dropped: a writer of an earlier lagompy version calls
    a function that no longer exists and fails (and its large batches, written with COPY,
    without a slice, are refused), so stop writers of earlier versions before this upgrade.

One transaction, like every upgrade: the events table is locked for its whole length (every
row is rewritten once). The downgrade drops the column and puts back the function of revision
0012.

Written by hand, and frozen: a later change is a new revision, never an edit here.
"""

from __future__ import annotations

import importlib
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision: str | None = "0012"
branch_labels: str | None = None
depends_on: str | None = None

SLICES = 1024

_r0010 = importlib.import_module("lagompy.sql.migrations.versions.0010_concurrent_writers")
_r0012 = importlib.import_module("lagompy.sql.migrations.versions.0012_tagged_notifications")

#: The 0012 write function's argument types (to drop it: functions are overloaded by them).
_OLD_SIGNATURE = (
    "lagompy_write(boolean, text[], text[], bigint[], regclass, bigint[], bigint[], text[], "
    "int[], bytea[], bytea[], bytea[], bigint, text[], bigint[], bigint[], text[], bigint[], "
    "bytea[])"
)
_NEW_SIGNATURE = _OLD_SIGNATURE[:-1] + ", int[])"

#: (text of 0012's write function, its replacement): each must occur exactly once.
_EDITS = (
    (
        "r_w bigint[], r_command text[], r_seq bigint[], r_payload bytea[],\n",
        "r_w bigint[], r_command text[], r_seq bigint[], r_payload bytea[], w_slice int[],\n",
    ),
    ("SELECT k.n, k.t, k.i, k.x,\n", "SELECT k.n, k.t, k.i, k.x, k.sl,\n"),
    (
        "FROM unnest(w_type, w_id, w_expected) WITH ORDINALITY AS k(t, i, x, n)",
        "FROM unnest(w_type, w_id, w_expected, w_slice) WITH ORDINALITY AS k(t, i, x, sl, n)",
    ),
    (
        "SELECT u.m, k.t, k.i, u.s, u.et, u.ev, u.p, u.tg, u.md\n",
        "SELECT u.m, k.t, k.i, u.s, u.et, u.ev, u.p, u.tg, u.md, k.sl\n",
    ),
    (
        "event_version, payload, tags, metadata, written_at_us)",
        "event_version, payload, tags, metadata, slice, written_at_us)",
    ),
    (
        "ev.tg, ev.md, written_at FROM ev",
        "ev.tg, ev.md, ev.sl, written_at FROM ev",
    ),
)


def _old_function() -> str:
    text: str = _r0012._write_function("PERFORM " + _r0010.MARK.format(key=_r0010._KEY, seq="seq"))
    return text


def _new_function() -> str:
    text = _old_function()
    for old, new in _EDITS:
        if text.count(old) != 1:
            raise RuntimeError(f"revision 0013: the write function of 0012 lacks {old!r}")
        text = text.replace(old, new)
    return text


def _events_table() -> list[sa.Column[Any] | sa.UniqueConstraint]:
    """The events table as this revision leaves it (0001's, plus the slice)."""
    return [
        sa.Column(
            "global_offset",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("entity_type", sa.String(255), nullable=False),
        sa.Column("entity_id", sa.String(255), nullable=False),
        sa.Column("seq_nr", sa.BigInteger(), nullable=False),
        sa.Column("event_type", sa.String(255), nullable=False),
        sa.Column("event_version", sa.Integer(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("tags", sa.LargeBinary(), nullable=True),
        sa.Column("written_at_us", sa.BigInteger(), nullable=False),
        sa.Column("metadata", sa.LargeBinary(), nullable=True),
        sa.Column("slice", sa.Integer(), nullable=False),
        sa.UniqueConstraint(
            "entity_type", "entity_id", "seq_nr", name="uq_lagompy_events_entity_seq"
        ),
    ]


_COPIED = (
    "global_offset, entity_type, entity_id, seq_nr, event_type, event_version, payload, tags, "
    "written_at_us, metadata"
)


#: CRC-32 (zlib's) of the UTF-8 id, modulo the slice count, in PL/pgSQL: PostgreSQL has no
#: CRC-32 of its own before version 18. ~8 us per id on these machines; run once per entity.
_PG_SLICE_FUNCTION = f"""
CREATE FUNCTION pg_temp.lagompy_slice_0013(id text) RETURNS integer
LANGUAGE plpgsql IMMUTABLE STRICT AS $fn$
DECLARE
    bytes bytea := convert_to(id, 'UTF8');
    crc bigint := 4294967295;
BEGIN
    FOR i IN 0 .. length(bytes) - 1 LOOP
        crc := crc # get_byte(bytes, i);
        FOR k IN 1 .. 8 LOOP
            IF crc & 1 = 1 THEN
                crc := (crc >> 1) # 3988292384;
            ELSE
                crc := crc >> 1;
            END IF;
        END LOOP;
    END LOOP;
    RETURN ((crc # 4294967295) % {SLICES})::integer;
END
$fn$
"""


def _upgrade_postgres() -> None:
    # In SQL only, so that `lagompy migrate --sql` prints a script that does it all.
    op.add_column("lagompy_events", sa.Column("slice", sa.Integer(), nullable=True))
    op.execute(_PG_SLICE_FUNCTION)
    op.execute(
        "CREATE TEMPORARY TABLE lagompy_slices_0013 ON COMMIT DROP AS "
        "SELECT d.entity_id, pg_temp.lagompy_slice_0013(d.entity_id) AS slice "
        "FROM (SELECT DISTINCT entity_id FROM lagompy_events) AS d"
    )
    op.execute(
        "UPDATE lagompy_events e SET slice = s.slice FROM lagompy_slices_0013 s "
        "WHERE e.entity_id = s.entity_id"
    )
    op.execute("DROP FUNCTION pg_temp.lagompy_slice_0013(text)")
    op.alter_column("lagompy_events", "slice", nullable=False)
    op.execute(f"DROP FUNCTION {_OLD_SIGNATURE}")
    op.execute(_new_function())


#: One byte of the id (the ``k // 9``-th) from its hex form ``h``: SQLite reads bytes no other way.
_SQLITE_BYTE = (
    "((instr('0123456789ABCDEF', substr(h, 2 * (k / 9) + 1, 1)) - 1) * 16"
    " + instr('0123456789ABCDEF', substr(h, 2 * (k / 9) + 2, 1)) - 1)"
)
#: Every distinct entity id of the events and its slice: CRC-32 in SQL (SQLite has neither
#: CRC-32 nor XOR: ``(a | b) - (a & b)``), nine steps per byte of the UTF-8 id (mix the byte
#: in, then eight shifts), as a recursive query. ~60 us per entity on these machines.
_SQLITE_SLICES = f"""
CREATE TEMPORARY TABLE lagompy_slices_0013 AS
WITH RECURSIVE ids(id, h) AS (
    SELECT DISTINCT entity_id, hex(CAST(entity_id AS BLOB)) FROM lagompy_events_0012
), crc(id, h, k, c) AS (
    SELECT id, h, 0, 4294967295 FROM ids
    UNION ALL
    SELECT id, h, k + 1,
           CASE WHEN k % 9 = 0 THEN (c | {_SQLITE_BYTE}) - (c & {_SQLITE_BYTE})
                WHEN c & 1 THEN ((c >> 1) | 3988292384) - ((c >> 1) & 3988292384)
                ELSE c >> 1 END
    FROM crc WHERE k < length(h) * 9 / 2
)
SELECT id AS entity_id, ((c | 4294967295) - (c & 4294967295)) % {SLICES} AS slice
FROM crc WHERE k = length(h) * 9 / 2
"""


def _upgrade_sqlite() -> None:
    # In SQL only, like PostgreSQL's. The rename carries the AUTOINCREMENT counter's row along
    # (sqlite_sequence); the copy starts the new table's at its highest offset copied.
    op.execute("ALTER TABLE lagompy_events RENAME TO lagompy_events_0012")
    op.create_table("lagompy_events", *_events_table(), sqlite_autoincrement=True)
    op.execute(_SQLITE_SLICES)
    op.execute(
        f"INSERT INTO lagompy_events ({_COPIED}, slice) "
        f"SELECT {', '.join('e.' + c for c in _COPIED.split(', '))}, s.slice "
        "FROM lagompy_events_0012 e JOIN lagompy_slices_0013 s ON s.entity_id = e.entity_id "
        "ORDER BY e.global_offset"
    )
    op.execute("DROP TABLE lagompy_slices_0013")
    # Offsets above the highest copied may have been handed out (and deleted) before: the
    # counter never goes back.
    op.execute(
        "UPDATE sqlite_sequence SET seq = max(seq, COALESCE((SELECT o.seq FROM sqlite_sequence o "
        "WHERE o.name = 'lagompy_events_0012'), 0)) WHERE name = 'lagompy_events'"
    )
    op.execute(
        "INSERT INTO sqlite_sequence (name, seq) SELECT 'lagompy_events', o.seq "
        "FROM sqlite_sequence o WHERE o.name = 'lagompy_events_0012' AND NOT EXISTS "
        "(SELECT 1 FROM sqlite_sequence n WHERE n.name = 'lagompy_events')"
    )
    op.execute("DROP TABLE lagompy_events_0012")


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        _upgrade_postgres()
    else:
        _upgrade_sqlite()


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION {_NEW_SIGNATURE}")
        op.execute(_old_function())
    op.drop_column("lagompy_events", "slice")
