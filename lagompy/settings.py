"""Settings: keyword arguments with documented defaults, overridable from the environment.

Each settings class reads environment variables with its own prefix; a keyword argument given in
code wins over the environment, which wins over the default::

    JournalSettings()                          # url from LAGOMPY_JOURNAL_URL, else ./lagompy.db
    JournalSettings(url="postgresql://...")    # explicit

A bad value, given in code or found in the environment, raises
:class:`~lagompy.errors.ConfigurationError` naming the setting and its environment variable.

**Settings object and keywords.** Every function that takes a settings object and keywords for
its fields (``open_storage(url, settings=..., pool_size=...)``, ``start``, ``start_readside``,
``Service(journal_url=..., journal_settings=...)``, ``ServiceClient``, ``CircuitBreaker``...)
resolves them with :func:`make_settings`, by one rule: the settings object is the base, each
keyword given explicitly replaces its field (``url`` included), and without a settings object
the environment, then the defaults, fill the fields no keyword gives. Giving both never drops
either.
"""

from __future__ import annotations

import re
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from lagompy._collector import CollectorPolicy
from lagompy.errors import InvalidSettings


class LagompySettings(BaseSettings):
    """The base of lagompy's settings classes: pydantic-settings, with a bad value (a keyword
    or an environment variable) raised as :class:`~lagompy.errors.ConfigurationError` naming
    the setting, its environment variable and what was wrong, instead of pydantic's
    ``ValidationError``. A number must be finite: ``inf`` passed every bound and failed later,
    far from the setting (a lease of ``inf`` seconds as microseconds, say)."""

    # Merged into every subclass's own model_config.
    model_config = SettingsConfigDict(allow_inf_nan=False)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise settings_error(type(self), e) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # A keyword replaces its field whole: pydantic-settings would merge a dict-valued
        # keyword (``databases={}``) with the same field's environment variable.
        return (
            init_settings,
            _Unless(env_settings, init_settings),
            _Unless(dotenv_settings, init_settings),
            _Unless(file_secret_settings, init_settings),
        )

    @classmethod
    def env_name(cls, field: str) -> str:
        """The environment variable that sets ``field``."""
        return f"{cls.model_config.get('env_prefix', '')}{field.upper()}"


S = TypeVar("S", bound=LagompySettings)


class _Unless(PydanticBaseSettingsSource):
    """A source's values but those of the fields the keywords (``init``) give."""

    def __init__(
        self, source: PydanticBaseSettingsSource, init: PydanticBaseSettingsSource
    ) -> None:
        super().__init__(source.settings_cls)
        self._source, self._init = source, init

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._source.get_field_value(field, field_name)  # unused: __call__ is

    def __call__(self) -> dict[str, Any]:
        given = self._init()
        return {k: v for k, v in self._source().items() if k not in given}


#: The password of a URL (``scheme://user:password@host``), never shown in an error.
_PASSWORD = re.compile(r"(//[^/:@\s]*:)[^@\s/]*@")


def without_password(text: str) -> str:
    """``text`` with the password of every URL in it shown as ``***``."""
    return _PASSWORD.sub(r"\1***@", text)


def settings_error(cls: type[LagompySettings], error: ValidationError) -> InvalidSettings:
    """``error`` as an ``InvalidSettings`` (a ``ConfigurationError``) that names each bad
    setting of ``cls``, its environment variable, what was wrong and the value given."""
    problems = []
    fields: list[str] = []
    for err in error.errors():
        if not err["loc"]:  # a check of several fields together: its message names them
            problems.append(err["msg"].removeprefix("Value error, "))
            continue
        name = ".".join(str(part) for part in err["loc"])
        inner = err.get("ctx", {}).get("error")
        if isinstance(inner, InvalidSettings):  # an embedded settings class named its own
            problems.append(f"{name}: {inner}")
            fields.extend(f"{name}.{field}" for field in inner.fields)
            continue
        env = f" ({cls.env_name(name)})" if name in cls.model_fields else ""
        given = without_password(repr(err.get("input")))
        problems.append(f"{name}{env}: {err['msg']} (got {given})")
        fields.append(name)
    return InvalidSettings(
        f"invalid {cls.__name__}: " + "; ".join(problems), fields=tuple(dict.fromkeys(fields))
    )


