"""The journal's one-round-trip write, as a function (PostgreSQL only).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24

``lagompy_write(...)``
    Appends the events, tags and command replies of a small batch of writes in one statement
    that is its own transaction: it takes the journal's write fence
    (``pg_advisory_xact_lock(1818717552, <lagompy_events oid - 2^31>)``, unless ``fence`` is
    false), then checks every write's expected sequence number (deletions included), allocates
    the offsets of the writes that passed, inserts their events, tags and replies, and sends the
    NOTIFY. It returns each write's current highest sequence number and the offsets allocated.
    A PL/pgSQL function takes a fresh snapshot for each statement, so the check sees everything
    committed before the fence was granted; the fence is held until the commit. The journal
    calls it outside a transaction: one round trip where ``BEGIN``, the statement and
    ``COMMIT`` took three. SQLite has no functions and keeps its own write path.

Written by hand, and frozen: a later change is a new revision, never an edit here.
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

WRITE_FUNCTION = """
CREATE FUNCTION lagompy_write(
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
        PERFORM pg_advisory_xact_lock(1818717552,
            ('lagompy_events'::regclass::oid::bigint - 2147483648)::int);
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
        op.execute(WRITE_FUNCTION)


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(
            "DROP FUNCTION lagompy_write(boolean, text[], text[], bigint[], regclass, bigint[], "
            "bigint[], text[], int[], bytea[], bytea[], bytea[], bigint, text[], bigint[], "
            "bigint[], text[], bigint[], bytea[])"
        )
