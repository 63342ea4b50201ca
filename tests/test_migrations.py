"""lagompy's Alembic migrations: they build exactly the tables of ``lagompy/sql/_schema.py``, run
once however many migrators start together, commit all or nothing, back ``lagompy migrate``,
and ship inside the wheel.

PostgreSQL cases use fresh schemas (``journal_settings`` / ``postgres_schema`` from conftest).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import POSTGRES_URL, _create_schema, _drop_schema, require_postgres
from sqlalchemy import Column, Integer, MetaData, inspect, select, text
from sqlalchemy.engine import Connection
from typer.testing import CliRunner

from lagompy import AtomicWrite, ConfigurationError, JournalError, JournalSettings, open_storage
from lagompy.cli import build_app
from lagompy.sql import (
    Database,
    current_revision,
    ensure_schema,
    head_revision,
    script_location,
    upgrade,
    upgrade_sql,
)
from lagompy.sql import _schema as schema
from lagompy.sql._migrate import _FIRST_REVISION_TABLES, ADVISORY_LOCK_KEY, VERSION_TABLE

#: journal_settings' PostgreSQL schemas are new, not migrated (what these tests migrate).
pytestmark = pytest.mark.unmigrated

REPO = Path(__file__).resolve().parent.parent
TABLES = sorted(schema.metadata.tables)
HEAD = head_revision()
#: The deletions' columns of revision 0001: the row the tests of other revisions keep.
DELETED = select(
    schema.deletions.c.entity_type, schema.deletions.c.entity_id, schema.deletions.c.deleted_to
)


@pytest.fixture
async def database(journal_settings: JournalSettings) -> AsyncIterator[Database]:
    """A fresh, empty database (SQLite file or PostgreSQL schema), not migrated yet (in a
    module marked ``unmigrated``, as this one is: otherwise ``journal_settings`` hands out a
    migrated one, and the assertion below says so)."""
    db = Database.create(journal_settings)
    assert await current_revision(db) is None, "mark the module `unmigrated`"
    yield db
    await db.dispose()


@pytest.fixture
async def reference(backend: str, tmp_path: Path) -> AsyncIterator[Database]:
    """Another fresh database, for tables made straight from ``schema.metadata``."""
    if backend == "sqlite":
        db = Database.create(url=f"sqlite:///{tmp_path / 'reference.db'}")
        yield db
        await db.dispose()
        return
    require_postgres()
    name = await _create_schema()
    db = Database.create(url=POSTGRES_URL, postgres_schema=name)
    try:
        yield db
    finally:
        await db.dispose()
        await _drop_schema(name)


def _not_the_version_table(obj: Any, name: str | None, type_: str, *_: Any) -> bool:
    return not (type_ == "table" and name == VERSION_TABLE)


async def differences(database: Database, metadata: MetaData = schema.metadata) -> list[Any]:
    """What Alembic's autogenerate would change to turn the database into ``metadata``."""

    def compare(conn: Connection) -> list[Any]:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "include_object": _not_the_version_table}
        )
        return list(compare_metadata(context, metadata))

    async with database.read() as conn:
        return await conn.run_sync(compare)


async def table_names(database: Database) -> list[str]:
    def names(conn: Connection) -> list[str]:
        from sqlalchemy import inspect

        return sorted(inspect(conn).get_table_names())

    async with database.read() as conn:
        return await conn.run_sync(names)


async def catalog(database: Database) -> list[tuple[Any, ...]]:
    """The DDL of everything lagompy created (minus the version table), as the database keeps it."""
    async with database.read() as conn:
        if database.dialect == "sqlite":
            rows = await conn.execute(
                text(
                    "SELECT type, name, tbl_name, sql FROM sqlite_master "
                    "WHERE name LIKE 'lagompy%' AND tbl_name != :version ORDER BY name"
                ),
                {"version": VERSION_TABLE},
            )
            return [tuple(row) for row in rows]
        here = await conn.scalar(text("SELECT current_schema()"))
        queries = [
            "SELECT table_name, column_name, ordinal_position, data_type, is_nullable, "
            "column_default, character_maximum_length FROM information_schema.columns "
            "WHERE table_schema = current_schema() ORDER BY 1, 3",
            "SELECT conrelid::regclass::text, conname, contype, pg_get_constraintdef(oid) "
            "FROM pg_constraint WHERE connamespace = current_schema()::regnamespace ORDER BY 1, 2",
            "SELECT tablename, indexname, indexdef FROM pg_indexes "
            "WHERE schemaname = current_schema() ORDER BY 1, 2",
            "SELECT sequencename, data_type, increment_by, cycle FROM pg_sequences "
            "WHERE schemaname = current_schema() ORDER BY 1",
        ]
        found: list[tuple[Any, ...]] = []
        for query in queries:
            for row in await conn.execute(text(query)):
                found.append(tuple(str(v).replace(f"{here}.", "<schema>.") for v in row))
        return [row for row in found if VERSION_TABLE not in " ".join(row)]


