"""Every error lagompy raises, in one tree.

Catch ``LagompyError`` to catch them all; backend errors (SQLAlchemy, asyncpg, aiosqlite, msgpack)
are translated into this tree with the original exception attached as ``__cause__``.

    LagompyError
    ├── ConfigurationError ......... a setting, URL or entity definition is wrong
    │   └── InvalidSettings ........ a settings value (keyword or environment variable) is
    │                                invalid: names each setting (``fields``) and its
    │                                environment variable (also a ValueError)
    ├── CommandRejected ............ the entity said no; nothing was persisted (http_status 400)
    │   ├── InvalidCommand ......... the command does not fit the entity's state (400)
    │   ├── NotFound ............... the entity (or what the command names) does not exist (404)
    │   ├── UnhandledCommand ....... the command handler returned Effect.unhandled() (400)
    │   ├── InvalidId .............. an entity id or command id breaks the rules: refused at
    │   │   │                        the ask, before it is sent (400; also a ValueError)
    │   │   ├── InvalidEntityId
    │   │   └── InvalidCommandId
    │   └── (your own subclasses, each with its http_status)
    ├── HandlerFailed .............. a bug: a handler raised something that is not a rejection
    │   ├── CommandHandlerFailed ... on_command raised; nothing was persisted
    │   ├── EventHandlerFailed ..... on_event raised while applying an event
    │   │   └── UnhandledEvent ..... on_event has no case for this (state, event) pair
    │   └── ReadSideHandlerFailed .. a read-side handler raised (names processor, tag,
    │                                offset, entity and sequence number)
    ├── IdempotencyKeyReused ....... an HTTP Idempotency-Key is bound to another request:
    │                                nothing of this one ran (422, or 409 while the first
    │                                request is in flight)
    ├── ReadSideError .............. a read-side worker cannot go on
    │   ├── LeaseLost .............. another worker took the (processor, tag) lease:
    │   │                            this worker's batch was rolled back
    │   ├── ReadSideDecodeFailed ... an event of the worker's tag cannot be decoded (names
    │   │                            processor, tag, offset, entity and sequence number)
    │   └── ProcessKeyConflict ..... a process manager's key was written by another
    │                                partition's worker (or concurrently): rolled back
    ├── TopicError ................. a topic cannot be served or read
    │   └── TopicMessageInvalid .... a message from a topic's transport does not fit the
    │                                topic (a missing field, a payload its type refuses)
    ├── SerializationError ......... a value cannot be encoded or a payload cannot be decoded
    │   ├── UnknownType ............ no registered class carries this stored type name
    │   ├── EncodeError ............ a value does not fit its declared type
    │   │   └── RefusedValue ....... a value the journal refuses to store (a NUL character
    │   │                            in a string): bad input (422 over HTTP)
    │   ├── DecodeError ............ a payload does not fit the class it names
    │   ├── EventDecodeError ....... a stored event cannot be decoded (names entity and seq nr)
    │   └── UndeliverableOutcome ... a command's reply or rejection cannot travel back from its
    │                                shard host (it does not pickle): that ask alone gets this;
    │                                ``committed`` says whether the command was applied
    ├── JournalError ............... the journal or snapshot store failed
    │   ├── ConcurrencyConflict .... another writer appended to this entity first
    │   ├── DuplicateCommandId ..... a reply is already stored under this entity's command id
    │   ├── JournalUnavailable ..... the database cannot be reached
    │   ├── WriteRefused ........... the database refused one write's data (a value too long,
    │   │                            an invalid character, a constraint): that write alone
    │   │                            failed, the rest of its batch committed
    │   └── EventsMissing .......... an entity's events were deleted with no snapshot
    │                                covering them: its state cannot be recovered
    ├── RuntimeFailure ............. the entity runtime could not deliver a command
    │   ├── Overloaded ............. queues are full: retry later (nothing was run)
    │   ├── AskTimeout ............. no reply within the ask's timeout (outcome unknown)
    │   └── OutcomeUnknown ......... a shard host failed mid-command, retries ran out:
    │                                the command may or may not have been applied;
    │                                ask again with the same command id to find out
    ├── ServiceCallError ........... a call to another service (a ServiceClient) failed
    │   ├── CircuitBreakerOpen ..... its circuit breaker is open: the call was not made
    │   ├── ServiceCallTimeout ..... no response within the call timeout (counts as a failure)
    │   ├── ServiceUnavailable ..... the service cannot be reached (no URL, connection failed)
    │   └── ServiceCallFailed ...... the service answered 4xx or 5xx (carries status and body)
    └── WorkflowError .............. a durable workflow (lagompy.workflow) cannot go on
        ├── UnknownWorkflow ........ no workflow is registered under this name (and version):
        │                            nothing was started (404; also a ValueError)
        ├── InvalidWorkflowInput ... the input (or a signal's payload) does not serialize:
        │                            nothing was started (422; also a ValueError)
        ├── DuplicateWorkflowId .... a run with this id exists with another workflow or
        │                            input: the id is the idempotency key (409; a rejection)
        ├── WorkflowNotFound ....... no run has this id (404; a rejection)
        ├── WorkflowNonDeterminism . replay found another step at a recorded position than
        │                            the code calls now: names both steps
        ├── StepFailed ............. a step (an ask, an external call, a child workflow)
        │                            failed for good: names the step, the error and its type
        ├── WorkflowCancelled ...... the run was cancelled (raised in the workflow's code)
        └── WorkflowFailed ......... waiting for a run's result: it failed or was cancelled

Rejections (``CommandRejected`` and subclasses) are the entity's answer and travel back to the
caller with their type and message. Everything else signals a failure of the system or a bug.
"""

