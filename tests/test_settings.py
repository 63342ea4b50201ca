"""Settings: one rule for a settings object given with keywords, and bad values as
``ConfigurationError`` naming the setting.

The rule (docs/reference/settings.md, ``lagompy.settings.make_settings``): the settings object
is the base, each keyword given explicitly replaces its field (``url`` included), and without a
settings object the environment, then the defaults, fill the rest. Giving both never drops one.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, cast, get_args

import pytest
from pydantic_settings import BaseSettings
from ray_entities import CounterEntity

from lagompy import ConfigurationError, JournalSettings, RuntimeSettings, open_storage, start
from lagompy.errors import InvalidSettings, LagompyError
from lagompy.readside import ReadSideSettings, open_projections
from lagompy.service import (
    BreakerSettings,
    CircuitBreaker,
    ClientSettings,
    Service,
    ServiceClient,
    ServiceLocator,
)
from lagompy.settings import make_settings
from lagompy.sql import Database
from tests.reference_tables import settings_classes


def _url(tmp_path: Path, name: str) -> str:
    return f"sqlite:///{tmp_path / name}"


def _same_file(url: str, tmp_path: Path, name: str) -> bool:
    return url.endswith(str(tmp_path / name))


# --------------------------------------------------------------------------- the rule


def test_make_settings_follows_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAGOMPY_JOURNAL_POOL_SIZE", "4")
    monkeypatch.setenv("LAGOMPY_JOURNAL_MAX_OVERFLOW", "7")
    # no settings object: keywords, then the environment, then the defaults
    alone = make_settings(JournalSettings, pool_size=2)
    assert (alone.pool_size, alone.max_overflow, alone.pool_timeout) == (2, 7, 30.0)
    # a settings object is the base; keywords replace their fields, the rest stays its own
    base = JournalSettings(url="sqlite:///a.db", max_overflow=1)
    merged = make_settings(JournalSettings, base, url="sqlite:///b.db", echo=True)
    assert (merged.url, merged.max_overflow, merged.pool_size, merged.echo) == (
        "sqlite:///b.db",
        1,
        4,
        True,
    )
    assert make_settings(JournalSettings, base) is base
    # a keyword may set a field back to None
    schema = JournalSettings(postgres_schema="app")
    assert make_settings(JournalSettings, schema, postgres_schema=None).postgres_schema is None


async def test_open_storage_url_replaces_the_url_of_its_settings(tmp_path: Path) -> None:
    """It used to open the settings' database and drop ``url`` without a word."""
    settings = JournalSettings(url=_url(tmp_path, "a.db"), pool_size=3)
    async with await open_storage(_url(tmp_path, "b.db"), settings=settings) as storage:
        used = storage.database.settings
        assert _same_file(used.url, tmp_path, "b.db")
        assert used.pool_size == 3
    assert (tmp_path / "b.db").exists() and not (tmp_path / "a.db").exists()
    async with await open_storage(settings=settings, max_overflow=9) as storage:
        used = storage.database.settings
        assert _same_file(used.url, tmp_path, "a.db")
        assert (used.pool_size, used.max_overflow) == (3, 9)


async def test_database_create_applies_overrides_to_its_settings(tmp_path: Path) -> None:
    """Keywords given with a settings object used to be dropped."""
    db = Database.create(JournalSettings(url=_url(tmp_path, "a.db")), pool_size=3)
    try:
        assert db.settings.pool_size == 3
        assert _same_file(db.settings.url, tmp_path, "a.db")
    finally:
        await db.dispose()


async def test_start_combines_journal_settings_and_keywords(tmp_path: Path) -> None:
    """``start(journal_settings=..., journal_url=..., pool_size=...)`` used to refuse."""
    entities = await start(
        entities=[CounterEntity],
        ray=False,
        journal_settings=JournalSettings(url=_url(tmp_path, "a.db"), max_overflow=1),
        journal_url=_url(tmp_path, "b.db"),
        pool_size=2,
        settings=RuntimeSettings(max_batch=10),
        max_pending=20,
    )
    try:
        used = entities.storage.database.settings
        assert _same_file(used.url, tmp_path, "b.db")
        assert (used.pool_size, used.max_overflow) == (2, 1)
        assert entities.max_pending == 20
    finally:
        await entities.close()