async def downgrade_to(database: Database, revision: str) -> None:
    """Alembic's downgrade of lagompy's tables to ``revision`` (the command line has none)."""
    from alembic import command

    from lagompy.sql._migrate import alembic_config

    def downgrade(conn: Connection) -> None:
        config = alembic_config(
            connection=conn,
            dialect=database.dialect,
            postgres_schema=database.settings.postgres_schema,
        )
        command.downgrade(config, revision)

    async with database.write() as conn:
        await conn.run_sync(downgrade)


# --------------------------------------------------------------------------- the tables


async def test_migrations_build_exactly_the_tables_in_code(database: Database) -> None:
    assert await current_revision(database) is None
    result = await upgrade(database)
    assert (result.before, result.after, result.changed) == (None, HEAD, True)
    assert await current_revision(database) == HEAD
    assert await table_names(database) == sorted([*TABLES, VERSION_TABLE])
    assert await differences(database) == [], (
        "the migrations and lagompy/sql/_schema.py differ: add a revision under "
        "lagompy/sql/migrations/versions/"
    )


async def test_the_comparison_notices_a_difference(database: Database) -> None:
    # Guards the test above: a column in code that no migration creates must show up.
    await upgrade(database)
    changed = MetaData()
    for table in schema.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["lagompy_snapshots"].append_column(Column("extra", Integer, nullable=True))
    diff = await differences(database, changed)
    assert [d[0] for d in diff] == ["add_column"], diff
    assert diff[0][3].name == "extra"


async def test_migrated_ddl_equals_create_all(database: Database, reference: Database) -> None:
    # Down to the column types, defaults (the offset's sequence / AUTOINCREMENT), constraint and
    # index definitions, as the database itself records them.
    await upgrade(database)
    async with reference.write() as conn:
        await conn.run_sync(schema.metadata.create_all)
    migrated = await catalog(database)
    assert migrated == await catalog(reference)
    assert migrated  # the catalog query found something at all
    if database.dialect == "sqlite":
        events_sql = next(row[3] for row in migrated if row[1] == "lagompy_events")
        assert "INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT" in events_sql


async def test_a_second_upgrade_changes_nothing_and_keeps_the_data(database: Database) -> None:
    await upgrade(database)
    async with database.write() as conn:
        await conn.execute(
            schema.deletions.insert().values(entity_type="t", entity_id="1", deleted_to=3)
        )
    again = await upgrade(database)
    assert (again.before, again.after, again.changed) == (HEAD, HEAD, False)
    async with database.read() as conn:
        assert (await conn.execute(DELETED)).all() == [("t", "1", 3)]


async def test_a_failed_upgrade_leaves_nothing_behind(database: Database) -> None:
    # An unrelated index already has the name of one the migration creates (index names are
    # per schema / per database), so the migration fails after creating two tables. All of it,
    # version table included, is rolled back.
    async with database.write() as conn:
        await conn.execute(text("CREATE TABLE other (x INTEGER)"))
        await conn.execute(text("CREATE INDEX ix_lagompy_event_tags_offset ON other (x)"))
    with pytest.raises(JournalError):
        await upgrade(database)
    assert await table_names(database) == ["other"]
    assert await current_revision(database) is None


async def test_0005_adds_the_idempotency_keys_to_a_database_at_0004(database: Database) -> None:
    # A journal migrated by the previous release keeps its data and gains the key table.
    assert (await upgrade(database, "0004")).after == "0004"
    assert "lagompy_idempotency_keys" not in await table_names(database)
    async with database.write() as conn:
        await conn.execute(
            schema.deletions.insert().values(entity_type="t", entity_id="1", deleted_to=3)
        )
    result = await upgrade(database)
    assert (result.before, result.after) == ("0004", HEAD)
    assert await differences(database) == []
    async with database.write() as conn:
        await conn.execute(
            schema.idempotency_keys.insert().values(
                scope="s", idempotency_key="k", method="POST", route="/r", fingerprint="f" * 64,
                created_us=1, in_flight_until_us=0, repeats=0,
            )
        )  # fmt: skip
    async with database.read() as conn:
        assert (await conn.execute(DELETED)).all() == [("t", "1", 3)]
        assert len((await conn.execute(schema.idempotency_keys.select())).all()) == 1


