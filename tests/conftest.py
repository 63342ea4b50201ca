"""Shared fixtures: journal backends (SQLite files and PostgreSQL schemas) and Hypothesis profiles.

PostgreSQL comes from ``LAGOMPY_TEST_POSTGRES_URL`` (default: the local server). Locally, tests
that need it are skipped with the reason when it cannot be reached; under CI (``CI=true``) they
fail instead, so a missing server can never turn into a green run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings

from lagompy.settings import JournalSettings, PlacedDatabase

if TYPE_CHECKING:
    from lagompy import Storage

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

POSTGRES_URL = os.environ.get(
    "LAGOMPY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
UNDER_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

_pg_status: tuple[bool, str] | None = None


def tuned(collector: dict[str, int]) -> bool:
    """Whether a process's ``collector_state()`` (an actor's ``ping()["collector"]``) is
    tuned as lagompy's own processes tune it (lagompy/_collector.py)."""
    from lagompy._collector import GC_THRESHOLD

    return collector["threshold"] == GC_THRESHOLD and collector["frozen"] > 0


def _postgres_reachable() -> tuple[bool, str]:
    global _pg_status
    if _pg_status is None:
        import asyncpg

        async def probe() -> None:
            conn = await asyncpg.connect(POSTGRES_URL, timeout=5)
            await conn.close()

        try:
            # In a thread of its own: this may be called while an event loop is running.
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pool.submit(asyncio.run, probe()).result()
            _pg_status = (True, "")
        except Exception as e:  # any failure to connect means "unreachable"
            _pg_status = (False, f"PostgreSQL at {POSTGRES_URL} is unreachable: {e!r}")
    return _pg_status


def require_postgres() -> None:
    ok, reason = _postgres_reachable()
    if not ok:
        if UNDER_CI:
            pytest.fail(f"{reason} (CI=true: PostgreSQL tests must run)")
        pytest.skip(reason)


async def _create_schema() -> str:
    import asyncpg

    name = f"lagompy_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(f'CREATE SCHEMA "{name}"')
    finally:
        await conn.close()
    return name


async def _drop_schema(name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


async def _empty_schema(name: str) -> None:
    """Empties every table of a schema but lagompy's migration version table, restarting
    their sequences: the rows and offsets of a freshly migrated schema, without the ~0.5 s of
    creating and migrating one (for tests that run many examples on one schema)."""
    import asyncpg

    from lagompy.sql._migrate import VERSION_TABLE

    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1 AND tablename <> $2",
            name,
            VERSION_TABLE,
        )
        sequences = await conn.fetch(
            "SELECT sequencename FROM pg_sequences WHERE schemaname = $1", name
        )
        # DELETE and RESTART in one transaction: on tables this small, 10x faster than one
        # TRUNCATE (which makes new files for every table); no migration adds a foreign key.
        await conn.execute(
            "BEGIN;"
            + "".join(f'DELETE FROM "{name}"."{t["tablename"]}";' for t in tables)
            + "".join(f'ALTER SEQUENCE "{name}"."{q["sequencename"]}" RESTART;' for q in sequences)
            + "COMMIT;"
        )
    finally:
        await conn.close()


@pytest.fixture
async def postgres_schema() -> AsyncIterator[str]:
    """A fresh PostgreSQL schema, dropped after the test."""
    require_postgres()
    name = await _create_schema()
    yield name
    await _drop_schema(name)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


#: What ``pg_dump`` gives of a schema lagompy has just migrated (its tables, indexes,
#: functions and version rows), its name as ``_TEMPLATE_NAME``; "" when it cannot be had.
_migrated_ddl: str | None = None
_TEMPLATE_NAME = "lagompy_test_template_schema"


