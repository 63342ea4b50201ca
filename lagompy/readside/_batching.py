"""The connection ``handle`` gets inside a batch: writes deferred, runs of one statement sent as
one executemany.

A handler written the simple way runs one SQLAlchemy statement per event; sent one by one, each
costs a round trip to the database. :class:`DeferringConnection` wraps the batch's
``AsyncConnection`` and keeps every write whose result the handler cannot read (a Core
``insert``/``update``/``delete`` without ``returning``, or a ``text`` INSERT/UPDATE/DELETE,
with one dict of parameters or none) in a list, in order. They are sent when something needs
the database (:meth:`DeferringConnection.flush`): before any other statement (a read sees the
batch's earlier writes), and at the end of the batch, before the offset is stored in the same
transaction. A flush sends each run of consecutive writes of the same statement (same SQL,
same parameter names: SQLAlchemy's cache key) as one ``conn.execute(stmt, [params, ...])``
(SQLAlchemy's executemany, insertmanyvalues for inserts), the runs in their order.

What cannot be deferred safely falls back to today's execution, never to a different one:

* any other statement, or an ``execute`` with options or a list of parameters, flushes what
  is pending, then runs at once; so do ``scalar``, ``scalars``, ``stream``,
  ``exec_driver_sql``, ``run_sync`` and every other coroutine of the connection (after those,
  the rest of the batch runs unbatched: they may touch the connection in ways a list cannot
  follow);
* using the result of a deferred write (``rowcount``, ``inserted_primary_key``, iterating it)
  or anything else synchronous on the connection (``begin_nested()``, ``sync_connection``...)
  raises :class:`DeferralDefeated`: the batch rolls back and the worker runs it again with the
  plain connection, and does not defer for that processor any more;
* a flush that fails fails the batch even if a handler catches the error (the failing write
  may belong to an earlier event): the worker goes one event per transaction, with the plain
  connection, as it does for every failing batch, so the failing event is the one retried,
  skipped or stopped at, and its writes never commit.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, cast

from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.elements import TextClause

__all__ = ["DeferralDefeated", "DeferringConnection", "deferrable"]

#: Attributes of the connection a handler may read without the pending writes being sent.
_HARMLESS = frozenset({"dialect", "engine", "sync_engine", "info"})

_WRITES = ("insert", "update", "delete")


class DeferralDefeated(Exception):
    """A handler used something a deferred batch cannot provide (the result of a deferred
    write, a synchronous attribute of the connection): the batch is run again unbatched."""


def deferrable(statement: Any) -> bool:
    """True for a write whose execution yields nothing the handler needs: a Core
    insert/update/delete without ``returning``, or a text INSERT/UPDATE/DELETE without
    RETURNING."""
    if isinstance(statement, UpdateBase):
        if statement._returning or getattr(statement, "_return_defaults", False):
            return False
        return bool(statement.is_dml)
    if isinstance(statement, TextClause):
        sql = statement.text.lstrip().lower()
        return sql.startswith(_WRITES) and "returning" not in sql
    return False


class _DeferredResult:
    """What ``execute`` returns for a deferred write: reading it defeats the deferral."""

    __slots__ = ("_owner",)

    def __init__(self, owner: DeferringConnection) -> None:
        self._owner = owner

    def _defeat(self, what: str) -> DeferralDefeated:
        return self._owner._defeat(f"the result of a deferred write was read ({what})")

    def __getattr__(self, name: str) -> Any:
        raise self._defeat(name)

    def __iter__(self) -> Any:
        raise self._defeat("iteration")


#: (statement's cache key, parameter names): one run of one executemany.
_Key = tuple[Any, tuple[str, ...]]


class _Group:
    """How a run of writes with one key is sent: the first statement, compiled once, turns
    each write's values (bound in its statement, or given as parameters) into the parameters
    of one executemany."""

    __slots__ = ("compiled", "usable")

    def __init__(self, statement: Any, cache_key: Any, names: tuple[str, ...], dialect: Dialect):
        self.compiled: Any = statement.compile(
            dialect=dialect, cache_key=cache_key, column_keys=list(names)
        )
        self.usable = bool(self.compiled.bind_names) and not (
            getattr(self.compiled, "post_compile_params", None)
            or getattr(self.compiled, "literal_execute_params", None)
        )
        if self.usable:
            # Sent with every bound value as a parameter, the statement must compile to the
            # same SQL (a parameter named like a column would add it to an UPDATE's SET).
            bound = set(self.compiled.bind_names.values())
            again = statement.compile(dialect=dialect, column_keys=sorted(bound | set(names)))
            self.usable = again.string == self.compiled.string


class DeferringConnection:
    """An ``AsyncConnection`` for the handlers of one batch that defers writes (see the
    module). :meth:`flush` sends the pending writes; :meth:`finish` flushes and raises the
    error of any failed flush, even one a handler caught."""

    def __init__(
        self, conn: AsyncConnection, groups: dict[_Key, _Group], on_defeat: Callable[[str], None]
    ) -> None:
        self._conn = conn
        #: Compiled groups, kept across batches by the worker (keyed by cache key).
        self._groups = groups
        self._on_defeat = on_defeat
        self._pending: list[tuple[Any, Mapping[str, Any] | None, _Key | None]] = []
        self._immediate = False
        self._failed: BaseException | None = None
        self._defeated: DeferralDefeated | None = None

    # ------------------------------------------------------------------ what handlers call

    @property
    def dialect(self) -> Dialect:
        return self._conn.dialect

    async def execute(
        self,
        statement: Any,
        parameters: Any = None,
        *,
        execution_options: Any = None,
    ) -> Any:
        if (
            self._immediate
            or execution_options is not None
            or not (parameters is None or isinstance(parameters, Mapping))
            or not deferrable(statement)
        ):
            await self.flush()
            return await self._conn.execute(
                statement, parameters, execution_options=execution_options
            )
        self._pending.append((statement, parameters, None))
        return _DeferredResult(self)

    async def scalar(self, *args: Any, **kwargs: Any) -> Any:
        await self.flush()
        return await self._conn.scalar(*args, **kwargs)

    async def scalars(self, *args: Any, **kwargs: Any) -> Any:
        await self.flush()
        return await self._conn.scalars(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._conn, name)
        if name in _HARMLESS:
            return attribute
        if inspect.iscoroutinefunction(attribute):

            async def at_once(*args: Any, **kwargs: Any) -> Any:
                await self.flush()
                self._immediate = True
                return await attribute(*args, **kwargs)

            return at_once
        raise self._defeat(f"conn.{name}")

    # ------------------------------------------------------------------ the worker's

    def _defeat(self, why: str) -> DeferralDefeated:
        error = DeferralDefeated(why)
        if self._defeated is None:
            self._defeated = error
            self._on_defeat(why)
        return error

    @property
    def defeated(self) -> DeferralDefeated | None:
        return self._defeated

    async def finish(self) -> None:
        """Send what is pending; raise if the deferral was defeated or a flush failed."""
        await self.flush()
        if self._defeated is not None:
            raise self._defeated
        if self._failed is not None:
            raise self._failed

    async def flush(self) -> None:
        """Send the pending writes, in order, each run of one statement as one executemany."""
        if self._failed is not None:
            raise self._failed
        pending = self._pending
        if not pending:
            return
        self._pending = []
        try:
            await self._send(pending)
        except BaseException as e:
            self._failed = e
            raise

    async def _send(self, pending: list[tuple[Any, Mapping[str, Any] | None, _Key | None]]) -> None:
        conn = self._conn
        if len(pending) == 1:
            statement, parameters, _ = pending[0]
            await conn.execute(statement, parameters)
            return
        keyed = []
        last: Any = None
        for statement, parameters, _ in pending:
            if (
                last is not None
                and statement is last[0]
                and (parameters or {}).keys() == (last[1] or {}).keys()
            ):
                key = last[2]  # the same statement again: the cache key is known
            else:
                key = self._key(statement, parameters)
            last = (statement, parameters, key)
            keyed.append(last)
        start = 0
        while start < len(keyed):
            key = keyed[start][2]
            end = start + 1
            if key is not None:
                while end < len(keyed) and keyed[end][2] == key:
                    end += 1
            await self._send_run(keyed[start:end])
            start = end

    def _key(self, statement: Any, parameters: Mapping[str, Any] | None) -> Any:
        cache_key = statement._generate_cache_key()
        if cache_key is None:
            return None
        return (cache_key, (cache_key.key, tuple(sorted(parameters or ()))))

    async def _send_run(self, run: list[tuple[Any, Mapping[str, Any] | None, Any]]) -> None:
        conn = self._conn
        first, parameters, key = run[0]
        if len(run) == 1:
            await conn.execute(first, parameters)
            return
        cache_key, group_key = key
        if all(s is first for s, _, _ in run):
            if parameters:
                await conn.execute(first, [p or {} for _, p, _ in run])
            else:  # the same statement again and again, nothing to vary
                for _ in run:
                    await conn.execute(first)
            return
        group = self._groups.get(group_key)
        if group is None:
            group = self._groups[group_key] = _Group(first, cache_key, group_key[1], conn.dialect)
        if not group.usable:
            for statement, params, _ in run:
                await conn.execute(statement, params)
            return
        construct = group.compiled.construct_params
        await conn.execute(
            first,
            [
                construct(p, extracted_parameters=k[0].bindparams, escape_names=False)
                for _, p, k in run
            ],
        )


def deferring(
    conn: AsyncConnection, groups: dict[Any, Any], on_defeat: Callable[[str], None]
) -> tuple[AsyncConnection, DeferringConnection]:
    """The deferring connection, typed as the ``AsyncConnection`` handlers expect, and itself."""
    wrapper = DeferringConnection(conn, groups, on_defeat)
    return cast(AsyncConnection, wrapper), wrapper