async def test_0006_adds_the_console_audit_to_a_database_at_0005(database: Database) -> None:
    # A journal migrated by the previous release keeps its data and gains the audit table,
    # whose ids the database assigns.
    assert (await upgrade(database, "0005")).after == "0005"
    assert "lagompy_console_audit" not in await table_names(database)
    async with database.write() as conn:
        await conn.execute(
            schema.deletions.insert().values(entity_type="t", entity_id="1", deleted_to=3)
        )
    result = await upgrade(database)
    assert (result.before, result.after) == ("0005", HEAD)
    assert await differences(database) == []
    row = {"at_us": 1, "service": "s", "actor": "a", "action": "pause", "target": "t",
           "result": "ok", "detail": None}  # fmt: skip
    async with database.write() as conn:
        await conn.execute(schema.console_audit.insert(), [row, row])
    async with database.read() as conn:
        assert (await conn.execute(DELETED)).all() == [("t", "1", 3)]
        ids = (await conn.execute(schema.console_audit.select())).scalars().all()
        assert len(set(ids)) == 2


async def test_0009_adds_the_parked_table_to_a_database_at_0008(database: Database) -> None:
    # A database migrated by the previous release keeps its data and gains the parked table;
    # one event is parked once per (consumer, tag, offset).
    assert (await upgrade(database, "0008")).after == "0008"
    assert "lagompy_parked" not in await table_names(database)
    async with database.write() as conn:
        await conn.execute(
            schema.deletions.insert().values(entity_type="t", entity_id="1", deleted_to=3)
        )
    result = await upgrade(database)
    assert (result.before, result.after) == ("0008", HEAD)
    assert await differences(database) == []
    row = {"consumer_kind": "read-side", "consumer": "p", "tag": "t", "event_offset": 7,
           "entity_type": "user", "entity_id": "1", "seq_nr": 1, "event_type": "E",
           "error_class": "ValueError", "error": "ValueError: x", "attempts": 5,
           "parked_at_us": 1, "message": None, "retry_requested_us": None,
           "retries": 0}  # fmt: skip
    async with database.write() as conn:
        await conn.execute(schema.parked.insert(), [row, {**row, "event_offset": 8}])
    with pytest.raises(Exception, match=r"(?i)unique"):
        async with database.write() as conn:
            await conn.execute(schema.parked.insert(), [row])
    async with database.read() as conn:
        assert (await conn.execute(DELETED)).all() == [("t", "1", 3)]
        ids = (await conn.execute(schema.parked.select())).scalars().all()
        assert len(set(ids)) == 2


async def test_0010_lets_journal_writers_run_at_once_on_a_database_at_0009(
    database: Database,
) -> None:
    # Events written before keep their offsets; on PostgreSQL the write function now places a
    # marker (shared) where it took the exclusive lock, and readers ask lagompy_visible.
    from lagompy.journal import Journal
    from lagompy.serialization import Serializer

    assert (await upgrade(database, "0009")).after == "0009"
    async with database.write() as conn:
        await conn.execute(
            schema.deletions.insert().values(entity_type="t", entity_id="1", deleted_to=3)
        )
    result = await upgrade(database)
    assert (result.before, result.after) == ("0009", HEAD)
    assert await differences(database) == []
    journal = Journal(database, Serializer())
    async with database.read() as conn:
        bound = await journal.backend.visible(conn)
        if database.dialect == "postgresql":
            function = (
                "SELECT prosrc FROM pg_proc WHERE proname = 'lagompy_write' "
                "AND pronamespace = current_schema()::regnamespace"
            )
            source = (await conn.execute(text(function))).scalar_one()
            assert "pg_advisory_xact_lock_shared" in source
            assert "pg_advisory_xact_lock(" not in source
            assert bound is not None and bound[0] == bound[1]  # nobody in flight
        else:
            assert bound is None
    async with database.read() as conn:
        assert (await conn.execute(DELETED)).all() == [("t", "1", 3)]