async def _migrated_schema_ddl() -> str:
    global _migrated_ddl
    if _migrated_ddl is None:
        import subprocess

        from lagompy import Serializer, open_storage

        template = await _create_schema()
        try:
            js = JournalSettings(url=POSTGRES_URL, postgres_schema=template, auto_migrate=True)
            async with await open_storage(settings=js, serializer=Serializer([])):
                pass
            dump = subprocess.run(
                [
                    "pg_dump",
                    "--inserts",
                    "--no-owner",
                    "--no-privileges",
                    "-n",
                    template,
                    POSTGRES_URL,
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except OSError:  # no pg_dump: each schema is migrated when it opens
            _migrated_ddl = ""
        else:
            # Without psql's meta-commands (\restrict ...): the rest is plain SQL.
            lines = [line for line in dump.stdout.splitlines() if not line.startswith("\\")]
            ddl = "\n".join(lines).replace(template, _TEMPLATE_NAME)
            _migrated_ddl = ddl if dump.returncode == 0 and _TEMPLATE_NAME in ddl else ""
        finally:
            await _drop_schema(template)
    return _migrated_ddl


async def _create_migrated_schema() -> str:
    """A new PostgreSQL schema holding what lagompy's migrations make of a new one, copied
    in one transaction from a schema migrated once per session (0.2 s where migrating each
    took 0.5-0.7 s); a new, empty schema when the copy cannot be made (no pg_dump)."""
    import asyncpg

    ddl = await _migrated_schema_ddl()
    if not ddl:
        return await _create_schema()
    name = f"lagompy_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute("BEGIN;" + ddl.replace(_TEMPLATE_NAME, name) + ";COMMIT;")
    finally:
        await conn.close()
    return name


_sqlite_template: Path | None = None


async def _copy_migrated_sqlite(path: Path) -> None:
    """Writes at ``path`` a SQLite journal lagompy has migrated, copied from one migrated once
    per session (a new file's first open runs every migration: 0.1-0.4 s)."""
    global _sqlite_template
    if _sqlite_template is None:
        import atexit
        import contextlib
        import shutil
        import sqlite3
        import tempfile

        from lagompy import Serializer, open_storage

        directory = tempfile.mkdtemp(prefix="lagompy-test-template-")
        atexit.register(shutil.rmtree, directory, True)
        template = Path(directory) / "journal.db"
        js = JournalSettings(url=f"sqlite:///{template}")
        async with await open_storage(settings=js, serializer=Serializer([])):
            pass
        # Out of WAL mode: the whole journal in the one file that is copied (the first open
        # of a copy switches it to WAL, as it does a new file).
        with contextlib.closing(sqlite3.connect(template)) as conn:
            assert conn.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
        _sqlite_template = template
    import shutil

    shutil.copyfile(_sqlite_template, path)


@pytest.fixture
async def journal_settings(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[JournalSettings]:
    """Settings for a fresh, empty journal: a new SQLite file or PostgreSQL schema, already
    migrated (a copy of one migrated once) unless the test is marked ``unmigrated`` (then the
    journal migrates it when it opens: a new file by default, a schema with auto_migrate)."""
    if backend == "sqlite":
        if not request.node.get_closest_marker("unmigrated"):
            await _copy_migrated_sqlite(tmp_path / "journal.db")
        yield JournalSettings(url=f"sqlite:///{tmp_path / 'journal.db'}")
        return
    require_postgres()
    if request.node.get_closest_marker("unmigrated"):
        name = await _create_schema()
    else:
        name = await _create_migrated_schema()
    try:
        yield JournalSettings(url=POSTGRES_URL, postgres_schema=name, auto_migrate=True)
    finally:
        await _drop_schema(name)


#: Makes the settings of a journal placed on ``n`` databases (see ``placed``).
Placed = Callable[[int], Awaitable[JournalSettings]]


def placed_slices(n: int) -> list[str]:
    """The slice ranges of the n - 1 databases besides the home one (which keeps the first)."""
    size = 1024 // n
    return [f"{i * size}-{(i + 1) * size - 1 if i < n - 1 else 1023}" for i in range(1, n)]


def placed_cli(settings: JournalSettings) -> tuple[dict[str, str], list[str]]:
    """(environment, options) that give ``lagompy`` commands this placed journal: its other
    databases in LAGOMPY_JOURNAL_DATABASES, its home database as --journal-url (-schema)."""
    import json

    env = {
        "LAGOMPY_JOURNAL_DATABASES": json.dumps(
            {n: p.model_dump() for n, p in settings.databases.items()}
        )
    }
    args = ["--journal-url", settings.url]
    if settings.postgres_schema:
        args += ["--journal-schema", settings.postgres_schema]
    return env, args


@pytest.fixture
async def placed(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Placed]:
    """Makes the settings of a fresh journal placed on ``n`` databases (home, b, c...): SQLite
    files (the home one the same file on every call), or PostgreSQL schemas of the test
    database (new ones on every call, migrated as ``journal_settings``' are), dropped after
    the test."""
    schemas: list[str] = []
    fresh = _create_schema if request.node.get_closest_marker("unmigrated") else None

    async def make(n: int) -> JournalSettings:
        names = [chr(ord("b") + i) for i in range(n - 1)]
        if backend == "sqlite":
            return JournalSettings(
                url=f"sqlite:///{tmp_path / 'home.db'}",
                databases={
                    name: PlacedDatabase(url=f"sqlite:///{tmp_path / f'{name}.db'}", slices=s)
                    for name, s in zip(names, placed_slices(n), strict=True)
                },
            )
        require_postgres()
        for _ in range(n):
            schemas.append(await (fresh or _create_migrated_schema)())
        home, *others = schemas[-n:]
        return JournalSettings(
            url=POSTGRES_URL,
            postgres_schema=home,
            auto_migrate=True,
            databases={
                name: PlacedDatabase(url=POSTGRES_URL, slices=s, postgres_schema=schema)
                for name, s, schema in zip(names, placed_slices(n), others, strict=True)
            },
        )

    yield make
    for schema in schemas:
        await _drop_schema(schema)


@pytest.fixture
async def pg_storage(postgres_schema: str) -> AsyncIterator[Storage]:
    """A ``Storage`` of the example's users in a fresh PostgreSQL schema (for what only
    PostgreSQL has: LISTEN/NOTIFY)."""
    from examples.user_service.entity import UserEntity
    from lagompy import open_storage

    settings = JournalSettings(url=POSTGRES_URL, postgres_schema=postgres_schema, auto_migrate=True)
    s = await open_storage(settings=settings, entities=[UserEntity])
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(scope="session")
def mypy_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mypy cache directory for the session's strict checks of users' code
    (tests/test_settings_typing.py): pytest's cache when it is on (kept between runs), else a
    temporary directory of the session (with ``-p no:cacheprovider``). Incremental mypy rechecks
    what changed, so a warm cache changes the time of a check, never its errors."""
    cached = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    if cached is not None:
        return Path(cached.mkdir("mypy-strict"))
    return tmp_path_factory.mktemp("mypy-strict")


# --------------------------------------------------------------------------- Ray

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def ray_session() -> Iterator[object]:
    """One Ray for the whole test session (each xdist worker's session: pyproject's addopts run
    two): a fresh local one (``RAY_ADDRESS`` attaches to a running cluster instead), shut down at
    the end. Ray workers start with this process's own
    path entries on their path (the repository root, ``tests/``: lagompy's ``job_config``, as
    ``lagompy.start`` does when it starts Ray), so they import ``examples`` and ``tests``
    modules like the tests do, and actors need no ``runtime_env`` of their own (which would
    cost each a new worker process)."""
    import ray

    from lagompy.runtime._ray_cluster import job_config

    if ray.is_initialized():
        yield ray
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, job_config=job_config(), include_dashboard=False)
    else:
        ray.init(
            address="local",
            num_cpus=2,
            object_store_memory=150 * 1024 * 1024,
            include_dashboard=False,
            job_config=job_config(),
            log_to_driver=False,
        )
    try:
        yield ray
    finally:
        ray.shutdown()
