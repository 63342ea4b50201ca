"""Concurrent journal writers: in-flight markers instead of one ordering fence (PostgreSQL only).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05

Until this revision every write transaction took the journal's one exclusive advisory lock
before it allocated offsets, so writers committed one after the other and a reader tailing by
offset never skipped an event that committed late; the journal wrote at one writer's speed.

From this revision a writer takes, before it allocates offsets, a *marker*: a shared
transaction-level advisory lock whose keys are the journal (its events table's oid) and the
low 32 bits of the offset sequence's last value at that moment. Its offsets are all above
that value, and the marker is visible to every session (``pg_locks``) until it commits or
rolls back. Writers no longer wait for each other.

``lagompy_visible(seq)``
    The offset up to which a reader may read without ever skipping an event that commits later
    (``visible``), and the sequence's last value (``last``, ``visible < last`` while a writer
    is in flight). It reads the sequence's last value first, then the markers: a writer that
    allocates after that read allocates above it, and one that allocated before it placed its
    marker before (or committed). ``visible`` is the lowest marker, or ``last`` when there is
    none. A writer of the previous version (the exclusive fence) in flight limits ``visible``
    to what is committed when it is seen; new writers also take that fence, shared, so old and
    new writers never run at the same time. The reader then reads in a statement of its own,
    whose snapshot is taken after: every event at or below ``visible`` is committed by then or
    will never be.

``lagompy_write(...)``
    Replaced: with ``fence`` it takes the shared fence and the marker, where it took the
    exclusive fence. The downgrade puts back the function of revision 0004.

Written by hand, and frozen: a later change is a new revision, never an edit here.
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision: str | None = "0009"
branch_labels: str | None = None
depends_on: str | None = None

#: ``(oid - 2^31)::int``: the int4 key that names this journal (its events table) in an
#: advisory lock, and the same key as pg_locks shows it (an unsigned 32-bit ``oid``).
_KEY = "('lagompy_events'::regclass::oid::bigint - 2147483648)::int"
_KEY_AS_OID = "(('lagompy_events'::regclass::oid::bigint + 2147483648) % 4294967296)::oid"

VISIBLE_FUNCTION = f"""
CREATE FUNCTION lagompy_visible(seq regclass, OUT visible bigint, OUT last bigint)
LANGUAGE plpgsql VOLATILE
AS $fn$
DECLARE
    journal oid := {_KEY_AS_OID};
    db oid := (SELECT d.oid FROM pg_database d WHERE d.datname = current_database());
    lowest bigint;
    fenced boolean;
BEGIN
    last := COALESCE(pg_sequence_last_value(seq), 0);
    SELECT min(last - ((last - ((l.objid::bigint + 2147483648) & 4294967295)) & 4294967295))
               FILTER (WHERE l.classid = journal),
           COALESCE(bool_or(l.classid = 1818717552::oid AND l.objid = journal
                            AND l.mode = 'ExclusiveLock'), false)
      INTO lowest, fenced
      FROM pg_locks l
     WHERE l.locktype = 'advisory' AND l.database = db AND l.objsubid = 2;
    visible := LEAST(last, COALESCE(lowest, last));
    IF fenced THEN
        visible := LEAST(visible, COALESCE((SELECT max(e.global_offset) FROM lagompy_events e), 0));
    END IF;
END
$fn$
"""

#: The shared fence and the marker, as the write function and the journal's large batches take
#: them (``seq``: the offsets' sequence). The marker's second key is the low 32 bits of the
#: sequence's last value, shifted into the int4 range (``lagompy_visible`` shifts them back).
MARK = (
    "pg_advisory_xact_lock_shared(1818717552, {key}), "
    "pg_advisory_xact_lock_shared({key}, "
    "((COALESCE(pg_sequence_last_value({seq}), 0) & 4294967295) - 2147483648)::int)"
)


def _write_function(fence: str) -> str:
    return f"""
CREATE OR REPLACE FUNCTION lagompy_write(
    fence boolean, w_type text[], w_id text[], w_expected bigint[], seq regclass,
    e_w bigint[], e_seq bigint[], e_type text[], e_version int[], e_payload bytea[],
    e_tags bytea[], e_meta bytea[], written_at bigint, t_tag text[], t_m bigint[],
    r_w bigint[], r_command text[], r_seq bigint[], r_payload bytea[],
    OUT highest bigint[], OUT offsets bigint[])
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan
AS $fn$
BEGIN
    IF fence THEN
        {fence};
    END IF;
    WITH k AS MATERIALIZED (
        SELECT k.n, k.t, k.i, k.x,
               GREATEST(
                   COALESCE((SELECT e.seq_nr FROM lagompy_events e
                             WHERE e.entity_type = k.t AND e.entity_id = k.i
                             ORDER BY e.seq_nr DESC LIMIT 1), 0),
                   COALESCE((SELECT d.deleted_to FROM lagompy_deletions d
                             WHERE d.entity_type = k.t AND d.entity_id = k.i), 0)) AS h
        FROM unnest(w_type, w_id, w_expected) WITH ORDINALITY AS k(t, i, x, n)
    ), ev AS MATERIALIZED (
        SELECT nextval(seq) AS o, a.*
        FROM (
            SELECT u.m, k.t, k.i, u.s, u.et, u.ev, u.p, u.tg, u.md
            FROM unnest(e_w, e_seq, e_type, e_version, e_payload, e_tags, e_meta)
                 WITH ORDINALITY AS u(w, s, et, ev, p, tg, md, m)
            JOIN k ON k.n = u.w AND k.h = k.x
            ORDER BY u.m
        ) AS a
    ), ins AS (
        INSERT INTO lagompy_events (global_offset, entity_type, entity_id, seq_nr, event_type,
                                    event_version, payload, tags, metadata, written_at_us)
        SELECT ev.o, ev.t, ev.i, ev.s, ev.et, ev.ev, ev.p, ev.tg, ev.md, written_at FROM ev
    ), tg AS (
        INSERT INTO lagompy_event_tags (tag, global_offset)
        SELECT x.tag, ev.o FROM unnest(t_tag, t_m) AS x(tag, m)
        JOIN ev ON ev.m = x.m
    ), rp AS (
        INSERT INTO lagompy_command_replies (entity_type, entity_id, command_id, seq_nr, payload)
        SELECT k.t, k.i, r.c, r.s, r.p
        FROM unnest(r_w, r_command, r_seq, r_payload) AS r(w, c, s, p)
        JOIN k ON k.n = r.w AND k.h = k.x
    )
    SELECT ARRAY(SELECT k.h FROM k ORDER BY k.n),
           ARRAY(SELECT ev.o FROM ev ORDER BY ev.m)
    INTO highest, offsets;
    IF cardinality(offsets) > 0 THEN
        PERFORM pg_notify('lagompy_events', offsets[cardinality(offsets)]::text);
    END IF;
END
$fn$
"""


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(VISIBLE_FUNCTION)
        op.execute(_write_function("PERFORM " + MARK.format(key=_KEY, seq="seq")))


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(_write_function(f"PERFORM pg_advisory_xact_lock(1818717552, {_KEY})"))
        op.execute("DROP FUNCTION lagompy_visible(regclass)")