async def test_0011_adds_the_consumer_members_and_downgrades(database: Database) -> None:
    # From the revision before it (with data) to the head, and back: the members table comes
    # and goes, nothing else moves.
    from alembic.script import ScriptDirectory

    from lagompy.sql._migrate import alembic_config

    script = ScriptDirectory.from_config(alembic_config()).get_revision("0011")
    assert script is not None and isinstance(script.down_revision, str)
    before = script.down_revision
    assert (await upgrade(database, before)).after == before
    assert "lagompy_consumer_members" not in await table_names(database)
    async with database.write() as conn:
        await conn.execute(
            schema.deletions.insert().values(entity_type="t", entity_id="1", deleted_to=3)
        )
    result = await upgrade(database)
    assert (result.before, result.after) == (before, HEAD)
    assert await differences(database) == []
    row = {"consumer": "p", "member": "host:1:a", "joined_us": 1, "heartbeat_us": 2,
           "expires_us": 3}  # fmt: skip
    async with database.write() as conn:
        await conn.execute(schema.consumer_members.insert(), [row, {**row, "member": "b"}])
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        async with database.write() as conn:
            await conn.execute(schema.consumer_members.insert(), [row])

    await downgrade_to(database, before)
    assert await current_revision(database) == before
    assert "lagompy_consumer_members" not in await table_names(database)
    async with database.read() as conn:
        assert (await conn.execute(DELETED)).all() == [("t", "1", 3)]
    assert (await upgrade(database)).after == HEAD


async def test_tables_made_before_migrations_are_adopted(database: Database) -> None:
    # lagompy 0.1 created its tables (those of revision 0001) with metadata.create_all and no
    # version table; later revisions add tables (and columns) that 0.1 never had.
    await upgrade(database, "0001")
    async with database.write() as conn:
        await conn.execute(text(f"DROP TABLE {VERSION_TABLE}"))
        assert sorted(await conn.run_sync(lambda c: inspect(c).get_table_names())) == sorted(
            _FIRST_REVISION_TABLES
        )
        await conn.execute(
            schema.deletions.insert().values(entity_type="t", entity_id="1", deleted_to=3)
        )
    result = await upgrade(database)
    assert result.after == HEAD
    assert await differences(database) == []
    async with database.read() as conn:
        assert (await conn.execute(DELETED)).all() == [("t", "1", 3)]


async def test_some_but_not_all_tables_is_a_configuration_error(database: Database) -> None:
    async with database.write() as conn:
        await conn.run_sync(schema.events.create)
    with pytest.raises(ConfigurationError, match="lagompy_events"):
        await upgrade(database)


async def test_an_unknown_revision_is_a_configuration_error(database: Database) -> None:
    await upgrade(database)
    async with database.write() as conn:
        await conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = 'fffffff'"))
    with pytest.raises(ConfigurationError, match="does not know"):
        await ensure_schema(database, auto_migrate=True)
    with pytest.raises(ConfigurationError, match="fffffff"):
        await upgrade(database)


# --------------------------------------------------------------------------- concurrency


async def test_concurrent_upgrades_from_tasks(journal_settings: JournalSettings) -> None:
    # Each task has its own engine (own connections), as separate processes would.
    databases = [Database.create(journal_settings) for _ in range(5)]
    try:
        results = await asyncio.gather(*(upgrade(db) for db in databases))
        assert sum(r.changed for r in results) == 1, results
        assert {r.after for r in results} == {HEAD}
        assert await differences(databases[0]) == []
    finally:
        for db in databases:
            await db.dispose()


