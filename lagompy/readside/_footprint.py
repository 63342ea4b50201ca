"""Which row a kept write changes, so that a flush may send writes to different rows in fewer
runs (see :func:`regroup`).

A write's **footprint** is the row it changes: its table and the values of the table's primary
key, read from the write's parameters or from values bound in its statement. Only writes whose
effect provably depends on that row alone get one:

* a Core ``update``/``delete`` whose WHERE is an AND that compares every primary-key column to
  a bound value with ``=``;
* a Core ``insert`` (one row) that gives every primary-key column a bound value, plain or with
  an ``ON CONFLICT`` on exactly the primary key (PostgreSQL's and SQLite's dialect inserts);

with no subquery and no column of another table anywhere in the statement, on a ``Table``
whose metadata declares no unique constraint or unique index besides the primary key and no
foreign key from or to it (such constraints make a write's outcome depend on other rows).
Every other write (``text()``, a statement built otherwise, a table with such constraints)
has none and is a **barrier**: nothing moves across it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Table, types
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.dml import Delete, Insert, Update
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    BooleanClauseList,
    ColumnClause,
)
from sqlalchemy.sql.schema import Column, ForeignKeyConstraint, UniqueConstraint
from sqlalchemy.sql.selectable import SelectBase

__all__ = ["Footprint", "footprint_of", "regroup"]

#: Per primary-key column: the parameter to read its value from, and the value bound in the
#: statement to fall back on (``_MISSING``: none).
_Getter = tuple[str, Any]


class Footprint:
    """How to find the row a write of one statement changes: ``row(parameters)`` is
    ``(table, primary-key values)``; ``KeyError`` when the parameters do not say, and
    ``TypeError`` for a value of another type than its column's (the database would convert
    it: two values Python tells apart could be one row)."""

    __slots__ = ("_one", "getters", "kinds", "table")

    def __init__(self, table: Table, getters: Sequence[_Getter], kinds: Sequence[type]) -> None:
        self.table = table
        self.getters = tuple(getters)
        self.kinds = tuple(kinds)
        #: A one-column key (most tables): its getter and type, read without a loop.
        self._one = (*self.getters[0], self.kinds[0]) if len(self.getters) == 1 else None

    def row(self, parameters: Mapping[str, Any] | None) -> tuple[Table, tuple[Any, ...]]:
        one = self._one
        if one is not None:
            name, bound, kind = one
            if parameters is not None and name in parameters:
                value = parameters[name]
            elif bound is _MISSING:
                raise KeyError(name)
            else:
                value = bound
            if not isinstance(value, kind):
                raise TypeError(name)
            return self.table, (value,)
        values = []
        for (name, bound), kind in zip(self.getters, self.kinds, strict=True):
            if parameters is not None and name in parameters:
                value = parameters[name]
            elif bound is not _MISSING:
                value = bound
            else:
                raise KeyError(name)
            if not isinstance(value, kind):
                raise TypeError(name)
            values.append(value)
        return self.table, tuple(values)


_MISSING: Any = object()


#: Key column types whose values the database compares as Python does (no collation, no
#: padding, no case folding): a subclass (``CHAR``, ``CITEXT``...) is not one of them.
_KEY_TYPES: dict[type, type] = {
    types.String: str,
    types.Text: str,
    types.Unicode: str,
    types.UnicodeText: str,
    types.VARCHAR: str,
    types.TEXT: str,
    types.Integer: int,
    types.BigInteger: int,
    types.SmallInteger: int,
    types.INTEGER: int,
    types.BIGINT: int,
    types.SMALLINT: int,
}


#: What :func:`_row_kinds` found of each table (its metadata, read once).
_KINDS: weakref.WeakKeyDictionary[Table, tuple[type, ...] | None] = weakref.WeakKeyDictionary()


def _row_kinds(table: Table) -> tuple[type, ...] | None:
    """The Python types of the table's key columns when its rows stand alone (:func:`_alone`)
    and its keys compare as Python's values do (:func:`_key_kinds`); None otherwise. Read once
    per table: handlers that build a statement per event ask for every write."""
    try:
        return _KINDS[table]
    except KeyError:
        pass
    kinds = _key_kinds(table) if _alone(table) else None
    found = None if kinds is None else tuple(kinds)
    _KINDS[table] = found
    return found


def _key_kinds(table: Table) -> list[type] | None:
    kinds = []
    for column in table.primary_key.columns:
        kind = _KEY_TYPES.get(type(column.type))
        if kind is None or getattr(column.type, "collation", None):
            return None
        kinds.append(kind)
    return kinds


def _alone(table: Table) -> bool:
    """The table's metadata declares no constraint that ties its rows to other rows: no unique
    constraint or unique index besides the primary key, no foreign key from it or to it."""
    if not isinstance(table, Table) or not table.primary_key.columns:
        return False
    for constraint in table.constraints:
        if isinstance(constraint, ForeignKeyConstraint):
            return False
        if isinstance(constraint, UniqueConstraint):
            return False
    if any(index.unique for index in table.indexes):
        return False
    if any(column.unique for column in table.columns):
        return False
    metadata = table.metadata
    for other in metadata.tables.values():
        for fk in other.foreign_keys:
            if fk.references(table):
                return False
    return True


def _local(element: Any, table: Table) -> bool:
    """No subquery, and no column of another table, in ``element`` (None: nothing)."""
    if element is None or not hasattr(element, "get_children"):
        return True  # a plain Python value
    for node in visitors.iterate(element):
        if isinstance(node, SelectBase):
            return False
        if isinstance(node, ColumnClause) and node.table is not None:
            name = getattr(node.table, "name", None)
            if node.table is not table and name != "excluded":
                return False
    return True


def _bound(value: Any) -> _Getter | None:
    if not isinstance(value, BindParameter) or value.callable is not None or value.expanding:
        return None
    bound = _MISSING if value.value is None and value.required else value.value
    return (value.key, bound)


def _where_getters(where: Any, table: Table) -> list[_Getter] | None:
    """The getters of every primary-key column from an AND of comparisons, or None."""
    if where is None:
        return None
    if isinstance(where, BooleanClauseList):
        if where.operator is not operators.and_:
            return None
        clauses = list(where.clauses)
    else:
        clauses = [where]
    found: dict[str, _Getter] = {}
    for clause in clauses:
        if not isinstance(clause, BinaryExpression) or clause.operator is not operators.eq:
            continue  # a narrower condition on the same row
        left, right = clause.left, clause.right
        if isinstance(right, Column) and right.table is table:
            left, right = right, left
        if isinstance(left, Column) and left.table is table and left.primary_key:
            getter = _bound(right)
            if getter is not None:
                found[left.key] = getter
    keys = [c.key for c in table.primary_key.columns]
    if not all(k in found for k in keys):
        return None
    return [found[k] for k in keys]


def _insert_getters(statement: Insert, table: Table) -> list[_Getter] | None:
    if getattr(statement, "_multi_values", None) or getattr(statement, "select", None) is not None:
        return None
    values: Mapping[Any, Any] = getattr(statement, "_values", None) or {}
    by_key = {getattr(column, "key", column): value for column, value in values.items()}
    post = getattr(statement, "_post_values_clause", None)
    if post is not None:
        # ON CONFLICT: only on exactly the primary key does it touch the written row alone.
        target = getattr(post, "inferred_target_elements", None) or []
        names = {getattr(t, "key", t) for t in target}
        if names != {c.key for c in table.primary_key.columns}:
            return None
        if getattr(post, "inferred_target_whereclause", None) is not None:
            return None
        to_set: Any = getattr(post, "update_values_to_set", None) or {}
        pairs = to_set.items() if isinstance(to_set, Mapping) else to_set
        for _, value in pairs:
            if not _local(value, table):
                return None
        if not _local(getattr(post, "update_whereclause", None), table):
            return None
    getters: list[_Getter] = []
    for column in table.primary_key.columns:
        value = by_key.get(column.key, _MISSING)
        if value is _MISSING:
            getters.append((column.key, _MISSING))  # from the parameters
            continue
        getter = _bound(value)
        if getter is None:
            return None
        getters.append(getter)
    return getters


def footprint_of(statement: Any) -> Footprint | None:
    """The :class:`Footprint` of a Core write, or None (a barrier): see the module."""
    if not isinstance(statement, (Insert, Update, Delete)):
        return None
    table = statement.table
    if not isinstance(table, Table):
        return None
    kinds = _row_kinds(table)
    if kinds is None:
        return None
    if statement._returning or getattr(statement, "_return_defaults", False):
        return None
    if getattr(statement, "_extra_froms", None) or getattr(statement, "_hints", None):
        return None
    if isinstance(statement, Insert):
        getters = _insert_getters(statement, table)
        values: Any = getattr(statement, "_values", None) or {}
    else:
        if not _local(statement.whereclause, table):
            return None
        getters = _where_getters(statement.whereclause, table)
        values = getattr(statement, "_values", None) or {}
        ordered = getattr(statement, "_ordered_values", None)
        if ordered:
            values = dict(ordered)
        keys = {c.key for c in table.primary_key.columns}
        if any(getattr(column, "key", column) in keys for column in values):
            return None  # it moves the row to another key: two rows
    if getters is None:
        return None
    if not all(_local(v, table) for v in values.values()):
        return None
    return Footprint(table, getters, kinds)


def regroup(
    statements: list[Any],
    parameters: list[Mapping[str, Any] | None],
    footprint: Callable[[Any], Footprint | None],
) -> tuple[list[Any], list[Mapping[str, Any] | None]]:
    """The writes in an order with as few runs as it allows: each write joins the last group
    of its kind (the same statement object, the same parameter names in the same order)
    unless a write it must follow (one to the same row, or a barrier) was placed after that
    group began, then it opens a new group at the end. Writes to one row keep their order,
    and a barrier keeps every write on its side. (Which group a write joins changes only how
    many runs there are: two kinds that are one for the database are two runs, never a
    reordering the rows do not allow.)

    It costs each write ~0.65 us on these machines (2026-12-07, alternating inserts and
    updates of the example's ``users``; 1.6 us before the row getters were looked up once
    per flush and a one-column key was read without a loop)."""
    placed: list[list[int]] = []
    last_of_kind: dict[Any, int] = {}
    last_of_row: dict[Any, int] = {}
    barrier = -1
    # Each statement object's row getter (None: a barrier), looked up once per flush: the
    # statements are alive until it returns, so their ids stand for them.
    getters: dict[int, Callable[[Mapping[str, Any] | None], Any] | None] = {}
    for i, (statement, given) in enumerate(zip(statements, parameters, strict=True)):
        key = id(statement)
        try:
            row_of = getters[key]
        except KeyError:
            mark = footprint(statement)
            row_of = getters[key] = None if mark is None else mark.row
        row = None
        if row_of is not None:
            try:
                row = row_of(given)  # (its values are str or int: hashable)
            except (KeyError, TypeError):
                row = None
        if row is None:
            placed.append([i])
            barrier = len(placed) - 1
            last_of_kind.clear()
            continue
        kind = (key, tuple(given) if given else None)
        bound = last_of_row.get(row, -1)
        if bound < barrier:
            bound = barrier
        at = last_of_kind.get(kind, -1)
        if at < 0 or at < bound:
            placed.append([i])
            at = len(placed) - 1
            last_of_kind[kind] = at
        else:
            placed[at].append(i)
        last_of_row[row] = at
    if len(placed) == len(statements):
        return statements, parameters
    order = [i for writes in placed for i in writes]
    return [statements[i] for i in order], [parameters[i] for i in order]