async def test_projections_take_journal_url_over_journal_settings(tmp_path: Path) -> None:
    """``journal_url`` with ``journal_settings`` used to be refused."""
    async with await open_projections(
        journal_url=_url(tmp_path, "b.db"),
        journal_settings=JournalSettings(url=_url(tmp_path, "a.db"), pool_size=3),
        settings=ReadSideSettings(max_batch=7),
        max_attempts=2,
    ) as projections:
        assert projections.journal is not None
        assert _same_file(projections.journal.settings.url, tmp_path, "b.db")
        assert projections.journal.settings.pool_size == 3
        assert _same_file(projections.projection.settings.url, tmp_path, "b.db")
        assert (projections.settings.max_batch, projections.settings.max_attempts) == (7, 2)


@pytest.mark.parametrize("own_file", [False, True])
def test_projections_write_as_durably_as_their_journal(tmp_path: Path, own_file: bool) -> None:
    """A journal given ``sqlite_synchronous`` by keyword: its projections' connections (in its
    file, or in one of their own) commit the same way, not at the default FULL."""
    from lagompy.readside import projection_settings

    journal = JournalSettings(url=_url(tmp_path, "a.db"), sqlite_synchronous="NORMAL")
    settings = ReadSideSettings(url=_url(tmp_path, "p.db") if own_file else None)
    assert projection_settings(journal, settings).sqlite_synchronous == "NORMAL"


def test_service_takes_journal_url_over_journal_settings(tmp_path: Path) -> None:
    """``Service(journal_url=..., journal_settings=...)`` used to be refused."""
    service = Service(
        journal_url=_url(tmp_path, "b.db"),
        journal_settings=JournalSettings(url=_url(tmp_path, "a.db"), pool_size=3),
    )
    assert service.journal_settings.url == _url(tmp_path, "b.db")
    assert service.journal_settings.pool_size == 3


async def test_service_client_applies_keywords_to_its_settings() -> None:
    """Keywords given with ``settings`` used to be dropped without a word."""
    client = ServiceClient(
        "inventory",
        locator=ServiceLocator({"inventory": "http://127.0.0.1:9"}),
        breaker=False,
        settings=ClientSettings(timeout=3.0),
        max_connections=7,
    )
    try:
        assert (client.settings.timeout, client.settings.max_connections) == (3.0, 7)
    finally:
        await client.close()


def test_circuit_breaker_applies_keywords_to_its_settings() -> None:
    """``CircuitBreaker(id, settings=..., call_timeout=...)`` used to be refused."""
    breaker = CircuitBreaker("x", settings=BreakerSettings(max_failures=3), call_timeout=2.0)
    assert (breaker.settings.max_failures, breaker.settings.call_timeout) == (3, 2.0)


# --------------------------------------------------------------------------- bad values


def test_a_bad_keyword_is_a_configuration_error_naming_it() -> None:
    with pytest.raises(ConfigurationError, match=r"pool_size \(LAGOMPY_JOURNAL_POOL_SIZE\)"):
        JournalSettings(pool_size=0)
    with pytest.raises(ConfigurationError, match=r"invalid ReadSideSettings: .*renew_interval"):
        ReadSideSettings(lease_ttl=1, renew_interval=2)
    with pytest.raises(ConfigurationError, match="no_such_setting"):
        JournalSettings(no_such_setting=1)  # type: ignore[call-arg]
    # through the one rule too
    with pytest.raises(ConfigurationError, match="pool_size"):
        make_settings(JournalSettings, JournalSettings(), pool_size=0)


def test_a_bad_environment_variable_is_a_configuration_error_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LAGOMPY_JOURNAL_POOL_SIZE", "0")
    with pytest.raises(ConfigurationError, match=r"pool_size \(LAGOMPY_JOURNAL_POOL_SIZE\)"):
        JournalSettings()
    with pytest.raises(ConfigurationError, match=r"pool_size \(LAGOMPY_JOURNAL_POOL_SIZE\)"):
        Database.create()