async def test_concurrent_upgrades_of_different_databases_in_one_process(tmp_path: Path) -> None:
    # No database lock orders these; Alembic's module-global `op` / `context` proxies would mix
    # up the migrations if they interleaved (KeyError 'config', tables in the wrong file).
    databases = [Database.create(url=f"sqlite:///{tmp_path / f'db{i}.db'}") for i in range(4)]
    try:
        results = await asyncio.gather(*(upgrade(db) for db in databases))
        assert all(r.changed and r.after == HEAD for r in results), results
        for db in databases:
            assert await table_names(db) == sorted([*TABLES, VERSION_TABLE])
    finally:
        for db in databases:
            await db.dispose()


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Any:
    return subprocess.Popen(
        [sys.executable, "-m", "lagompy", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        cwd=cwd,
    )


def _finish(proc: Any) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


async def test_concurrent_upgrades_from_processes(journal_settings: JournalSettings) -> None:
    args = ["migrate", "--url", journal_settings.url]
    if journal_settings.postgres_schema:
        args += ["--schema", journal_settings.postgres_schema]
    procs = [_cli(*args) for _ in range(4)]
    outcomes = [await asyncio.to_thread(_finish, p) for p in procs]
    assert [code for code, _, _ in outcomes] == [0] * 4, outcomes
    assert sum("upgraded lagompy's tables" in out for _, out, _ in outcomes) == 1, outcomes
    assert sum("up to date" in out for _, out, _ in outcomes) == 3, outcomes
    db = Database.create(journal_settings)
    try:
        assert await current_revision(db) == HEAD
        assert await differences(db) == []
    finally:
        await db.dispose()


@pytest.mark.postgres
async def test_the_postgres_migration_holds_the_advisory_lock(postgres_schema: str) -> None:
    # While another session holds the lock, an upgrade waits; it completes once the lock is free.
    import asyncpg

    holder = await asyncpg.connect(POSTGRES_URL)
    db = Database.create(url=POSTGRES_URL, postgres_schema=postgres_schema)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)
        task = asyncio.create_task(upgrade(db))
        await asyncio.sleep(0.5)
        assert not task.done()
        await holder.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)
        assert (await asyncio.wait_for(task, 30)).after == HEAD
    finally:
        await holder.close()
        await db.dispose()


@pytest.mark.postgres
async def test_upgrade_creates_a_missing_postgres_schema(postgres_schema: str) -> None:
    name = postgres_schema + "_new"
    db = Database.create(url=POSTGRES_URL, postgres_schema=name)
    try:
        assert await current_revision(db) is None
        assert (await upgrade(db)).after == HEAD
        assert await table_names(db) == sorted([*TABLES, VERSION_TABLE])
    finally:
        await db.dispose()
        await _drop_schema(name)


# --------------------------------------------------------------------------- open_storage


async def test_sqlite_journals_migrate_themselves(tmp_path: Path) -> None:
    async with await open_storage(f"sqlite:///{tmp_path / 'j.db'}") as storage:
        assert await current_revision(storage.database) == HEAD


async def test_without_auto_migrate_missing_tables_name_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    with pytest.raises(ConfigurationError) as info:
        await open_storage(f"sqlite:///{path}", auto_migrate=False)
    message = str(info.value)
    assert "are missing" in message
    assert f"run `lagompy migrate --url sqlite:///{path}`" in message
    assert "\n" not in message


@pytest.mark.postgres
async def test_postgres_is_not_migrated_by_default_and_the_hint_works(
    postgres_schema: str,
) -> None:
    with_password = POSTGRES_URL.replace("postgres@", "postgres:s3cret@", 1)
    assert "s3cret" in with_password  # the server trusts local users: the password is ignored
    with pytest.raises(ConfigurationError) as info:
        await open_storage(with_password, postgres_schema=postgres_schema)
    message = str(info.value)
    assert "s3cret" not in message
    command = re.search(r"run `([^`]+)`", message)
    assert command is not None, message
    words = shlex.split(command[1])
    assert words[:2] == ["lagompy", "migrate"]
    assert words[-2:] == ["--schema", postgres_schema]
    # Doing what the message says fixes it.
    code, out, err = _finish(_cli(*words[1:]))
    assert code == 0, (out, err)
    async with await open_storage(POSTGRES_URL, postgres_schema=postgres_schema) as storage:
        assert await current_revision(storage.database) == HEAD


async def test_outdated_tables_name_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'j.db'}"
    async with await open_storage(url):  # migrated to this version's head
        pass
    from lagompy.sql import _migrate

    monkeypatch.setattr(_migrate, "_revisions", lambda: ("9999", frozenset({HEAD, "9999"})))
    expected = f"at revision {HEAD}, not 9999 and auto_migrate is off: run `lagompy migrate"
    with pytest.raises(ConfigurationError, match=expected):
        await open_storage(url, auto_migrate=False)


# --------------------------------------------------------------------------- lagompy migrate


