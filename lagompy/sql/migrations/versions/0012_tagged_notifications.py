"""Tagged notifications: a write's notification names the tags it wrote (PostgreSQL only).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05

Until this revision a write transaction sent ``pg_notify('lagompy_events', <highest offset>)``
and every tailer of every process listening on the database read again, whatever tags it
follows: with many consumers (read sides, topic producers, the workflow executor's partitions,
each per tag shard) most of those reads came back empty.

``lagompy_write(...)``
    Replaced, with the same arguments: the payload is the highest offset, then, one per line,
    the distinct tags the write carried (``<offset>\\n<tag>\\n<tag>...``; ``<offset>\\n``: no
    tag, which wakes only the tailers of every event). When they would make
    the payload longer than 7,900 bytes (PostgreSQL's limit is 8,000), or a tag holds a line
    break, the payload is the offset alone, as before, and wakes every tailer. A listener of
    the previous version reads only "query again" into a notification, whatever its payload.
    The downgrade puts back the function of revision 0010.

Written by hand, and frozen: a later change is a new revision, never an edit here.
"""

from __future__ import annotations

import importlib

from alembic import op

revision = "0012"
down_revision: str | None = "0011"
branch_labels: str | None = None
depends_on: str | None = None

_r0010 = importlib.import_module("lagompy.sql.migrations.versions.0010_concurrent_writers")

_OLD_NOTIFY = "PERFORM pg_notify('lagompy_events', offsets[cardinality(offsets)]::text);"
_NEW_NOTIFY = """PERFORM pg_notify(
            'lagompy_events', offsets[cardinality(offsets)]::text || COALESCE(
            (SELECT CASE WHEN count(*) = 0 THEN E'\\n'
                         WHEN sum(octet_length(x.tag) + 1) <= 7900
                          AND NOT bool_or(strpos(x.tag, E'\\n') > 0)
                         THEN E'\\n' || string_agg(x.tag, E'\\n') END
               FROM (SELECT DISTINCT u.tag FROM unnest(t_tag) AS u(tag)) AS x), ''));"""


def _write_function(fence: str) -> str:
    old: str = _r0010._write_function(fence)
    if old.count(_OLD_NOTIFY) != 1:
        raise RuntimeError("revision 0012: the write function of 0010 is not the expected one")
    return old.replace(_OLD_NOTIFY, _NEW_NOTIFY)


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(_write_function("PERFORM " + _r0010.MARK.format(key=_r0010._KEY, seq="seq")))


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(
            _r0010._write_function("PERFORM " + _r0010.MARK.format(key=_r0010._KEY, seq="seq"))
        )
