"""The connection ``handle`` gets inside a batch: writes deferred, runs of one statement sent as
one executemany.

A handler written the simple way runs one SQLAlchemy statement per event; sent one by one, each
costs a round trip to the database. :class:`DeferringConnection` wraps the batch's
``AsyncConnection`` and keeps every write whose result the handler cannot read (a Core
``insert``/``update``/``delete`` without ``returning``, or a ``text`` INSERT/UPDATE/DELETE,
with one dict of parameters or none, or a list of dicts with the same keys: an executemany, kept
as that many writes) in a list, in order. They are sent when something needs
the database (:meth:`DeferringConnection.flush`): before any other statement (a read sees the
batch's earlier writes), and at the end of the batch, before the offset is stored in the same
transaction. A flush sends each run of consecutive writes of the same statement (same SQL,
same parameter names: SQLAlchemy's cache key) as one executemany, the runs in their order. On
SQLite the worker takes the last flush's runs as driver statements instead
(:meth:`DeferringConnection.driver_writes`) and sends them with the offset and the COMMIT in
one call to the driver's thread.
A run of one statement object (built once, its values in the parameters: the way the docs
teach) goes to the driver's executemany through :class:`_Plan`, the statement compiled once and
each event's values put in their places (with the column types' bind processors) by a plan
made once per statement and parameter names; SQLAlchemy's own executemany builds a dict of
every bind parameter per row first, which cost a third of a simple projection's Python time.
A statement the plan does not cover exactly (Python-side column defaults, expanding or
literal-execute parameters, callable or required values not given, a named paramstyle) goes
through SQLAlchemy's ``conn.execute(stmt, [params, ...])`` as before.

What cannot be deferred safely falls back to today's execution, never to a different one:

* any other statement, or an ``execute`` with options or with a list of parameters whose
  dicts differ in their keys, flushes what is pending, then runs at once; so do ``scalar``,
  ``scalars``, ``stream``, ``exec_driver_sql``, ``run_sync`` and every other coroutine of the
  connection (after those, the rest of the batch runs unbatched: they may touch the
  connection in ways a list cannot follow);
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
from collections.abc import Callable, Mapping, Sequence
from itertools import pairwise
from operator import itemgetter
from typing import Any, TypeVar, cast

from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.elements import TextClause

from lagompy.readside._footprint import Footprint, footprint_of, regroup

_T = TypeVar("_T")

__all__ = [
    "DeferralDefeated",
    "DeferringConnection",
    "Learnt",
    "deferrable",
    "deferring",
]

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


def _plain_text(statement: TextClause) -> bool:
    """A ``text()`` that two statements of the same SQL compile and run alike: no execution
    options, and parameters without a value, a type, a callable or an expansion of their
    own (``.bindparams(...)`` gives them those)."""
    if statement._execution_options:
        return False
    for bind in statement._bindparams.values():
        if (
            bind.value is not None
            or bind.callable is not None
            or not bind.type._isnull
            or bind.expanding
            or bind.literal_execute
        ):
            return False
    return True


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


#: (statement's cache key, (its key tuple, parameter names)): writes with equal keys can go in
#: one executemany; the second half names their compiled :class:`_Group`.
_Key = tuple[Any, tuple[Any, tuple[str, ...]]]

#: Statement objects remembered (by identity) before the memo starts again.
_MEMO = 256


class _Group:
    """How a run of writes with one key is sent: the first statement, compiled once, turns
    each write's values (bound in its statement, or given as parameters) into the parameters
    of one executemany."""

    __slots__ = ("compiled", "planned", "usable")

    def __init__(self, statement: Any, cache_key: Any, names: tuple[str, ...], dialect: Dialect):
        #: The driver plan of the rows ``compiled.construct_params`` makes (made at first use).
        self.planned: tuple[tuple[str, ...], _Plan | None] | None = None
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


class _Plan:
    """How a run of one statement object with given parameter names goes to the driver's
    executemany: the SQL compiled once, and per position of its (positional) parameters either
    a parameter's name or a constant bound in the statement, each through its type's bind
    processor: what SQLAlchemy's executemany computes per row (``construct_params`` then the
    processors), computed here once per statement. :func:`_plan` returns ``None`` for every
    statement whose execution needs more than that."""

    __slots__ = ("_build", "sql")

    def __init__(self, sql: str, build: Callable[[Sequence[Mapping[str, Any]]], list[Any]]):
        self.sql = sql
        self._build = build

    def rows(self, parameters: Sequence[Mapping[str, Any]]) -> list[Any]:
        return self._build(parameters)


def _plan(statement: Any, names: tuple[str, ...], dialect: Dialect) -> _Plan | None:
    """The :class:`_Plan` of ``statement`` run with parameters named ``names``, or ``None``
    when SQLAlchemy's own executemany must run it (see the module)."""
    try:
        compiled: Any = statement.compile(dialect=dialect, column_keys=list(names))
    except Exception:
        return None  # SQLAlchemy raises its own error when the run is sent its way
    return _compiled_plan(compiled, names)