def test_cli_migrates_a_fresh_sqlite_file_and_shows_current(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    code, out, err = _finish(_cli("migrate", "current", "--url", url))
    assert (code, out) == (0, f"none (head is {HEAD}: run lagompy migrate)\n"), err
    code, out, err = _finish(_cli("migrate", "--url", url))
    assert code == 0, err
    assert "upgraded lagompy's tables" in out and f"from none to {HEAD}" in out
    code, out, err = _finish(_cli("migrate", "current", "--url", url))
    assert (code, out) == (0, f"{HEAD} (head)\n"), err
    import sqlite3

    with sqlite3.connect(tmp_path / "fresh.db") as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert set(TABLES) | {VERSION_TABLE} <= names


def test_cli_url_defaults_to_the_journal_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAGOMPY_JOURNAL_URL", f"sqlite:///{tmp_path / 'env.db'}")
    runner = CliRunner()
    result = runner.invoke(build_app(), ["migrate"], prog_name="lagompy")
    assert result.exit_code == 0, result.output
    assert "env.db" in result.stdout
    # Options given before the subcommand apply to it as well.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    result = runner.invoke(build_app(), ["migrate", "--url", other, "current"], prog_name="lagompy")
    assert (result.exit_code, result.stdout) == (0, f"none (head is {HEAD}: run lagompy migrate)\n")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://postgres:pw@127.0.0.1:1/none", "the database cannot be reached"),
        ("mysql://u@h/db", "unsupported database 'mysql'"),
        ("sqlite:////no/such/directory/x.db", "does not exist"),
        ("::not a url::", "invalid database URL"),
    ],
)
def test_cli_errors_are_one_line(url: str, expected: str) -> None:
    for args in (["migrate", "--url", url], ["migrate", "current", "--url", url]):
        result = CliRunner().invoke(build_app(), args, prog_name="lagompy")
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("error: ") and expected in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1
        assert "pw@" not in result.stderr


def test_cli_sql_prints_the_script_without_connecting() -> None:
    # Port 1: nothing listens there, so any connection attempt would fail.
    url = "postgresql://postgres@127.0.0.1:1/none"
    result = CliRunner().invoke(
        build_app(), ["migrate", "--sql", "--url", url, "--schema", "app"], prog_name="lagompy"
    )
    assert result.exit_code == 0, result.output
    sql = result.stdout
    assert sql.index("BEGIN;") < sql.index(f"pg_advisory_xact_lock({ADVISORY_LOCK_KEY})")
    assert 'SET LOCAL search_path TO "app"' in sql
    assert f"CREATE TABLE {VERSION_TABLE}" in sql
    assert "CREATE TABLE lagompy_events" in sql and "BIGSERIAL" in sql
    assert sql.rstrip().endswith("COMMIT;")
    sqlite_sql = upgrade_sql(JournalSettings(url="sqlite:///x.db"))
    assert "AUTOINCREMENT" in sqlite_sql and "pg_advisory" not in sqlite_sql


# --------------------------------------------------------------------------- packaging


MIGRATIONS = REPO / "lagompy" / "sql" / "migrations"


def test_the_scripts_sit_in_the_package() -> None:
    assert script_location() == MIGRATIONS
    for name in ("env.py", "script.py.mako", "README.md", "versions"):
        assert (MIGRATIONS / name).exists(), name


def _packages_under(root: Path, prefix: str) -> set[str]:
    return {
        ".".join([prefix, *init.parent.relative_to(root).parts])
        for init in root.rglob("__init__.py")
        if "__pycache__" not in init.parts
    }


def test_the_wheel_ships_the_migrations_and_they_run_installed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "lagompy", src / "lagompy", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(wheels), str(src)],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("lagompy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    for path in ("env.py", "script.py.mako", "README.md", "versions/__init__.py"):
        assert f"lagompy/sql/migrations/{path}" in names, path
    for version in (MIGRATIONS / "versions").glob("*.py"):
        assert f"lagompy/sql/migrations/versions/{version.name}" in names, version.name
    # The console's templates and script (package data too).
    console = REPO / "lagompy" / "console"
    for data in [*console.glob("templates/*.html"), *console.glob("static/*")]:
        assert f"lagompy/console/{data.relative_to(console).as_posix()}" in names, data.name
    shipped = {
        n[: -len("/__init__.py")].replace("/", ".") for n in names if n.endswith("/__init__.py")
    }
    expected = _packages_under(REPO / "lagompy", "lagompy")
    missing = expected - shipped
    assert not missing, f"the wheel lacks {sorted(missing)}: see pyproject.toml's [tool.setuptools]"

    # Installed as plain files (no editable finder, no repository on the path), the CLI finds
    # its scripts inside the installed package and migrates a database.
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
         "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    located = subprocess.run(
        [sys.executable, "-c", "from lagompy.sql import script_location as s; print(s())"],
        capture_output=True, text=True, timeout=60, cwd=work, env=env, check=False,
    )  # fmt: skip
    assert located.returncode == 0, located.stderr
    assert Path(located.stdout.strip()) == site / "lagompy" / "sql" / "migrations"
    code, out, err = _finish(_cli("migrate", "--url", "sqlite:///installed.db", env=env, cwd=work))
    assert code == 0, err
    assert f"from none to {HEAD}" in out
    code, out, err = _finish(_cli("migrate", "current", "--url", "sqlite:///installed.db",
                                  env=env, cwd=work))  # fmt: skip
    assert (code, out) == (0, f"{HEAD} (head)\n"), err