from __future__ import annotations

from typing import Any, ClassVar


class LagompyError(Exception):
    """Base class of every error lagompy raises.

    Errors cross process boundaries (Ray): every one pickles as its message plus its
    attributes, whatever its constructor takes.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_from_state, (type(self), str(self), self.__dict__.copy()))


class ConfigurationError(LagompyError):
    """A setting, a URL or an entity definition is wrong."""


class InvalidSettings(ConfigurationError, ValueError):
    """A value of a settings class (``JournalSettings(pool_size=0)``, or
    ``LAGOMPY_JOURNAL_POOL_SIZE=0`` in the environment) is invalid. The message names each bad
    setting, its environment variable, what was wrong and the value given; ``fields`` lists the
    settings' names. A ``ValueError`` too, as pydantic's ``ValidationError`` it replaces."""

    def __init__(self, message: str, *, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.fields = fields


# --------------------------------------------------------------------------- rejections


class CommandRejected(LagompyError):
    """The entity rejected the command. Nothing was persisted.

    Subclass it for your own rejections and set ``http_status`` on the class (or pass it to
    the constructor) to choose the HTTP status the service layer answers with.
    """

    http_status: ClassVar[int] = 400

    def __init__(self, message: str, *, http_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if http_status is not None:
            # An instance attribute shadows the class default for this rejection only.
            self.__dict__["http_status"] = http_status

    def __eq__(self, other: object) -> bool:
        return (
            type(other) is type(self)
            and isinstance(other, CommandRejected)
            and other.message == self.message
            and other.http_status == self.http_status
        )

    def __hash__(self) -> int:
        return hash((type(self), self.message))


class InvalidCommand(CommandRejected):
    """The command does not fit the entity's current state."""

    http_status = 400


class NotFound(CommandRejected):
    """The entity, or something the command refers to, does not exist."""

    http_status = 404


class UnhandledCommand(CommandRejected):
    """The command handler has no case for this command in this state."""

    http_status = 400


class InvalidId(CommandRejected, ValueError):
    """An entity id or a command id breaks the rules every id must follow: a ``str`` of 1 to
    255 characters, with no NUL character and no lone surrogate (it must encode as UTF-8).

    Raised by ``ref_for`` and ``ask``/``tell`` before anything is sent, so the asks batched
    with it are not affected; nothing was run. A ``ValueError`` too, and a rejection with
    ``http_status`` 400, so that a service answers a bad id from a URL with a 400 problem."""

    http_status = 400


class InvalidEntityId(InvalidId):
    """An entity id breaks the id rules (see :class:`InvalidId`)."""


class InvalidCommandId(InvalidId):
    """A command id breaks the id rules (see :class:`InvalidId`)."""


# --------------------------------------------------------------------------- handler bugs


class HandlerFailed(LagompyError):
    """A handler raised an exception that is not a rejection: a bug in the entity."""


class CommandHandlerFailed(HandlerFailed):
    """``on_command`` raised. Nothing was persisted."""


class EventHandlerFailed(HandlerFailed):
    """``on_event`` raised while applying an event."""