def _driver_processors(compiled: Any) -> Mapping[str, Any] | None:
    """The bind processors of a compiled statement whose SQL and positional parameters can go
    to the driver as they are (what :func:`_compiled_plan` sends);
    None when its execution needs more of SQLAlchemy."""
    processors = getattr(compiled, "_bind_processors", None)
    if (
        not compiled.positional
        or not isinstance(processors, Mapping)
        or compiled.insert_prefetch
        or compiled.update_prefetch
        or compiled.post_compile_params
        or compiled.literal_execute_params
        or compiled.escaped_bind_names
        or getattr(compiled, "_insertmanyvalues", None) is not None
        or getattr(compiled, "schema_translate_map", None)
        or getattr(compiled, "_collected_params", None)  # values given by stmt.params(...)
    ):
        return None
    return processors


def _compiled_plan(compiled: Any, names: tuple[str, ...]) -> _Plan | None:
    """:func:`_plan`, of a statement compiled for ``names``."""
    processors = _driver_processors(compiled)
    if processors is None:
        return None
    given = frozenset(names)
    #: Per position: (parameter name, None) or (None, constant), and the bind processor.
    steps: list[tuple[str | None, Any, Callable[[Any], Any] | None]] = []
    for name in compiled.positiontup:
        bind = compiled.binds[name]
        processor = processors.get(name)
        if bind.key in given:
            steps.append((bind.key, None, processor))
        elif name in given:
            steps.append((name, None, processor))
        elif bind.required or bind.callable is not None:
            return None
        else:
            value = bind.value
            steps.append((None, processor(value) if processor else value, None))
    sequence = compiled.dialect.execute_sequence_format
    keys = [key for key, _, _ in steps if key is not None]
    if not keys:
        return None
    if len(keys) == len(steps) and not any(p for _, _, p in steps) and sequence is tuple:
        # Every position a parameter, none converted: the row is the values in order.
        get = itemgetter(*keys)
        if len(keys) == 1:
            return _Plan(compiled.string, lambda ps: [(get(p),) for p in ps])
        return _Plan(compiled.string, lambda ps: [get(p) for p in ps])

    return _Plan(compiled.string, _row_builder(steps, sequence))


def _row_builder(
    steps: Sequence[tuple[str | None, Any, Callable[[Any], Any] | None]], sequence: Any
) -> Callable[[Sequence[Mapping[str, Any]]], list[Any]]:
    """The rows of a :class:`_Plan` with a constant or a bind processor in some position:
    one expression per position, generated once (``(p['user_id'], ..., f3(p['active']),
    ...)``). A comprehension that looked each position's step up for every row cost 0.7 us
    per row of five values, the generated one 0.2 (2026-12-06, CPU reference 13 ms)."""
    ns: dict[str, Any] = {"_sequence": sequence}
    items = []
    for i, (key, constant, convert) in enumerate(steps):
        if key is None:
            ns[f"c{i}"] = constant
            items.append(f"c{i}")
        elif convert is None:
            items.append(f"p[{key!r}]")
        else:
            ns[f"f{i}"] = convert
            items.append(f"f{i}(p[{key!r}])")
    row = "(" + ", ".join(items) + ",)"
    if sequence is not tuple:
        row = f"_sequence([{', '.join(items)}])"
    source = f"def build(ps):\n    return [{row} for p in ps]\n"
    exec(compile(source, "<lagompy read-side write plan>", "exec"), ns)
    return cast(Callable[[Sequence[Mapping[str, Any]]], list[Any]], ns["build"])


