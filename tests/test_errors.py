"""The exception tree: every error survives pickling (errors cross processes on Ray) with its
type, message and attributes, and the tree drawn in errors.py's docstring is the real one."""

from __future__ import annotations

import inspect
import pickle
import re

import pytest

from lagompy import errors
from lagompy.errors import (
    AskTimeout,
    ConcurrencyConflict,
    EventDecodeError,
    IdempotencyKeyReused,
    InvalidCommand,
    InvalidEntityId,
    LagompyError,
    NotFound,
    OutcomeUnknown,
    UndeliverableOutcome,
    UnknownType,
    WriteRefused,
)

SAMPLES: list[LagompyError] = [
    InvalidCommand("bad", http_status=422),
    NotFound("nobody"),
    UnknownType("Gone"),
    EventDecodeError(entity_type="user", entity_id="1", seq_nr=3, type_name="T", reason="r"),
    ConcurrencyConflict(entity_type="user", entity_id="1", expected_seq_nr=1, actual_seq_nr=2),
    OutcomeUnknown("cmd-1"),
    InvalidEntityId("an entity id must not be empty"),
    UndeliverableOutcome("the reply does not pickle", command_id="c-3", committed=True),
    WriteRefused("refused", entity_type="user", entity_id="1"),
    AskTimeout("no reply in 5 s", command_id="cmd-2"),
    IdempotencyKeyReused(
        "k-1",
        first_method="POST",
        first_route="/a/{id}/deposits",
        method="POST",
        route="/a/{id}/withdrawals",
        in_flight=True,
    ),
]


def all_error_classes() -> list[type[LagompyError]]:
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, LagompyError)
    ]


@pytest.mark.parametrize("error", SAMPLES, ids=lambda e: type(e).__name__)
def test_errors_survive_pickling(error: LagompyError) -> None:
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error)
    assert str(back) == str(error)
    assert back.__dict__ == error.__dict__


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
def test_every_error_class_is_drawn_in_the_tree(cls: type[LagompyError]) -> None:
    assert errors.__doc__ is not None
    assert re.search(rf"(^|[ │├└─]){cls.__name__}( |$)", errors.__doc__, re.M)


# keyword-only: covered by SAMPLES
STRUCTURED = {ConcurrencyConflict, EventDecodeError, IdempotencyKeyReused}


@pytest.mark.parametrize(
    "cls", [c for c in all_error_classes() if c not in STRUCTURED], ids=lambda c: c.__name__
)
def test_errors_with_a_plain_message_pickle(cls: type[LagompyError]) -> None:
    error = cls("something went wrong")
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is cls and str(back) == str(error)