class UnhandledEvent(EventHandlerFailed):
    """``on_event`` has no case for this (state, event) pair."""


class _AtEvent(Exception):
    """What a read-side failure about one event carries: the processor, the tag, and the
    event's offset, entity and sequence number (None where it is not about one event), and
    how many attempts were made."""

    def __init__(
        self,
        message: str,
        *,
        processor: str | None = None,
        tag: str | None = None,
        offset: int | None = None,
        entity_type: str | None = None,
        entity_id: str | None = None,
        seq_nr: int | None = None,
        attempts: int = 0,
    ) -> None:
        super().__init__(message)
        self.processor = processor
        self.tag = tag
        self.offset = offset
        self.entity_type = entity_type
        self.entity_id = entity_id
        self.seq_nr = seq_nr
        self.attempts = attempts


class ReadSideHandlerFailed(_AtEvent, HandlerFailed):
    """A read-side processor's handler (or its ``prepare``) raised; the handler's writes were
    rolled back. Names the processor, the tag, and the event's offset, entity and sequence
    number (None where it is not about one event); the handler's exception is the cause."""


# --------------------------------------------------------------------------- read side


class ReadSideError(LagompyError):
    """A read-side worker cannot go on (see the subclasses)."""


class LeaseLost(ReadSideError):
    """Another worker took the lease of this (processor, tag): the batch this worker was
    committing was rolled back, its offset untouched. The worker stops handling events and
    waits to get the lease again."""

    def __init__(
        self, message: str, *, processor: str | None = None, tag: str | None = None
    ) -> None:
        super().__init__(message)
        self.processor = processor
        self.tag = tag


class ReadSideDecodeFailed(_AtEvent, ReadSideError):
    """A read-side worker met an event of its tag that it cannot decode (its type is unknown
    to the processor's serializer, or the payload does not fit the class), after
    ``max_attempts`` tries. Names the processor, the tag, and the event's offset, entity and
    sequence number; the ``EventDecodeError`` is the cause."""


class ProcessKeyConflict(ReadSideError):
    """A process manager's state for a key changed under the worker that was committing it:
    the key belongs to another partition of the source (a key's events must come from one
    partition), or another worker wrote it meanwhile. The worker's transaction rolled back;
    the event is retried like a failing handler."""


# --------------------------------------------------------------------------- topics


class TopicError(LagompyError):
    """A topic cannot be served or read (see the subclasses)."""


class TopicMessageInvalid(TopicError):
    """A message that a subscriber's transport delivered does not fit the topic: a missing
    field, a payload the message type refuses, another topic's message. The subscriber
    retries (the producer may be mid-deploy), and shows ``stalled`` with this error."""


# --------------------------------------------------------------------------- requests


class IdempotencyKeyReused(LagompyError):
    """The ``Idempotency-Key`` is bound to another request: 422, or 409 while that request is
    still in flight. Nothing of this request ran."""

    def __init__(
        self,
        key: str,
        *,
        first_method: str,
        first_route: str,
        method: str,
        route: str,
        in_flight: bool,
    ) -> None:
        self.key = key
        self.in_flight = in_flight
        self.same_route = (first_method, first_route) == (method, route)
        self.http_status = 409 if in_flight else 422
        if self.same_route:
            what = (
                f"a different request to {method} {route} (its path or query parameters or "
                "its body differ)"
            )
        else:
            what = f"{first_method} {first_route}, not {method} {route}"
        state = ", which is still in flight" if in_flight else ""
        super().__init__(
            f"Idempotency-Key {key!r} was first used with {what}{state}: a key belongs to one "
            "request, and a retry must repeat it exactly; use a new key for a new request"
        )


# --------------------------------------------------------------------------- serialization


class SerializationError(LagompyError):
    """A value cannot be encoded, or a payload cannot be decoded."""


class UnknownType(SerializationError):
    """No registered class carries this stored type name."""

    def __init__(self, type_name: str, message: str | None = None) -> None:
        super().__init__(message or f"unknown type name {type_name!r}: no registered class")
        self.type_name = type_name


class EncodeError(SerializationError):
    """A value does not fit the type it is declared with."""


class RefusedValue(EncodeError):
    """A value fits its type but is one the journal refuses to store: a string holding a NUL
    character (PostgreSQL text columns refuse it, so a read side copying it would stop), or an
    integer outside the 64 bits msgpack stores (-2**63 to 2**64 - 1). Bad input, not a bug: a
    service answers 422. Names the field."""