class Learnt:
    """What deferring connections learn about statements, kept by a worker from batch to
    batch: compiled groups (by cache key), the driver plans of statement objects, and whether
    a statement object can be deferred (by identity, the object held so that its id is not
    reused; SQLAlchemy statements are immutable, every method returns a new one, so what is
    learnt of an object stays true). Those memos start again past ``_MEMO`` entries (handlers
    that build a statement per event)."""

    __slots__ = ("deferrable", "footprints", "groups", "plans", "regroup", "texts")

    def __init__(self, *, regroup: bool = True) -> None:
        #: Writes to different rows may be sent in fewer runs (see _footprint.regroup).
        self.regroup = regroup
        self.footprints: dict[int, tuple[Any, Footprint | None]] = {}
        self.groups: dict[Any, _Group] = {}
        self.deferrable: dict[int, tuple[Any, bool]] = {}
        self.plans: dict[tuple[int, tuple[str, ...]], tuple[Any, _Plan | None]] = {}
        #: SQL string -> the first plain ``text()`` seen with it (see :func:`_plain_text`).
        self.texts: dict[str, TextClause] = {}


class DeferringConnection:
    """An ``AsyncConnection`` for the handlers of one batch that defers writes (see the
    module). :meth:`flush` sends the pending writes; :meth:`finish` flushes and raises the
    error of any failed flush, even one a handler caught."""

    def __init__(
        self,
        conn: AsyncConnection,
        learnt: Learnt,
        on_defeat: Callable[[str], None],
    ) -> None:
        self._conn = conn
        self._groups = learnt.groups
        self._on_defeat = on_defeat
        #: The pending writes: statements and their parameters, side by side.
        self._statements: list[Any] = []
        self._parameters: list[Mapping[str, Any] | None] = []
        self._deferrable = learnt.deferrable
        self._plans = learnt.plans
        self._texts = learnt.texts
        self._footprints = learnt.footprints
        self._regroup = learnt.regroup
        self._dialect = conn.dialect
        self._immediate = False
        self._failed: BaseException | None = None
        self._defeated: DeferralDefeated | None = None
        #: What every deferred write returns (nothing to read in it: one object serves all).
        self._result = _DeferredResult(self)

    # ------------------------------------------------------------------ what handlers call

    @property
    def dialect(self) -> Dialect:
        return self._dialect

    async def execute(
        self,
        statement: Any,
        parameters: Any = None,
        *,
        execution_options: Any = None,
    ) -> Any:
        if statement.__class__ is TextClause:
            statement = self._same_text(statement)
        # What a statement object seen before is, remembered (see Learnt).
        seen = self._deferrable.get(id(statement))
        if seen is not None and seen[0] is statement:
            can_defer = seen[1]
        else:
            can_defer = deferrable(statement)
            if len(self._deferrable) >= _MEMO:
                self._deferrable.clear()
            self._deferrable[id(statement)] = (statement, can_defer)
        if can_defer and not self._immediate and execution_options is None:
            if (
                parameters is None
                or parameters.__class__ is dict
                or isinstance(parameters, Mapping)
            ):
                self._statements.append(statement)
                self._parameters.append(parameters)
                return self._result
            if _uniform(parameters):
                # An executemany (``handle_batch``'s set-based writes): its rows are kept as
                # writes of the one statement, in order, and go back out as one run.
                self._statements.extend([statement] * len(parameters))
                self._parameters.extend(parameters)
                return self._result
        await self.flush()
        return await self._conn.execute(statement, parameters, execution_options=execution_options)

    def _same_text(self, statement: TextClause) -> TextClause:
        """The first plain ``text()`` of this connection's worker with the SQL of
        ``statement``, or ``statement`` itself: a handler that builds ``text(...)`` for each
        event (docs/readside.md's first example) gets the runs, plans and memos of a
        statement built once. Measured on 5,000 upserts through a deferring connection:
        ~22,000 events/s with a cache key per event, ~230,000 once built (SQLite; PostgreSQL
        ~18,000 and ~56,000)."""
        texts = self._texts
        first = texts.get(statement.text)
        if first is statement or not _plain_text(statement):
            return statement
        if first is None:
            if len(texts) >= _MEMO:
                texts.clear()
            texts[statement.text] = statement
            return statement
        return first

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
        statements = self._statements
        if not statements:
            return
        parameters = self._parameters
        self._statements, self._parameters = [], []
        try:
            await self._send(statements, parameters)
        except BaseException as e:
            self._failed = e
            raise

    def driver_writes(self) -> list[tuple[str, list[Any]]] | None:
        """The pending writes as driver statements, each run one ``(sql, rows)`` for the
        driver's executemany, in order, taken out of this connection: the caller sends them.
        None, and nothing taken, when a run needs SQLAlchemy to execute it (no driver plan),
        or the batch went unbatched, defeated or failed. For the read-side worker's commit in
        one call on SQLite (``_worker.py``)."""
        if self._failed is not None or self._defeated is not None or self._immediate:
            return None
        ops = self._ops(self._statements, self._parameters)
        writes: list[tuple[str, list[Any]]] = []
        for op in ops:
            if op[0] is None:
                return None
            writes.append((op[0], op[1]))
        self._statements, self._parameters = [], []
        return writes

    async def _send(
        self, statements: list[Any], parameters: list[Mapping[str, Any] | None]
    ) -> None:
        conn = self._conn
        for sql, rows, statement, params in self._ops(statements, parameters):
            if sql is not None:
                await conn.exec_driver_sql(sql, rows)
            elif params is _EACH:
                for k in rows:
                    await conn.execute(statements[k], parameters[k])
            else:
                await conn.execute(statement, params)

    def _ops(self, statements: list[Any], parameters: list[Mapping[str, Any] | None]) -> list[_Op]:
        """How the pending writes are sent: each run of one statement as one executemany.
        Consecutive writes of the very same statement object with the same parameter names
        (the handler built it once) form a run with no work per write; neighbouring runs whose
        statements have the same cache key (built anew for each event) join into one, sent
        through their compiled group."""
        n = len(statements)
        if n == 0:
            return []
        if n == 1:
            return [self._single(statements[0], parameters[0])]
        if self._regroup and _runs(statements) > 1 + n // 64:
            # Many short runs (events whose types alternate): fewer, where that changes nothing
            # (a run costs a round trip on PostgreSQL, ~0.1 ms: what regrouping ~150 writes
            # costs, at ~0.65 us each; see _footprint.regroup).
            statements, parameters = regroup(statements, parameters, self._footprint)
        # Runs of the same object: (start, end, key); the key is None for a statement that
        # cannot be cached (never joined with another run).
        runs: list[tuple[int, int, Any]] = []
        start = 0
        while start < n:
            first, given = statements[start], parameters[start]
            end = start + 1
            if given:
                shape = given.keys()
                while end < n and statements[end] is first:
                    p = parameters[end]
                    if not p or p.keys() != shape:
                        break
                    end += 1
            else:
                while end < n and statements[end] is first and not parameters[end]:
                    end += 1
            runs.append((start, end, self._key(first, _names(given))))
            start = end
        ops: list[_Op] = []
        i = 0
        while i < len(runs):
            begin, stop, key = runs[i]
            j = i + 1
            if key is not None:
                while j < len(runs) and runs[j][2] == key:
                    j += 1
            if j == i + 1:
                ops.extend(self._same(statements[begin], parameters[begin:stop]))
            else:
                ops.append(self._joined(runs[i:j], statements, parameters, key))
            i = j
        return ops

    def _footprint(self, statement: Any) -> Footprint | None:
        """The statement object's :class:`Footprint` (None: a barrier), found once."""
        return _remembered(
            self._footprints, id(statement), statement, lambda: footprint_of(statement)
        )

    def _key(self, statement: Any, names: tuple[str, ...]) -> _Key | None:
        """(statement's cache key, its group key); SQLAlchemy remembers an object's cache key."""
        cache_key = statement._generate_cache_key()
        return None if cache_key is None else (cache_key, (cache_key.key, names))

    def _single(self, statement: Any, parameters: Mapping[str, Any] | None) -> _Op:
        """One write alone: through its driver plan when it has one."""
        if parameters:
            plan = self._plan(statement, _names(parameters))
            if plan is not None:
                return (plan.sql, plan.rows([parameters]), None, None)
        return (None, [], statement, parameters)

    def _same(self, statement: Any, parameters: list[Mapping[str, Any] | None]) -> list[_Op]:
        if len(parameters) == 1:
            return [self._single(statement, parameters[0])]
        if parameters[0]:  # then every one: a run shares its parameter names
            rows = cast(list[Mapping[str, Any]], parameters)
            plan = self._plan(statement, _names(parameters[0]))
            if plan is None:
                return [(None, [], statement, rows)]
            return [(plan.sql, plan.rows(rows), None, None)]
        # the same statement again and again, nothing to vary
        return [(None, [], statement, None) for _ in parameters]

    def _plan(self, statement: Any, names: tuple[str, ...]) -> _Plan | None:
        """The statement object's driver plan for these parameter names (see :class:`_Plan`),
        made once and remembered by identity."""
        return _remembered(
            self._plans, (id(statement), names), statement,
            lambda: _plan(statement, names, self._dialect),
        )  # fmt: skip

    def _joined(
        self,
        runs: list[tuple[int, int, Any]],
        statements: list[Any],
        parameters: list[Mapping[str, Any] | None],
        key: _Key,
    ) -> _Op:
        """Runs of different statement objects with one cache key: one executemany of the
        first one, each write's values (bound in its statement, or given) as its parameters."""
        cache_key, group_key = key
        group = self._groups.get(group_key)
        first = statements[runs[0][0]]
        if group is None:
            group = self._groups[group_key] = _Group(first, cache_key, group_key[1], self._dialect)
        if not group.usable:
            each = [k for begin, stop, _ in runs for k in range(begin, stop)]
            return (None, each, None, _EACH)
        construct = group.compiled.construct_params
        rows = []
        for begin, stop, run_key in runs:
            bound = run_key[0].bindparams
            for k in range(begin, stop):
                rows.append(
                    construct(parameters[k], extracted_parameters=bound, escape_names=False)
                )
        # Every row names every parameter of the compiled statement: its driver plan puts
        # them in place (what SQLAlchemy's executemany would do again for each row).
        names = _names(rows[0])
        if group.planned is None or group.planned[0] != names:
            compiled = group.compiled
            whole = compiled.positional and set(compiled.positiontup) <= set(names)
            # (A position without a parameter would take the first statement's constant.)
            plan = _compiled_plan(compiled, names) if whole else None
            group.planned = (names, plan)
        plan = group.planned[1]
        if plan is None:
            return (None, [], first, rows)
        return (plan.sql, plan.rows(rows), None, None)


