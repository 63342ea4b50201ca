"""The read-side contract suite (lagompy.testkit.readside) on SQLite and PostgreSQL: the journal
and the projection in one database (``journal_settings`` from the conftest), and, on SQLite, in
two separate files."""

from __future__ import annotations

from pathlib import Path

import pytest

from lagompy.journal import TailSettings
from lagompy.readside import ReadSideSettings
from lagompy.testkit import ReadSideContract


class TestReadSide(ReadSideContract):
    """Journal and projection in the same database, on both backends."""


class TestReadSideSeparateDatabase(ReadSideContract):
    """The projection in a SQLite file of its own, beside the journal."""

    @pytest.fixture
    def readside_settings(self, tmp_path: Path) -> ReadSideSettings:
        return ReadSideSettings(
            url=f"sqlite:///{tmp_path / 'projection.db'}",
            lease_ttl=2.0,
            renew_interval=0.1,
            retry_initial_delay=0.01,
            retry_max_delay=0.05,
            max_attempts=2,
            tail=TailSettings(poll_interval=0.02),
            auto_migrate=True,
        )