class DecodeError(SerializationError):
    """A payload does not fit the class it names."""


class EventDecodeError(SerializationError):
    """A stored event cannot be decoded; names the entity, the sequence number and the type
    (and carries the event's journal ``offset`` when it is known)."""

    def __init__(
        self,
        *,
        entity_type: str,
        entity_id: str,
        seq_nr: int,
        type_name: str,
        reason: str,
        offset: int | None = None,
    ) -> None:
        super().__init__(
            f"cannot decode event {type_name!r} at {entity_type}/{entity_id} "
            f"sequence number {seq_nr}: {reason}"
        )
        self.entity_type = entity_type
        self.entity_id = entity_id
        self.seq_nr = seq_nr
        self.type_name = type_name
        self.offset = offset


class UndeliverableOutcome(SerializationError):
    """A command's outcome (its reply, or its rejection) cannot be sent back from its shard
    host to the caller: it does not pickle. Only that ask gets this error; the others of its
    batch get their own outcomes.

    ``committed`` says whether the command's events were committed: when True the command
    WAS applied (do not apply it again; its reply is what cannot travel), when False this ask
    persisted nothing. ``command_id`` is the ask's command id."""

    def __init__(
        self, message: str, *, command_id: str | None = None, committed: bool = False
    ) -> None:
        super().__init__(message)
        self.command_id = command_id
        self.committed = committed


# --------------------------------------------------------------------------- journal


class JournalError(LagompyError):
    """The journal or the snapshot store failed; the database error is the ``__cause__``."""


class ConcurrencyConflict(JournalError):
    """Another writer appended to this entity first; this write was not applied."""

    def __init__(
        self, *, entity_type: str, entity_id: str, expected_seq_nr: int, actual_seq_nr: int
    ) -> None:
        super().__init__(
            f"concurrent write to {entity_type}/{entity_id}: expected highest sequence number "
            f"{expected_seq_nr}, the journal has {actual_seq_nr}"
        )
        self.entity_type = entity_type
        self.entity_id = entity_id
        self.expected_seq_nr = expected_seq_nr
        self.actual_seq_nr = actual_seq_nr


class DuplicateCommandId(JournalError):
    """A write carried a reply under a command id that is already stored for its entity: the
    command was applied before, so this write was not applied (the others of the batch were).
    Ask with ``check_duplicate`` (a caller-given command id) to get the stored reply instead."""

    def __init__(self, message: str, *, command_id: str | None = None) -> None:
        super().__init__(message)
        self.command_id = command_id


class JournalUnavailable(JournalError):
    """The journal's database cannot be reached."""


class WriteRefused(JournalError):
    """The journal refused one entity's write because of its data: an id or a tag that breaks
    the id rules, or a value the database itself refused (too long, an invalid character, a
    constraint or trigger). Nothing of that write was stored; the other writes of its batch
    committed. Names the entity and the reason."""

    def __init__(self, message: str, *, entity_type: str = "", entity_id: str = "") -> None:
        super().__init__(message)
        self.entity_type = entity_type
        self.entity_id = entity_id


class EventsMissing(JournalError):
    """Recovering an entity needs events that were deleted, and no readable snapshot covers
    them: replaying what is left would give a wrong state, so the entity refuses to start.

    An entity whose every event was deleted (and no snapshot kept) misses none: it was
    forgotten, and starts again from its initial state where the deletion left it (see
    :meth:`Journal.restarted_at <lagompy.journal.Journal.restarted_at>`)."""


# --------------------------------------------------------------------------- runtime


class RuntimeFailure(LagompyError):
    """The entity runtime could not deliver a command or its reply."""


class Overloaded(RuntimeFailure):
    """A bounded queue is full; the command was not run. Retry after a pause."""


class AskTimeout(RuntimeFailure):
    """No reply arrived within the ask's timeout; the command may or may not have run.
    Asking again with the same command id is safe."""

    def __init__(self, message: str, *, command_id: str | None = None) -> None:
        super().__init__(message)
        self.command_id = command_id


class OutcomeUnknown(RuntimeFailure):
    """A shard host failed while it held the command and every retry failed too: the command
    may or may not have been applied. Ask again with the same ``command_id`` to find out (a
    command that persisted events is never applied twice)."""

    def __init__(self, command_id: str, message: str | None = None) -> None:
        super().__init__(
            message
            or f"the outcome of command {command_id} is unknown: its shard host failed and "
            "retries ran out; ask again with the same command id"
        )
        self.command_id = command_id