def _numeric_field(cls: type[BaseSettings]) -> str:
    """A field of ``cls`` that a word cannot set (a number or a flag)."""
    for name, field in cls.model_fields.items():
        if field.annotation in (int, float, bool):
            return name
    raise AssertionError(f"{cls.__name__} has no numeric field")  # pragma: no cover


@pytest.mark.parametrize("cls", settings_classes(), ids=lambda cls: cls.__name__)
def test_every_settings_class_raises_configuration_errors(
    cls: type[BaseSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    name = _numeric_field(cls)
    bad: dict[str, Any] = {name: "not a number"}
    with pytest.raises(ConfigurationError, match=rf"invalid {cls.__name__}: {name}\b"):
        cls(**bad)
    prefix = str(cls.model_config.get("env_prefix", ""))
    monkeypatch.setenv(f"{prefix}{name.upper()}", "not a number")
    with pytest.raises(ConfigurationError, match=rf"{name}\b.*{prefix}{name.upper()}"):
        cls()


@pytest.mark.parametrize("cls", settings_classes(), ids=lambda cls: cls.__name__)
def test_no_settings_class_takes_an_infinite_or_nan_number(
    cls: type[BaseSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``inf`` passed every ``gt``/``le`` bound of a float setting and failed far from it (a
    lease of ``inf`` seconds turned into microseconds raised OverflowError in a worker)."""
    floats = [
        n for n, f in cls.model_fields.items() if float in (f.annotation, *get_args(f.annotation))
    ]
    prefix = str(cls.model_config.get("env_prefix", ""))
    for name in floats:
        for value in ("inf", "-inf", "nan"):
            with pytest.raises(ConfigurationError, match=rf"{name}\b.*finite number"):
                bad: dict[str, Any] = {name: float(value)}
                cls(**bad)
            monkeypatch.setenv(f"{prefix}{name.upper()}", value)
            with pytest.raises(ConfigurationError, match=rf"{prefix}{name.upper()}.*finite"):
                cls()
            monkeypatch.delenv(f"{prefix}{name.upper()}")


def test_a_breaker_names_its_own_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAGOMPY_BREAKER_USER_SERVICE_MAX_FAILURES", "0")
    with pytest.raises(
        ConfigurationError,
        match=r"circuit breaker 'user-service': .*LAGOMPY_BREAKER_USER_SERVICE_MAX_FAILURES",
    ):
        CircuitBreaker("user-service")


def test_invalid_settings_name_their_fields_and_stay_in_the_tree() -> None:
    with pytest.raises(InvalidSettings) as caught:
        RuntimeSettings(max_batch=0, retries=-1, hosts=2)
    assert caught.value.fields == ("max_batch", "retries")
    assert isinstance(caught.value, ConfigurationError)
    assert isinstance(caught.value, LagompyError)
    assert isinstance(caught.value, ValueError)  # as pydantic's ValidationError was
    back = pickle.loads(pickle.dumps(caught.value))  # it crosses process boundaries
    assert (type(back), str(back), back.fields) == (
        InvalidSettings,
        str(caught.value),
        ("max_batch", "retries"),
    )
    # a check of several fields together is named by its message
    with pytest.raises(InvalidSettings, match=r"^invalid ReadSideSettings: renew_interval \(2"):
        ReadSideSettings(lease_ttl=1, renew_interval=2)


def test_a_bad_value_of_an_embedded_settings_class_names_its_own_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ReadSideSettings embeds TailSettings: a bad tail knob is named with the variable that
    sets it, once, without a dump of the whole embedded settings."""
    monkeypatch.setenv("LAGOMPY_READSIDE_TAIL", '{"poll_interval": -1}')
    with pytest.raises(InvalidSettings) as caught:
        ReadSideSettings()
    message = str(caught.value)
    assert "poll_interval (LAGOMPY_TAIL_POLL_INTERVAL)" in message
    assert "page_size" not in message
    assert caught.value.fields == ("tail.poll_interval",)


def test_a_bad_value_never_shows_a_password() -> None:
    """The value quoted in the error keeps a URL's user and host, never its password."""
    with pytest.raises(InvalidSettings) as caught:
        JournalSettings(url=cast(Any, ["postgresql://app:s3cret@db.internal/x"]))
    message = str(caught.value)
    assert "s3cret" not in message
    assert "postgresql://app:***@db.internal/x" in message