#: One step of a flush: (driver SQL, its rows, None, None) for the driver's executemany;
#: (None, [], statement, parameters) for SQLAlchemy's execute; (None, indices, None, _EACH)
#: for writes executed one by one, each with its own statement and parameters.
_Op = tuple[str | None, list[Any], Any, Any]
_EACH: Any = object()


def _remembered(
    memo: dict[Any, tuple[Any, _T]], key: Any, statement: Any, find: Callable[[], _T]
) -> _T:
    """What ``find`` says of a statement object, remembered under ``key`` (made of its id) with
    the object itself, so that a reused id is not taken for it (see :class:`Learnt`); the memo
    starts again past ``_MEMO`` entries. (``execute`` keeps its own inline copy for the
    deferrable check: it runs for every write.)"""
    seen = memo.get(key)
    if seen is not None and seen[0] is statement:
        return seen[1]
    found = find()
    if len(memo) >= _MEMO:
        memo.clear()
    memo[key] = (statement, found)
    return found


def _runs(statements: list[Any]) -> int:
    """How many runs of one statement object the writes are, in their order."""
    return 1 + sum(1 for a, b in pairwise(statements) if a is not b)


def _uniform(parameters: Any) -> bool:
    """True for the parameters of an executemany that deferring keeps as it is: a non-empty
    list (or tuple) of mappings that all have the first one's keys."""
    if parameters.__class__ is not list and parameters.__class__ is not tuple:
        return False
    if not parameters or not isinstance(parameters[0], Mapping):
        return False
    keys = parameters[0].keys()
    return all(isinstance(p, Mapping) and p.keys() == keys for p in parameters)


def _names(parameters: Mapping[str, Any] | None) -> tuple[str, ...]:
    return tuple(sorted(parameters)) if parameters else ()


def deferring(
    conn: AsyncConnection,
    learnt: Learnt,
    on_defeat: Callable[[str], None],
) -> tuple[AsyncConnection, DeferringConnection]:
    """The deferring connection, typed as the ``AsyncConnection`` handlers expect, and itself
    (``learnt``: kept by the caller across batches)."""
    wrapper = DeferringConnection(conn, learnt, on_defeat)
    return cast(AsyncConnection, wrapper), wrapper
