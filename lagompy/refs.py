"""``EntityRef``: the handle users ask entities through, whichever runtime hosts them.

The in-process runtime and the sharded runtime on Ray differ only in where a request goes; the
ref gives both the same ``ask`` / ``tell`` with command ids, timeouts and errors.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from lagompy.entity import Command
from lagompy.errors import AskTimeout
from lagompy.journal import check_command_id
from lagompy.processing import Request

log = logging.getLogger("lagompy.refs")

R = TypeVar("R")
C = TypeVar("C")

#: Takes a request, returns the future its reply or error arrives on (or raises Overloaded).
Submit = Callable[[Request], "asyncio.Future[Any]"]


class EntityRef(Generic[C]):
    """A handle on one entity: send it commands with :meth:`ask` or :meth:`tell`."""

    __slots__ = ("_submit_request", "entity_id", "entity_type")

    def __init__(self, submit: Submit, entity_type: str, entity_id: str) -> None:
        self._submit_request = submit
        self.entity_type = entity_type
        self.entity_id = entity_id

    def _submit(self, command: Any, command_id: str | None) -> tuple[asyncio.Future[Any], str]:
        # A generated id cannot have been seen before: only a caller's id is looked up.
        given = command_id is not None
        cid = check_command_id(command_id) if given else uuid.uuid4().hex
        request = Request(
            self.entity_type, self.entity_id, command, command_id=cid, check_duplicate=given
        )
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
        ``OutcomeUnknown`` when the entity's host failed and resends ran out; ``ValueError`` for
        a command id that is empty or too long.
        """
        future, cid = self._submit(command, command_id)
        if timeout is None:
            result: R = await future
            return result
        # A timer on the ask's own future (cheaper than wait_for's extra task per ask). An ask
        # that expires before it is sent is never sent: runtimes skip done futures.
        timer = asyncio.get_running_loop().call_later(timeout, self._expire, future, timeout, cid)
        try:
            reply: R = await future
            return reply
        finally:
            timer.cancel()

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
