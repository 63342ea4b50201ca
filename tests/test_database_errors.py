"""Driver errors are translated into lagompy's tree: an unreachable or restarting database is
``JournalUnavailable`` (retry later), anything else ``JournalError``."""

from __future__ import annotations

import sqlite3

import asyncpg
import pytest

from lagompy.errors import JournalError, JournalUnavailable
from lagompy.sql import translate_errors


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.exceptions.AdminShutdownError(
            "terminating connection due to administrator command"
        ),
        asyncpg.exceptions.CrashShutdownError("the database system is in recovery mode"),
        ConnectionRefusedError(111, "Connection refused"),
        sqlite3.OperationalError("unable to open database file"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_database_that_cannot_answer_now_is_unavailable(error: Exception) -> None:
    with pytest.raises(JournalUnavailable) as info, translate_errors("write"):
        raise error
    assert info.value.__cause__ is error


def test_other_database_errors_are_journal_errors() -> None:
    error = asyncpg.exceptions.StringDataRightTruncationError("value too long")
    with pytest.raises(JournalError) as info, translate_errors("write"):
        raise error
    assert not isinstance(info.value, JournalUnavailable)
    assert "write failed" in str(info.value)


def test_a_value_the_driver_cannot_encode_is_not_an_outage() -> None:
    from asyncpg.exceptions._base import DataError as ClientDataError

    error = ClientDataError("invalid input for query argument $1: 'x' (an integer is required)")
    with pytest.raises(JournalError) as info, translate_errors("write"):
        raise error
    assert not isinstance(info.value, JournalUnavailable)