# --------------------------------------------------------------------------- service calls


class ServiceCallError(LagompyError):
    """A call to another service, made through a ``ServiceClient``, failed."""

    def __init__(self, message: str, *, service: str | None = None) -> None:
        super().__init__(message)
        self.service = service


class CircuitBreakerOpen(ServiceCallError):
    """The call's circuit breaker is open (or half-open with its one trial call in flight):
    the call was not made. ``retry_after`` is the number of seconds until the breaker lets a
    trial call through."""

    def __init__(
        self,
        message: str,
        *,
        breaker_id: str = "",
        retry_after: float = 0.0,
        service: str | None = None,
    ) -> None:
        super().__init__(message, service=service)
        self.breaker_id = breaker_id
        self.retry_after = retry_after


class ServiceCallTimeout(ServiceCallError):
    """No response arrived within the call timeout; the call may or may not have had an
    effect. Counts as a failure of the call's circuit breaker. ``timeout`` is that timeout in
    seconds, when known."""

    def __init__(
        self, message: str, *, service: str | None = None, timeout: float | None = None
    ) -> None:
        super().__init__(message, service=service)
        self.timeout = timeout


class ServiceUnavailable(ServiceCallError):
    """The service cannot be reached: no URL is configured for it, or connecting (or sending
    the request) failed."""


class ServiceCallFailed(ServiceCallError):
    """The service answered with an error status (4xx or 5xx). ``status`` is the HTTP status,
    ``body`` the decoded JSON body (or the text when it is not JSON)."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 500,
        body: Any = None,
        method: str | None = None,
        url: str | None = None,
        service: str | None = None,
    ) -> None:
        super().__init__(message, service=service)
        self.status = status
        self.body = body
        self.method = method
        self.url = url


# --------------------------------------------------------------------------- workflows


class WorkflowError(LagompyError):
    """A durable workflow (:mod:`lagompy.workflow`) cannot go on, or was asked for something
    that does not exist."""


class UnknownWorkflow(WorkflowError, ValueError):
    """No workflow is registered under this name (and version): nothing was started."""

    http_status: ClassVar[int] = 404


class InvalidWorkflowInput(WorkflowError, ValueError):
    """A workflow's input (or a signal's payload) does not fit lagompy's serialization (an
    unregistered class, a value its annotation refuses): nothing was started or sent."""

    http_status: ClassVar[int] = 422


class DuplicateWorkflowId(CommandRejected, WorkflowError):
    """A run with this id exists, started with another workflow or another input: a run id is
    the idempotency key of a start (the same id with the same input returns the existing run)."""

    http_status = 409


class WorkflowNotFound(CommandRejected, WorkflowError):
    """No workflow run has this id."""

    http_status = 404


class WorkflowNonDeterminism(WorkflowError):
    """Replaying a run found, at a recorded position, another step than the one the workflow's
    code calls now (the code changed in a way its recorded runs cannot follow: put the change
    behind ``ctx.patched(...)``). ``recorded`` and ``called`` name both steps."""

    def __init__(
        self,
        message: str,
        *,
        run_id: str = "",
        position: int = -1,
        recorded: str = "",
        called: str = "",
    ) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.position = position
        self.recorded = recorded
        self.called = called


class StepFailed(WorkflowError):
    """A workflow step failed for good (its retries ran out, an entity rejected its command,
    a child workflow failed): raised in the workflow's code, the same way when the run is
    replayed. ``step`` names the step, ``error_type`` the class of the original error
    (``"InvalidCommand"``...), ``error`` its message."""

    def __init__(
        self, message: str, *, step: str = "", error_type: str = "", error: str = ""
    ) -> None:
        super().__init__(message)
        self.step = step
        self.error_type = error_type
        self.error = error


class WorkflowCancelled(WorkflowError):
    """The run was cancelled: raised in the workflow's code at its next step (compensations
    still run)."""


class WorkflowFailed(WorkflowError):
    """The run whose result was awaited failed or was cancelled; ``status`` says which and
    the message carries the run's error."""

    def __init__(self, message: str, *, run_id: str = "", status: str = "failed") -> None:
        super().__init__(message)
        self.run_id = run_id
        self.status = status


def _rebuild_from_state(
    cls: type[LagompyError], message: str, state: dict[str, Any]
) -> LagompyError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err