async def test_0012_names_the_tags_in_the_notification_and_downgrades(database: Database) -> None:
    # PostgreSQL: the write function's notification gains the tags, and loses them on the way
    # down; SQLite has no function, the revision changes nothing there.

    function = (
        "SELECT prosrc FROM pg_proc WHERE proname = 'lagompy_write' "
        "AND pronamespace = current_schema()::regnamespace"
    )

    async def source() -> str | None:
        if database.dialect != "postgresql":
            return None
        async with database.read() as conn:
            return str((await conn.execute(text(function))).scalar_one())

    assert (await upgrade(database, "0011")).after == "0011"
    before = await source()
    assert before is None or "string_agg" not in before
    assert (await upgrade(database)).after == HEAD
    after = await source()
    assert after is None or (
        "string_agg(x.tag" in after and "pg_advisory_xact_lock_shared" in after
    )
    assert await differences(database) == []

    await downgrade_to(database, "0011")
    assert await current_revision(database) == "0011"
    assert await source() == before
    assert (await upgrade(database)).after == HEAD


@dataclass(frozen=True)
class Marked:
    n: int


async def test_0013_gives_every_event_its_slice_and_downgrades(database: Database) -> None:
    # Events written at 0012 (no slice column) get their entity's slice, computed in SQL, the
    # offsets and everything else untouched; on SQLite the table is rebuilt and the offsets'
    # counter survives (an offset handed out and deleted before is never used again).

    from lagompy.journal import Journal, slice_of
    from lagompy.serialization import Serializer

    assert (await upgrade(database, "0012")).after == "0012"
    ids = ["a", "user-42", "ünïcode", "日本", "x" * 255, *(f"e{n}" for n in range(50))]
    columns = (
        "global_offset, entity_type, entity_id, seq_nr, event_type, event_version, payload, "
        "tags, written_at_us, metadata"
    )
    insert = text(
        f"INSERT INTO lagompy_events ({columns}) VALUES "
        "(:o, 't', :i, :s, 'E', 1, :p, NULL, 5, NULL)"
    )
    rows: list[dict[str, Any]] = [
        {"o": 10 * n + s, "i": i, "s": s, "p": f"{i}/{s}".encode()}
        for n, i in enumerate(ids, 1)
        for s in (1, 2)
    ]
    top = max(r["o"] for r in rows) + 7
    async with database.write() as conn:
        await conn.execute(insert, rows)
        # The highest offset handed out was deleted since.
        await conn.execute(insert, {"o": top, "i": "gone", "s": 1, "p": b""})
        await conn.execute(text("DELETE FROM lagompy_events WHERE entity_id = 'gone'"))
        if database.dialect == "postgresql":  # as the journal's nextval would have left it
            await conn.execute(
                text(
                    "SELECT setval(pg_get_serial_sequence('lagompy_events', 'global_offset'), :o)"
                ),
                {"o": top},
            )
    assert (await upgrade(database)).after == HEAD
    assert await differences(database) == []
    async with database.read() as conn:
        found = (
            await conn.execute(
                text(f"SELECT {columns}, slice FROM lagompy_events ORDER BY global_offset")
            )
        ).all()
    assert [(r[0], r[2], r[3], bytes(r[6])) for r in found] == [
        (r["o"], r["i"], r["s"], r["p"]) for r in rows
    ]
    assert all(r[10] == slice_of(r[2]) for r in found)
    serializer = Serializer()
    serializer.register(Marked)
    journal = Journal(database, serializer)
    written = await journal.append([AtomicWrite("t", "ünïcode", 2, [Marked(3)])])
    assert written[0].ok, written[0].error
    (envelope,) = written[0].envelopes
    assert envelope.offset > top
    async with database.read() as conn:
        stored = await conn.execute(
            text("SELECT slice FROM lagompy_events WHERE global_offset = :o"),
            {"o": envelope.offset},
        )
        assert stored.scalar_one() == slice_of("ünïcode")

    await downgrade_to(database, "0012")
    assert await current_revision(database) == "0012"

    def event_columns(conn: Connection) -> list[str]:
        return [c["name"] for c in inspect(conn).get_columns("lagompy_events")]

    async with database.read() as conn:
        assert "slice" not in await conn.run_sync(event_columns)
    assert (await upgrade(database)).after == HEAD
    assert await differences(database) == []


