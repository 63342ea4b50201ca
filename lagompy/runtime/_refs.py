"""``EntityRef``: the handle users ask entities through, whichever runtime hosts them.

The in-process runtime and the sharded runtime on Ray differ only in where a request goes; the
ref gives both the same ``ask`` / ``tell`` with command ids, timeouts and errors.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from lagompy.entity import Command
from lagompy.errors import AskTimeout
from lagompy.journal._journal import check_command_id, check_entity_id
from lagompy.runtime._processing import Receipt, Request

log = logging.getLogger("lagompy.refs")

R = TypeVar("R")
C = TypeVar("C")

#: Takes a request, returns the future its reply or error arrives on (or raises Overloaded).
Submit = Callable[[Request], "asyncio.Future[Any]"]

#: Ask timeouts expire in steps of this many seconds (an ask may wait up to this much longer
#: than its timeout): all the asks whose deadlines fall in one step share one timer.
DEADLINE_STEP = 0.01


class _CommandIds:
    """Generated command ids: 96 random bits drawn once per process (again in a forked child),
    then a counter. As unique as a uuid4 per ask for safe retries, without a system call per
    ask (``os.urandom`` per ask was a tenth of the driver's cost under load)."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix = os.urandom(12).hex()
        self.counter = itertools.count()

    def next(self) -> str:
        # 32 hex characters (like uuid4().hex) for the first 2**32 asks of a process.
        return f"{self.prefix}{next(self.counter):08x}"


_command_ids = _CommandIds()


class _Bucket:
    __slots__ = ("asks", "timer")

    def __init__(self) -> None:
        self.asks: dict[asyncio.Future[Any], tuple[EntityRef[Any], float, str]] = {}
        self.timer: asyncio.TimerHandle | None = None


class _Deadlines:
    """The ask timeouts of one event loop, one timer per :data:`DEADLINE_STEP`.

    One ``call_later`` per ask made the loop's timer heap the driver's largest cost under load
    (a handle, a heap push and a pop among a thousand others per ask); with buckets, a thousand
    outstanding asks at 20,000 asks/s need about a hundred timers per second.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buckets: dict[int, _Bucket] = {}

    def add(
        self, future: asyncio.Future[Any], timeout: float, ref: EntityRef[Any], cid: str
    ) -> tuple[int, _Bucket]:
        step = math.ceil((self.loop.time() + timeout) / DEADLINE_STEP)
        bucket = self.buckets.get(step)
        if bucket is None:
            bucket = self.buckets[step] = _Bucket()
            bucket.timer = self.loop.call_at(step * DEADLINE_STEP, self._expire, step, bucket)
        bucket.asks[future] = (ref, timeout, cid)
        return step, bucket

    def remove(self, entry: tuple[int, _Bucket], future: asyncio.Future[Any]) -> None:
        step, bucket = entry
        asks = bucket.asks
        asks.pop(future, None)
        if not asks and self.buckets.get(step) is bucket:
            del self.buckets[step]
            assert bucket.timer is not None
            bucket.timer.cancel()

    def _expire(self, step: int, bucket: _Bucket) -> None:
        if self.buckets.get(step) is bucket:
            del self.buckets[step]
        for future, (ref, timeout, cid) in list(bucket.asks.items()):
            ref._expire(future, timeout, cid)
        bucket.asks.clear()


_deadlines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Deadlines] = (
    weakref.WeakKeyDictionary()
)


def _deadlines_of(loop: asyncio.AbstractEventLoop) -> _Deadlines:
    deadlines = _deadlines.get(loop)
    if deadlines is None:
        deadlines = _deadlines[loop] = _Deadlines(loop)
    return deadlines


class EntityRef(Generic[C]):
    """A handle on one entity: send it commands with :meth:`ask` or :meth:`tell`.

    The entity id is checked once, here: a ``str`` of 1 to 255 characters, with no NUL
    character and no lone surrogate; anything else raises
    :class:`~lagompy.errors.InvalidEntityId` (a ``ValueError``, and a rejection answered with
    400 by a service). Other types are refused rather than turned into text, so ``7`` and
    ``"7"`` can never name one entity by accident.
    """

    __slots__ = ("_submit_request", "entity_id", "entity_type")

    def __init__(self, submit: Submit, entity_type: str, entity_id: str) -> None:
        self._submit_request = submit
        self.entity_type = entity_type
        self.entity_id = check_entity_id(entity_id)

    def _submit(
        self, command: Any, command_id: str | None, receipt: bool = False
    ) -> tuple[asyncio.Future[Any], str]:
        # A generated id cannot have been seen before: only a caller's id is looked up.
        given = command_id is not None
        cid = check_command_id(command_id) if given else _command_ids.next()
        request = Request(self.entity_type, self.entity_id, command, cid, given, receipt)
        return self._submit_request(request), cid

    async def ask(
        self, command: Command[R], *, timeout: float | None = None, command_id: str | None = None
    ) -> R:
        """Send a command and wait for the reply (returned only after its events committed).

        Every ask carries a command id: ``command_id`` if given, else a new one. When the
        command persists events its reply is stored with them, so asking again with the same
        ``command_id`` (after a timeout, a crash, a restart) returns the stored reply instead of
        applying the command twice. Rejected and read-only commands store nothing: they run
        again.

        Raises the entity's rejection (a ``CommandRejected``, with its type, message and
        ``http_status``), ``CommandHandlerFailed`` for a handler bug, a ``JournalError``;
        ``Overloaded`` at once when too many asks are outstanding (the command is not run);
        ``AskTimeout`` (carrying the ``command_id``) after ``timeout`` seconds; on Ray,
        ``OutcomeUnknown`` when the entity's host failed and resends ran out;
        ``InvalidCommandId`` (a ``ValueError``, raised before anything is sent) for a command id
        that breaks the id rules (a ``str`` of 1 to 255 characters, no NUL, no lone surrogate).
        On Ray, ``SerializationError`` when the command does not pickle (it is not run), and
        ``UndeliverableOutcome`` when its reply or rejection does not pickle (its
        ``committed`` says whether the command was applied).
        """
        future, cid = self._submit(command, command_id)
        if timeout is None:
            result: R = await future
            return result
        # A shared timer fails the ask's own future (no extra task per ask, as wait_for would
        # make). An ask that expires before it is sent is never sent: runtimes skip done futures.
        deadlines = _deadlines_of(asyncio.get_running_loop())
        entry = deadlines.add(future, timeout, self, cid)
        try:
            reply: R = await future
            return reply
        finally:
            deadlines.remove(entry, future)

    async def ask_with_receipt(
        self, command: Command[R], *, command_id: str, timeout: float | None = None
    ) -> Receipt:
        """:meth:`ask` with ``command_id``, answered with a :class:`Receipt`: the reply, and
        whether the command is applied (its reply stored under ``command_id``, so that asking
        again returns this reply) rather than read-only. For engines built on entities (the
        workflows' executor records an applied ask's reply without waiting for the record)."""
        future, cid = self._submit(command, command_id, receipt=True)
        receipt: Receipt = await self._wait(future, timeout, cid)
        return receipt

    async def _wait(self, future: asyncio.Future[Any], timeout: float | None, cid: str) -> Any:
        if timeout is None:
            return await future
        deadlines = _deadlines_of(asyncio.get_running_loop())
        entry = deadlines.add(future, timeout, self, cid)
        try:
            return await future
        finally:
            deadlines.remove(entry, future)

    def _expire(self, future: asyncio.Future[Any], timeout: float, cid: str) -> None:
        if not future.done():
            future.set_exception(
                AskTimeout(
                    f"no reply from {self.entity_type}/{self.entity_id} within {timeout} s; the "
                    f"command may or may not have run: ask again with command_id={cid!r}",
                    command_id=cid,
                )
            )

    def tell(self, command: Command[Any], *, command_id: str | None = None) -> str:
        """Send a command without waiting for its outcome (failures are logged); returns its
        command id."""
        future, cid = self._submit(command, command_id)
        future.add_done_callback(_log_failure)
        return cid

    def __repr__(self) -> str:
        return f"EntityRef({self.entity_type!r}, {self.entity_id!r})"


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("told command failed: %s", future.exception())
