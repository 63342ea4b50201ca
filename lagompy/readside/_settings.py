"""Read-side settings (:class:`ReadSideSettings`) and where they come from: the projection
database's connection settings (:func:`projection_settings`) and the journal's."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from lagompy.journal._tailing import TailSettings
from lagompy.settings import JournalSettings, LagompySettings, make_settings

__all__ = [
    "ReadSideSettings",
    "projection_settings",
]


class ReadSideSettings(LagompySettings):
    """How read-side workers connect, batch, hold leases and handle failures. Environment prefix
    ``LAGOMPY_READSIDE_`` (for example ``LAGOMPY_READSIDE_URL``, ``LAGOMPY_READSIDE_MAX_BATCH``).
    A keyword argument wins over the environment, which wins over the default."""

    model_config = SettingsConfigDict(env_prefix="LAGOMPY_READSIDE_", frozen=True, extra="forbid")

    url: str | None = Field(
        default=None,
        description=(
            "The projection database (sqlite:///... or postgresql://...): projections and the "
            "read side's offsets live there. None: the journal's database."
        ),
    )
    postgres_schema: str | None = Field(
        default=None,
        description="PostgreSQL schema of the projection database (None: the journal's, "
        "when url is None).",
    )
    pool_size: int = Field(
        default=2, ge=1, description="Projection connections kept open per process."
    )
    auto_migrate: bool | None = Field(
        default=None,
        description=(
            "Create lagompy's tables in the projection database when it opens. None: as the "
            "journal's auto_migrate (yes on SQLite, no on PostgreSQL: run `lagompy migrate "
            "--url <projection db>`)."
        ),
    )
    max_batch: int = Field(
        default=1000,
        ge=1,
        description="Most events read per query and committed per transaction.",
    )
    max_batch_seconds: float = Field(
        default=0.5,
        gt=0,
        description=(
            "A transaction of per-event handlers commits once its handlers have run this long, "
            "even short of max_batch events."
        ),
    )
    lease_ttl: float = Field(
        default=10.0,
        gt=0,
        description=(
            "Seconds a worker's lease lasts without renewal; then another worker may take it. "
            "Every commit and every renewal extends it."
        ),
    )
    renew_interval: float = Field(
        default=1.0,
        gt=0,
        description=(
            "Seconds between lease renewals of an idle worker; also how soon a worker sees a "
            "pause or a resume, and how often a waiting worker tries to get a lease."
        ),
    )
    rebalance: bool = Field(
        default=True,
        description=(
            "Spread the tags of a processor over the processes running it: each process is a "
            "member (one heartbeat per renew_interval, expiring a little before lease_ttl), "
            "every tag has a target member (the live members sorted, tags dealt round robin), "
            "and a worker hands a tag whose target is another live member over at a batch "
            "boundary. False: a worker holds every free lease it can get and the others "
            "stand by until it stops."
        ),
    )
    tail: TailSettings = Field(
        default_factory=TailSettings,
        description=(
            "How idle workers wait for new events, as every tailer does: poll_interval, listen, "
            "listen_poll_interval and the LISTEN connection's knobs (a TailSettings, read from "
            "the LAGOMPY_TAIL_* variables by default; its page_size is not used: max_batch is "
            "a worker's page)."
        ),
    )
    max_attempts: int = Field(
        default=5,
        ge=1,
        description=(
            "Tries of a failing handler (or of decoding an event) before on_failure applies; "
            "also how many failed tries of reading the journal or of prepare make a worker "
            "show as stalled."
        ),
    )
    retry_initial_delay: float = Field(
        default=0.1, ge=0, description="Seconds before the second try; doubled for each next one."
    )
    retry_max_delay: float = Field(default=5.0, ge=0, description="Cap of the delay between tries.")
    on_failure: Literal["stop", "skip", "park"] = Field(
        default="stop",
        description=(
            "After max_attempts at one event (its handler keeps failing, or it cannot be "
            "decoded): 'stop' marks the worker failed, with the failure in its status, until "
            "an operator resumes (the event is retried) or skips it; 'skip' moves the offset "
            "past the event without its writes (counted as skipped in the status); 'park' "
            "writes the event to the parked table (lagompy_parked) and moves the offset past "
            "it in one transaction, for an operator to retry (out of order) or discard."
        ),
    )
    prepare_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Seconds start_readside_on_ray waits for global_prepare to succeed.",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.renew_interval >= self.lease_ttl:
            raise ValueError(
                f"renew_interval ({self.renew_interval}) must be below lease_ttl "
                f"({self.lease_ttl}), or leases expire between renewals"
            )
        return self


def _settings(settings: ReadSideSettings | None, overrides: dict[str, Any]) -> ReadSideSettings:
    return make_settings(ReadSideSettings, settings, **overrides)


def projection_settings(journal: JournalSettings, settings: ReadSideSettings) -> JournalSettings:
    """Connection settings of the projection database: ``settings.url`` (and its schema), or
    the journal's database when it is None; its SQLite busy timeout and durability
    (``sqlite_synchronous``) and PostgreSQL lock timeout are the journal's."""
    same = settings.url is None
    values: dict[str, Any] = {
        "url": journal.url if same else settings.url,
        "postgres_schema": (settings.postgres_schema or journal.postgres_schema)
        if same
        else settings.postgres_schema,
        "pool_size": settings.pool_size,
        "max_overflow": settings.pool_size,
        "auto_migrate": (
            journal.auto_migrate if settings.auto_migrate is None else settings.auto_migrate
        ),
        "sqlite_busy_timeout_ms": journal.sqlite_busy_timeout_ms,
        "sqlite_synchronous": journal.sqlite_synchronous,
        "lock_timeout_ms": journal.lock_timeout_ms,
    }
    return make_settings(JournalSettings, **values)


def _journal_settings(url: str | None, settings: JournalSettings | None) -> JournalSettings:
    return make_settings(JournalSettings, settings, **({} if url is None else {"url": url}))