def make_settings(cls: type[S], settings: S | None = None, /, **overrides: Any) -> S:
    """The settings of class ``cls`` from a settings object and keyword overrides, by the one
    rule of lagompy's functions that take both: ``settings`` (when given) is the base, each
    keyword in ``overrides`` replaces its field, and without ``settings`` the environment, then
    the defaults, fill the other fields. ``settings`` itself is returned when no keyword is
    given. A bad value raises ``ConfigurationError`` naming the setting.

    Callers pass only the keywords the user gave (a ``url=None`` parameter that means "not
    given" is left out)."""
    if settings is None:
        return cls(**overrides)
    if not overrides:
        return settings
    return cls(**{**settings.model_dump(), **overrides})


DEFAULT_JOURNAL_URL = "sqlite+aiosqlite:///lagompy.db"

#: The name of a database a journal places slices on: short, stable (it is part of the
#: positions consumers keep), a letter then letters, digits or underscores.
_DATABASE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


class PlacedDatabase(BaseModel):
    """One more database of a journal: the slices it holds, and where it is. The home database
    (``JournalSettings.url``) holds every slice placed on no other."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(description="Database URL, as JournalSettings.url.")
    postgres_schema: str | None = Field(
        default=None,
        description="PostgreSQL schema of lagompy's tables there (None: the home database's).",
    )
    slices: str = Field(
        description=(
            "The slices it holds: ranges of slice numbers (0-1023), first-last, comma-separated "
            "(e.g. 512-1023, or 0-99,512-611)."
        )
    )

    @field_validator("slices")
    @classmethod
    def _ranges(cls, value: str) -> str:
        parse_slice_ranges(value)
        return value


def parse_slice_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """``"0-99,512-1023"`` as ((0, 99), (512, 1023)); a ValueError names what is wrong."""
    ranges = []
    for part in text.split(","):
        bounds = part.strip().split("-")
        if len(bounds) == 1:
            bounds = bounds * 2
        if len(bounds) != 2 or not all(b.strip().isdigit() for b in bounds):
            raise ValueError(
                f"slices: {part.strip()!r} is not a slice range (first-last, e.g. 512-1023)"
            )
        first, last = int(bounds[0]), int(bounds[1])
        if not first <= last <= 1023:
            raise ValueError(
                f"slices: {part.strip()!r} must run from a slice to a later one, within 0-1023"
            )
        ranges.append((first, last))
    return tuple(ranges)


class JournalSettings(LagompySettings):
    """Where and how the journal and snapshot store connect. Environment prefix
    ``LAGOMPY_JOURNAL_`` (e.g. ``LAGOMPY_JOURNAL_URL``, ``LAGOMPY_JOURNAL_POOL_SIZE``)."""

    model_config = SettingsConfigDict(env_prefix="LAGOMPY_JOURNAL_", frozen=True, extra="forbid")

    url: str = Field(
        default=DEFAULT_JOURNAL_URL,
        description=(
            "Database URL. sqlite:///path.db (made absolute against the working directory) or "
            "postgresql://user@host/db; the async drivers (aiosqlite, asyncpg) are chosen for you."
        ),
    )
    pool_size: int = Field(default=5, ge=1, description="Connections kept open per process.")
    max_overflow: int = Field(default=5, ge=0, description="Extra connections opened under load.")
    pool_timeout: float = Field(
        default=30.0, gt=0, description="Seconds to wait for a free connection."
    )
    postgres_schema: str | None = Field(
        default=None, description="PostgreSQL schema for lagompy's tables (sets search_path)."
    )
    sqlite_busy_timeout_ms: int = Field(
        default=30_000,
        ge=0,
        description="How long a SQLite writer waits for another writer's lock.",
    )
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = Field(
        default="FULL", description="SQLite PRAGMA synchronous; FULL makes every commit durable."
    )
    lock_timeout_ms: int = Field(
        default=10_000,
        ge=0,
        description=(
            "PostgreSQL lock_timeout for lagompy's connections: how long a statement waits "
            "for a lock before failing (0 waits forever); journal writers wait only behind a "
            "writer of a version before migration 0010, or a lock someone else took."
        ),
    )
    echo: bool = Field(default=False, description="Log every SQL statement (SQLAlchemy echo).")
    auto_migrate: bool | None = Field(
        default=None,
        description=(
            "Create or upgrade lagompy's tables when the journal opens. None (the default) means "
            "yes on SQLite and no on PostgreSQL, where `lagompy migrate` runs once per deploy and "
            "a journal whose tables are missing or outdated refuses to start."
        ),
    )
    collector: CollectorPolicy = Field(
        default="tuned",
        description=(
            "The garbage collector of the process that opens the journal (open_storage, "
            "open_placed_storage), once it is open: 'tuned' freezes the objects that exist "
            "then and collects the young generation every 50,000 allocations, as shard hosts "
            "do (unless the collector is off or already tuned); 'default' leaves Python's. "
            "With Python's defaults, 4 and 8 writers appending on PostgreSQL got 0.63-0.64 of raw "
            "executemany. start(), a Service and `lagompy run` open their journal with their "
            "own choice (RuntimeSettings.collector, ServiceSettings.collector, "
            "LAGOMPY_RUN_COLLECTOR)."
        ),
    )
    databases: dict[str, PlacedDatabase] = Field(
        default_factory=dict,
        description=(
            "More databases for the journal, by name, each holding a set of slices (the home "
            "database, url, holds the others). JSON in the environment, e.g. "
            '{"b": {"url": "postgresql://host/b", "slices": "512-1023"}}. See docs/journal.md, '
            '"Several databases".'
        ),
    )

    @field_validator("databases")
    @classmethod
    def _placement(cls, value: dict[str, PlacedDatabase]) -> dict[str, PlacedDatabase]:
        owner: dict[int, str] = {}
        places: dict[tuple[str, str | None], str] = {}
        for name, placed in value.items():
            other = places.setdefault((placed.url, placed.postgres_schema), name)
            if other != name:
                raise ValueError(
                    f"databases {other!r} and {name!r} have the same url and schema: "
                    "each database of a journal holds its own tables"
                )
            if not _DATABASE_NAME.fullmatch(name):
                raise ValueError(
                    f"database name {name!r}: a lowercase letter, then up to 31 lowercase "
                    "letters, digits or underscores"
                )
            for first, last in parse_slice_ranges(placed.slices):
                for s in range(first, last + 1):
                    other = owner.setdefault(s, name)
                    if other != name:
                        raise ValueError(
                            f"slice {s} is placed on two databases, {other!r} and {name!r}"
                        )
        return value

    def placed_on(self, name: str) -> JournalSettings:
        """The settings of database ``name`` of this journal (``""``: the home one): these,
        with its url and no other databases."""
        schema = self.postgres_schema
        if name == "":
            url = self.url
        elif name in self.databases:
            placed = self.databases[name]
            url = placed.url
            schema = placed.postgres_schema or schema
        else:
            raise InvalidSettings(
                f"the journal has no database named {name!r} (it has: "
                f"{', '.join(['home', *self.databases])})",
                fields=("databases",),
            )
        # A copy of values already checked (a new instance would read the environment again).
        return self.model_copy(update={"url": url, "postgres_schema": schema, "databases": {}})


class RuntimeSettings(LagompySettings):
    """How the sharded runtime on Ray is laid out and how its region clients batch. Environment
    prefix ``LAGOMPY_RUNTIME_`` (e.g. ``LAGOMPY_RUNTIME_HOSTS``, ``LAGOMPY_RUNTIME_MAX_BATCH``).

    ``shards`` and ``hosts`` are part of the app's recorded topology: every process attached
    to the app must use the same values (``None`` adopts what the running app uses)."""

    model_config = SettingsConfigDict(env_prefix="LAGOMPY_RUNTIME_", frozen=True, extra="forbid")

    shards: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Logical shards: an entity lives in shard stable_hash(entity_id) % shards. None "
            "adopts the running app's value, else 256. Fixed for the life of the app's data "
            "layout on hosts; changing it needs replace_hosts."
        ),
    )
    hosts: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Shard host actors; shard s lives on host s % hosts. None adopts the running app's "
            "value, else one per node of the Ray cluster (every host writes through the "
            "journal's one ordering fence: more hosts per node split batches, see docs/runtime.md)."
        ),
    )
    ray_address: str | None = Field(
        default=None,
        description=(
            "Ray cluster to attach to when Ray is not initialized yet. None means the "
            "RAY_ADDRESS environment variable if set, else a new local Ray started on demand "
            "(and shut down by close())."
        ),
    )
    object_store_memory: int = Field(
        default=256 * 1024 * 1024,
        ge=78 * 1024 * 1024,
        description="Bytes of object store for a local Ray that start() starts itself.",
    )
    max_batch: int = Field(default=1000, ge=1, description="Most asks in one call to a shard host.")
    max_in_flight: int = Field(
        default=2,
        ge=1,
        description=(
            "Calls in flight per shard host from one process; while they run, new asks "
            "accumulate into the next batch."
        ),
    )
    max_pending: int = Field(
        default=10_000,
        ge=1,
        description=(
            "Most asks outstanding (queued or in flight) in one process; beyond it ask() and "
            "tell() raise Overloaded at once."
        ),
    )
    collector: CollectorPolicy = Field(
        default="tuned",
        description=(
            "The garbage collector of the process that calls start(), once the app has "
            "started: 'tuned' freezes the objects that exist then and collects the young "
            "generation every 50,000 allocations, as shard hosts do (unless the collector is "
            "off or already tuned); 'default' leaves Python's. That process runs the region "
            "client (on Ray) or the entities (ray=False); with Python's defaults it spent a "
            "quarter to a half of its CPU collecting at 1,024 outstanding asks."
        ),
    )
    retries: int = Field(
        default=3,
        ge=0,
        description=(
            "How often a batch is resent (same command ids, duplicate check on) after its host "
            "died or was unreachable; then each of its asks raises OutcomeUnknown."
        ),
    )
    retry_backoff: float = Field(
        default=0.2, ge=0, description="Seconds before the first resend; doubled for each next one."
    )
    retry_backoff_max: float = Field(
        default=2.0,
        gt=0,
        description="Longest wait between two resends (the doubling stops there).",
    )
    max_entities: int | None = Field(
        default=100_000,
        ge=1,
        description="Most entities a shard host keeps in memory (least recently used go first).",
    )
    idle_timeout: float | None = Field(
        default=600.0, gt=0, description="Seconds an entity stays in memory without a command."
    )
    conflict_retries: int = Field(
        default=2,
        ge=0,
        description=(
            "When the journal refuses a host's write because another writer appended to the "
            "entity first (a zombie copy of the host), the host reloads the entity and runs "
            "the refused commands again, up to this many times; then they get "
            "ConcurrencyConflict."
        ),
    )
    passivate_interval: float = Field(
        default=10.0, gt=0, description="Seconds between two passivation sweeps in each shard host."
    )
    host_pool_size: int = Field(
        default=2, ge=1, description="Journal connections each shard host keeps open."
    )
    host_max_overflow: int = Field(
        default=2, ge=0, description="Extra journal connections a shard host may open under load."
    )
    host_max_restarts: int = Field(
        default=-1, ge=-1, description="Restarts of a crashed shard host (-1: always restart)."
    )
    host_num_cpus: float = Field(
        default=0.0,
        ge=0,
        description=(
            "CPUs each shard host reserves in Ray's scheduler. 0 (the default) never waits for "
            "free CPUs; set 1 on a cluster to spread hosts over nodes."
        ),
    )
    start_timeout: float = Field(
        default=60.0,
        gt=0,
        description=(
            "Seconds start() waits for the shard hosts to answer (start_readside_on_ray: for "
            "the read-side workers)."
        ),
    )
    stop_timeout: float = Field(
        default=10.0,
        gt=0,
        description=(
            "Seconds the app's actors get to release what they hold (journal connections, "
            "read-side leases) when shutdown_app, stop_readside_on_ray or replace_hosts stops "
            "them; then they are killed."
        ),
    )