async def test_0014_records_where_forgotten_entities_restarted_and_downgrades(
    database: Database,
) -> None:
    # Deletions written at 0013: an entity with no event left was forgotten (restarted_at =
    # deleted_to); one with events left keeps 0, whether its events were deleted in part or it
    # was forgotten and wrote again (the two cannot be told apart); the entity type counts.
    from lagompy.journal import Journal, slice_of
    from lagompy.serialization import Serializer

    assert (await upgrade(database, "0013")).after == "0013"
    insert_event = text(
        "INSERT INTO lagompy_events (entity_type, entity_id, seq_nr, event_type, event_version, "
        "payload, tags, written_at_us, metadata, slice) "
        "VALUES (:t, :i, :s, 'E', 1, :p, NULL, 5, NULL, :sl)"
    )
    events = [("t", "half", 3), ("t", "half", 4), ("t", "back", 6), ("u", "gone", 8)]
    deletions = [("t", "gone", 3), ("t", "half", 2), ("t", "back", 5), ("u", "gone", 7)]
    async with database.write() as conn:
        await conn.execute(
            insert_event,
            [{"t": t, "i": i, "s": s, "p": b"x", "sl": slice_of(i)} for t, i, s in events],
        )
        await conn.execute(
            text("INSERT INTO lagompy_deletions VALUES (:t, :i, :d)"),
            [{"t": t, "i": i, "d": d} for t, i, d in deletions],
        )
    assert (await upgrade(database)).after == HEAD
    assert await differences(database) == []
    d = schema.deletions
    rows = select(d.c.entity_type, d.c.entity_id, d.c.deleted_to, d.c.restarted_at).order_by(
        d.c.entity_type, d.c.entity_id
    )
    async with database.read() as conn:
        assert (await conn.execute(rows)).all() == [
            ("t", "back", 5, 0),
            ("t", "gone", 3, 3),
            ("t", "half", 2, 0),
            ("u", "gone", 7, 0),
        ]
    # The journal reads and writes the column.
    serializer = Serializer()
    serializer.register(Marked)
    journal = Journal(database, serializer)
    assert await journal.deletions("t", "gone") == (3, 3)
    assert await journal.delete_events("t", "half", 9) == 2
    assert await journal.deletions("t", "half") == (4, 4)
    # A writer of the previous version inserts no restarted_at: the default, 0.
    async with database.write() as conn:
        await conn.execute(
            text(
                "INSERT INTO lagompy_deletions (entity_type, entity_id, deleted_to) "
                "VALUES ('v', 'old', 2)"
            )
        )
    async with database.read() as conn:
        assert (await conn.execute(rows.where(d.c.entity_type == "v"))).all() == [
            ("v", "old", 2, 0)
        ]

    await downgrade_to(database, "0013")
    assert await current_revision(database) == "0013"

    def deletion_columns(conn: Connection) -> list[str]:
        return [c["name"] for c in inspect(conn).get_columns("lagompy_deletions")]

    async with database.read() as conn:
        assert await conn.run_sync(deletion_columns) == ["entity_type", "entity_id", "deleted_to"]
        assert (await conn.execute(DELETED.order_by(d.c.entity_type, d.c.entity_id))).all() == [
            ("t", "back", 5),
            ("t", "gone", 3),
            ("t", "half", 4),
            ("u", "gone", 7),
            ("v", "old", 2),
        ]
    assert (await upgrade(database)).after == HEAD
    assert await differences(database) == []
    async with database.read() as conn:
        assert (await conn.execute(rows)).all()[:3] == [
            ("t", "back", 5, 0),
            ("t", "gone", 3, 3),
            ("t", "half", 4, 4),
        ]


def test_0014_is_in_the_offline_script_of_both_databases() -> None:
    expected = {
        "postgresql://postgres@127.0.0.1:1/none": "SET restarted_at = deleted_to WHERE NOT EXISTS",
        "sqlite:///x.db": "THEN old.deleted_to ELSE 0 END",
    }
    for url, text_ in expected.items():
        sql = upgrade_sql(JournalSettings(url=url), "0013:0014")
        assert "restarted_at BIGINT DEFAULT 0 NOT NULL" in sql and text_ in sql, sql
