"""``Idempotency-Key``: a key is bound to the request it first came with.

A keyed request's asks carry command ids derived from the key, so a retry of the request maps
onto the same command ids and the journal answers them with the stored replies. That is only
right for a *retry*: a key reused with another request (another route, another amount) must be
refused, never answered with the first request's replies. So the service records, per key, the
request it first came with, in ``lagompy_idempotency_keys`` (the journal's database):

* **fingerprint** -- SHA-256 of the method, the route's path template, the path and query
  parameters and the body (a JSON body canonicalised: sorted keys, no whitespace, so that a
  re-serialised identical body matches);
* **created_us** -- when the key was bound; it also makes the derived command ids unique to
  this binding, so that a key used again after it expired never meets its old replies;
* **in_flight_until_us** -- until when the first request counts as in flight (0 once it
  answered; the bound keeps a request that died from holding the key forever).

:class:`KeyStore` binds keys with ``INSERT ... ON CONFLICT``, in rounds: the requests that
come while one statement runs are bound together by the next (one round trip for all of them
on PostgreSQL). A later request with the key either repeats the request (same fingerprint: it
goes ahead, with the same command ids) or is refused with :class:`IdempotencyKeyReused` (422,
or 409 while the first request is in flight). :class:`KeyRelease` (an ASGI middleware that
``service.install`` adds) marks the first request answered before its response starts; a
request that made no ask (its body failed validation, say) unbinds the key instead, so the
corrected request may use it.

Derived command ids are ``"<key> <binding> <Command>"``, then ``"<key> <binding> <Command> 2"``
for the second ask of the same command type to the same entity in the request, and so on:

* the space separates them from every client key (keys are printable ASCII without spaces),
  so no key can reach another key's derived ids;
* they count per (entity, command type), not per request, so a route whose number of asks
  varies between retries (an ask made only when some state says so) keeps the ids of the
  others;
* a suffix that would make the id longer than ``MAX_COMMAND_ID_LENGTH`` is hashed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.requests import Request

from lagompy.errors import ConfigurationError, IdempotencyKeyReused, JournalError
from lagompy.journal._journal import MAX_COMMAND_ID_LENGTH
from lagompy.settings import JournalSettings
from lagompy.sql._database import (
    Database,
    driver_transaction,
    translate_errors,
)

__all__ = [
    "HELD_SCOPE_KEY",
    "KEY_HEADER",
    "MAX_KEY_LENGTH",
    "Binding",
    "Fingerprint",
    "Held",
    "KeyStore",
    "RequestKey",
    "fingerprint_of",
    "key_problem",
]

log = logging.getLogger("lagompy.idempotency")

KEY_HEADER = "Idempotency-Key"

#: The longest key accepted: a derived command id (key, binding, command type) must fit in
#: ``MAX_COMMAND_ID_LENGTH`` (255) characters.
MAX_KEY_LENGTH = 200

#: Separates the parts of a derived command id: outside the characters a key may hold.
_SEP = " "
#: A hashed suffix ("#" then 32 hex digits) fits after the longest key and binding.
_HASH_BYTES = 16


def key_problem(key: str) -> str | None:
    """Why ``key`` is not a usable ``Idempotency-Key`` (None when it is)."""
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        return f"must have 1 to {MAX_KEY_LENGTH} characters, got {len(key)}"
    if not (key.isascii() and key.isprintable()) or _SEP in key:
        return "must be printable ASCII without spaces (characters \\x21 to \\x7e)"
    return None


# --------------------------------------------------------------------------- fingerprints


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What a key is bound to: the request's method and route template, and a digest of the
    whole request (method, route, path and query parameters, body)."""

    method: str
    route: str
    digest: str


_JSON_TYPE = re.compile(r"^application/([\w.+-]+\+)?json\b", re.IGNORECASE)


async def fingerprint_of(request: Request) -> Fingerprint:
    """The request's fingerprint; a JSON body is canonicalised (sorted keys, no whitespace)."""
    route = getattr(request.scope.get("route"), "path", None) or request.url.path
    method = request.method
    digest = hashlib.sha256()
    for part in (
        method,
        route,
        json.dumps(sorted((k, str(v)) for k, v in request.path_params.items())),
        json.dumps(sorted(request.query_params.multi_items())),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(await _canonical_body(request))
    return Fingerprint(method, route, digest.hexdigest())


async def _canonical_body(request: Request) -> bytes:
    try:
        body = await request.body()
    except RuntimeError:  # read as a form already (the stream is consumed): use the form
        form = await request.form()
        items = [
            (k, v if isinstance(v, str) else f"{v.filename}:{v.content_type}:{v.size}")
            for k, v in form.multi_items()
        ]
        return b"form:" + json.dumps(sorted(items)).encode()
    if body and _JSON_TYPE.match(request.headers.get("content-type", "")):
        try:
            value = json.loads(body)
        except ValueError:
            return body
        return (
            b"json:"
            + json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        )
    return body


# --------------------------------------------------------------------------- derived ids


class RequestKey:
    """One request's ``Idempotency-Key``, bound to that request: derives its asks' command ids.

    ``binding`` is when the key was bound (None: the service has no key store, and the key
    cannot be used for asks)."""

    __slots__ = ("_asks", "_prefix", "asked", "binding", "key")

    def __init__(self, key: str, binding: int | None) -> None:
        self.key = key
        self.binding = binding
        self._prefix = f"{key}{_SEP}{binding:x}{_SEP}" if binding is not None else ""
        self._asks: dict[tuple[str, str, str], int] = {}
        #: Whether a command id was derived (then the binding stays when the request ends).
        self.asked = False

    def __repr__(self) -> str:
        return f"RequestKey({self.key!r}, binding={self.binding})"

    def command_id(self, entity_type: str, entity_id: str, command: object) -> str:
        """The command id of the request's next ask of ``command``'s type to this entity."""
        if self.binding is None:
            raise ConfigurationError(
                "this service cannot bind Idempotency-Keys: it binds them in the journal's "
                "database, and it was given a runtime but not where its journal is "
                "(Service(journal_url=...) or journal_settings=...)"
            )
        name = type(command).__name__
        counted = (entity_type, entity_id, name)
        n = self._asks[counted] = self._asks.get(counted, 0) + 1
        self.asked = True
        command_id = self._prefix + name if n == 1 else f"{self._prefix}{name}{_SEP}{n}"
        if len(command_id) > MAX_COMMAND_ID_LENGTH:
            suffix = f"{name}{_SEP}{n}".encode()
            hashed = hashlib.blake2b(suffix, digest_size=_HASH_BYTES).hexdigest()
            command_id = f"{self._prefix}#{hashed}"
        return command_id


# --------------------------------------------------------------------------- the store


@dataclass(frozen=True, slots=True)
class Binding:
    """A key's binding as a request found it: when it was made (``created_us``), and whether
    this request made it (``fresh``) or repeats the request that did."""

    created_us: int
    fresh: bool


_TABLE = "lagompy_idempotency_keys"

#: Most expired bindings one sweep statement deletes (a sweep that deleted this many goes on).
SWEEP_CHUNK = 1000


def _now_us() -> int:
    return time.time_ns() // 1000


@dataclass(slots=True)
class _Claim:
    key: str
    fingerprint: Fingerprint
    future: asyncio.Future[Binding]
    attempts: int = 0


@dataclass(slots=True)
class _Release:
    key: str
    created_us: int
    asked: bool
    future: asyncio.Future[None] | None


#: A key's live binding as the database holds it: method, route, fingerprint, created_us,
#: in_flight_until_us.
Found = tuple[str, str, str, int, int]


@dataclass(frozen=True, slots=True)
class _Round:
    """One round of the key store: bindings whose first request answered (key, created_us),
    bindings to drop because their request made no ask, and keys to bind (key, method, route,
    fingerprint), at ``now``."""

    answered: list[tuple[str, int]]
    unbound: list[tuple[str, int]]
    claims: list[tuple[str, str, str, str]]
    now: int
    in_flight_until: int
    expired_before: int


class _Keys(Protocol):
    """The key store's statements, for one database flavour. Each call is one transaction,
    committed without waiting for the disk (see :class:`KeyStore`)."""

    async def exchange(self, scope: str, round_: _Round) -> dict[str, int]:
        """Mark the answered bindings, drop the unbound ones (unless a repeat of their request
        came), and bind each claimed key that has no live binding (or take over its expired
        one): ``{key: created_us}`` of the keys bound."""
        ...

    async def join(
        self, scope: str, keys: Sequence[tuple[str, str]], expired_before: int
    ) -> dict[str, Found]:
        """The live bindings of these (key, fingerprint), counting a repeat where the
        fingerprint is the same."""
        ...

    async def sweep(self, scope: str, expired_before: int, limit: int) -> int:
        """Delete up to ``limit`` expired bindings; how many were deleted."""
        ...


class KeyStore:
    """The bindings of one service's keys (``scope``: the service's name) in the journal's
    database, through a small engine of its own.

    Keys are bound for ``lifetime`` seconds; a first request counts as in flight until it
    answers, at most ``in_flight`` seconds. Requests' claims and releases go to the database
    in rounds, one at a time: what came while a round ran goes in the next, as one statement
    on PostgreSQL (``INSERT ... SELECT FROM unnest(...) ON CONFLICT``, with the releases in
    data-modifying CTEs). Only keys found bound already take a second statement. Expired
    bindings are swept between rounds, a chunk at a time, once a sweep is due.

    The store commits without waiting for the disk (``synchronous_commit`` off on
    PostgreSQL, ``synchronous=NORMAL`` on SQLite, on the store's own connections). That is safe
    because a database log is one sequence: a binding commits before any ask of its request
    is sent, so the journal write of those asks, which does wait for the disk, makes the
    binding durable with it. A binding lost in a crash belongs to a request that changed
    nothing; a lost "answered" mark only turns a 422 into a 409 until the in-flight bound."""

    def __init__(
        self, settings: JournalSettings, scope: str, *, lifetime: float, in_flight: float
    ) -> None:
        self.database = Database.create(
            settings, pool_size=1, max_overflow=1, sqlite_synchronous="NORMAL"
        )
        self.scope = scope
        self.lifetime_us = int(lifetime * 1_000_000)
        self.in_flight_us = int(in_flight * 1_000_000)
        postgres = self.database.dialect == "postgresql"
        self._sql: _Keys = _PostgresKeys(self.database) if postgres else _SqliteKeys(self.database)
        self._claims: list[_Claim] = []
        self._releases: list[_Release] = []
        self._worker: asyncio.Task[None] | None = None
        self._sweep_every = max(0.05, min(lifetime / 4, 60.0))
        self._next_sweep = time.monotonic()

    async def claim(self, key: str, fingerprint: Fingerprint) -> Binding:
        """Bind ``key`` to this request, or find the binding of the request it repeats.
        Raises :class:`IdempotencyKeyReused` when the key is bound to another request."""
        future: asyncio.Future[Binding] = asyncio.get_running_loop().create_future()
        self._claims.append(_Claim(key, fingerprint, future))
        self._wake()
        return await future

    async def release(self, key: str, binding: Binding, *, asked: bool) -> None:
        """The request that made ``binding`` ended: it answered (the key stays bound), or it
        made no ask (the key is unbound, unless a repeat of the request came meanwhile)."""
        if binding.fresh:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._releases.append(_Release(key, binding.created_us, asked, future))
            self._wake()
            await future

    async def close(self) -> None:
        """Finish the round under way, then close the connections."""
        if self._worker is not None:
            with contextlib.suppress(Exception):
                await self._worker
        await self.database.dispose()

    # ----------------------------------------------------------------- rounds

    def _wake(self) -> None:
        # A task starts at the loop's next turn: what this turn adds joins its first round.
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        releases: list[_Release] = []
        claims: list[_Claim] = []
        try:
            while self._claims or self._releases or time.monotonic() >= self._next_sweep:
                if self._claims or self._releases:
                    releases, self._releases = self._releases, []
                    claims, self._claims = self._claims, []
                    await self._round(releases, claims)
                    releases, claims = [], []
                if time.monotonic() >= self._next_sweep:
                    await self._sweep_chunk()
        except BaseException:  # cancelled (the loop is closing): no waiter may hang
            stopped = JournalError("the idempotency key store stopped")
            for claim in (*claims, *self._claims):
                _fail(claim.future, stopped)
            for release in (*releases, *self._releases):
                if release.future is not None:
                    _fail(release.future, stopped)
            self._claims, self._releases = [], []
            raise
        finally:
            self._worker = None

    async def _round(self, releases: list[_Release], claims: list[_Claim]) -> None:
        # A key claimed twice, or claimed and released in one round, waits for the next.
        busy = {r.key for r in releases}
        batch: dict[str, _Claim] = {}
        for claim in claims:
            if claim.key in batch or claim.key in busy:
                self._claims.append(claim)
            else:
                batch[claim.key] = claim
        now = _now_us()
        expired_before = now - self.lifetime_us
        round_ = _Round(
            answered=[(r.key, r.created_us) for r in releases if r.asked],
            unbound=[(r.key, r.created_us) for r in releases if not r.asked],
            claims=[
                (k, c.fingerprint.method, c.fingerprint.route, c.fingerprint.digest)
                for k, c in batch.items()
            ],
            now=now,
            in_flight_until=now + self.in_flight_us,
            expired_before=expired_before,
        )
        try:
            fresh = await self._sql.exchange(self.scope, round_)
        except Exception as e:
            for release in releases:
                if release.future is not None:
                    _fail(release.future, e)
            for claim in batch.values():
                _fail(claim.future, e)
            return
        for release in releases:
            if release.future is not None and not release.future.done():
                release.future.set_result(None)
        rest = [(k, c.fingerprint.digest) for k, c in batch.items() if k not in fresh]
        try:
            found = await self._sql.join(self.scope, rest, expired_before) if rest else {}
        except Exception as e:
            for key, _ in rest:
                _fail(batch[key].future, e)
            found = {}
        for key, claim in batch.items():
            if key in fresh:
                if claim.future.done():  # its request is gone: do not leave the key bound
                    self._releases.append(_Release(key, fresh[key], False, None))
                else:
                    claim.future.set_result(Binding(fresh[key], fresh=True))
            elif key in found:
                _answer(claim, found[key], now)
            elif claim.future.done():
                continue
            elif claim.attempts < 2:  # expired or unbound in between: claim it again
                claim.attempts += 1
                self._claims.append(claim)
            else:
                _fail(claim.future, JournalError(f"could not bind Idempotency-Key {key!r}"))

    async def _sweep_chunk(self) -> None:
        try:
            deleted = await self._sql.sweep(self.scope, _now_us() - self.lifetime_us, SWEEP_CHUNK)
        except Exception as e:  # the next one will do
            log.warning("sweeping expired idempotency keys failed: %s", e)
            deleted = 0
        if deleted < SWEEP_CHUNK:  # else the next round deletes the next chunk
            self._next_sweep = time.monotonic() + self._sweep_every


def _answer(claim: _Claim, found: Found, now: int) -> None:
    if claim.future.done():
        return
    method, route, digest, created_us, in_flight_until_us = found
    fingerprint = claim.fingerprint
    if digest == fingerprint.digest:
        claim.future.set_result(Binding(int(created_us), fresh=False))
        return
    claim.future.set_exception(
        IdempotencyKeyReused(
            claim.key,
            first_method=method,
            first_route=route,
            method=fingerprint.method,
            route=fingerprint.route,
            in_flight=int(in_flight_until_us) > now,
        )
    )


def _fail(future: asyncio.Future[Any], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


# --------------------------------------------------------------------------- the two databases

# $1 scope, $2 answered keys, $3 their created_us, $4 unbound keys, $5 their created_us,
# $6 claimed keys, $7 methods, $8 routes, $9 fingerprints, $10 now, $11 in flight until,
# $12 expired before. No key is in two of the lists. "key = ANY(keys)" lets every plan find
# the rows through the primary key, whatever the table's statistics say.
_PG_EXCHANGE = f"""
WITH answered AS (
    UPDATE {_TABLE} AS a SET in_flight_until_us = 0
    FROM unnest($2::varchar[], $3::bigint[]) AS u(k, c)
    WHERE a.scope = $1 AND a.idempotency_key = ANY($2::varchar[])
      AND a.idempotency_key = u.k AND a.created_us = u.c
), unbound AS (
    DELETE FROM {_TABLE} AS d
    USING unnest($4::varchar[], $5::bigint[]) AS u(k, c)
    WHERE d.scope = $1 AND d.idempotency_key = ANY($4::varchar[])
      AND d.idempotency_key = u.k AND d.created_us = u.c AND d.repeats = 0
)
INSERT INTO {_TABLE} AS k (scope, idempotency_key, method, route, fingerprint, created_us,
                           in_flight_until_us, repeats)
SELECT $1, u.k, u.m, u.r, u.f, $10::bigint, $11::bigint, 0
FROM unnest($6::varchar[], $7::varchar[], $8::varchar[], $9::varchar[]) AS u(k, m, r, f)
ON CONFLICT (scope, idempotency_key) DO UPDATE SET
    method = excluded.method, route = excluded.route, fingerprint = excluded.fingerprint,
    created_us = excluded.created_us, in_flight_until_us = excluded.in_flight_until_us,
    repeats = 0
WHERE k.created_us < $12
RETURNING idempotency_key, created_us"""

# $1 scope, $2 keys, $3 fingerprints. (An expired binding found here is claimed again.)
_PG_JOIN = f"""
UPDATE {_TABLE} AS k SET repeats = k.repeats + CASE WHEN k.fingerprint = u.f THEN 1 ELSE 0 END
FROM unnest($2::varchar[], $3::varchar[]) AS u(k, f)
WHERE k.scope = $1 AND k.idempotency_key = ANY($2::varchar[]) AND k.idempotency_key = u.k
RETURNING k.idempotency_key, k.method, k.route, k.fingerprint, k.created_us,
          k.in_flight_until_us"""

# $1 scope, $2 expired before, $3 limit.
_PG_SWEEP = f"""
WITH gone AS (
    DELETE FROM {_TABLE}
    WHERE ctid = ANY(ARRAY(SELECT ctid FROM {_TABLE}
                           WHERE scope = $1 AND created_us < $2 LIMIT $3))
    RETURNING 1
)
SELECT count(*) FROM gone"""


# The store's own connection: asynchronous commits (see KeyStore), and generic plans (planned
# once; their lookups go through the primary key even before the table has statistics, while
# planning each execution took longer than running it, and longer as the table grew).
_PG_SESSION = "SET synchronous_commit TO off; SET plan_cache_mode TO force_generic_plan"


class _PostgresKeys:
    """Each call one statement on the store's kept connection, outside a transaction: a
    transaction of its own, one round trip (asyncpg keeps the statements prepared)."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._configured: Any = None  # the connection _PG_SESSION was run on

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        async with self.database.raw_writer() as pg:
            if pg is not self._configured:
                await pg.execute(_PG_SESSION)
                self._configured = pg
            yield pg

    async def exchange(self, scope: str, round_: _Round) -> dict[str, int]:
        async with self._connection() as pg:
            rows = await pg.fetch(
                _PG_EXCHANGE,
                scope,
                *_columns(round_.answered, 2),
                *_columns(round_.unbound, 2),
                *_columns(round_.claims, 4),
                round_.now,
                round_.in_flight_until,
                round_.expired_before,
            )
        return {row[0]: int(row[1]) for row in rows}

    async def join(
        self, scope: str, keys: Sequence[tuple[str, str]], expired_before: int
    ) -> dict[str, Found]:
        names, fingerprints = _columns(keys, 2)
        async with self._connection() as pg:
            rows = await pg.fetch(_PG_JOIN, scope, names, fingerprints)
        return {
            row[0]: (row[1], row[2], row[3], int(row[4]), int(row[5]))
            for row in rows
            if row[4] >= expired_before
        }

    async def sweep(self, scope: str, expired_before: int, limit: int) -> int:
        async with self._connection() as pg:
            return int(await pg.fetchval(_PG_SWEEP, scope, expired_before, limit))


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [[row[i] for row in rows] for i in range(width)]


_SQLITE_ANSWERED = f"""
UPDATE {_TABLE} SET in_flight_until_us = 0
WHERE scope = ? AND idempotency_key = ? AND created_us = ?"""

_SQLITE_UNBIND = f"""
DELETE FROM {_TABLE}
WHERE scope = ? AND idempotency_key = ? AND created_us = ? AND repeats = 0"""

_SQLITE_CLAIM = f"""
INSERT INTO {_TABLE} AS k (scope, idempotency_key, method, route, fingerprint, created_us,
                           in_flight_until_us, repeats)
VALUES (?, ?, ?, ?, ?, ?, ?, 0)
ON CONFLICT (scope, idempotency_key) DO UPDATE SET
    method = excluded.method, route = excluded.route, fingerprint = excluded.fingerprint,
    created_us = excluded.created_us, in_flight_until_us = excluded.in_flight_until_us,
    repeats = 0
WHERE k.created_us < ?
RETURNING created_us"""

_SQLITE_JOIN = f"""
UPDATE {_TABLE} SET repeats = repeats + CASE WHEN fingerprint = ? THEN 1 ELSE 0 END
WHERE scope = ? AND idempotency_key = ?
RETURNING method, route, fingerprint, created_us, in_flight_until_us"""

_SQLITE_SWEEP = f"""
DELETE FROM {_TABLE} WHERE rowid IN (
    SELECT rowid FROM {_TABLE} WHERE scope = ? AND created_us < ? LIMIT ?)"""


class _SqliteKeys:
    """Each call one transaction (local: a statement per key), every statement a write, in
    ``BEGIN IMMEDIATE`` ... ``COMMIT`` even when it is alone: the database's
    ``begin_immediate`` waits for the file's write lock by trying again every millisecond,
    where a lone statement in autocommit mode would wait in SQLite's busy handler, whose
    sleeps grow to 100 ms and miss the brief moments between another writer's commits (see
    ``sqlite_begin_immediate``)."""

    def __init__(self, database: Database) -> None:
        self.database = database

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        with translate_errors("idempotency key store"):
            async with self.database.engine.connect() as conn:
                fairy = await conn.get_raw_connection()
                async with driver_transaction(fairy, self.database.begin_immediate) as db:
                    yield db

    async def exchange(self, scope: str, round_: _Round) -> dict[str, int]:
        bound: dict[str, int] = {}
        if not (round_.answered or round_.unbound or round_.claims):
            return bound
        async with self._connection() as db:
            for key, created_us in round_.answered:
                await db.execute_fetchall(_SQLITE_ANSWERED, (scope, key, created_us))
            for key, created_us in round_.unbound:
                await db.execute_fetchall(_SQLITE_UNBIND, (scope, key, created_us))
            for key, method, route, fingerprint in round_.claims:
                rows = await db.execute_fetchall(
                    _SQLITE_CLAIM,
                    (scope, key, method, route, fingerprint, round_.now,
                     round_.in_flight_until, round_.expired_before),
                )  # fmt: skip
                if rows:
                    bound[key] = int(rows[0][0])
        return bound

    async def join(
        self, scope: str, keys: Sequence[tuple[str, str]], expired_before: int
    ) -> dict[str, Found]:
        found: dict[str, Found] = {}
        async with self._connection() as db:
            for key, fingerprint in keys:
                rows = await db.execute_fetchall(_SQLITE_JOIN, (fingerprint, scope, key))
                if rows and rows[0][3] >= expired_before:
                    m, r, f, c, i = rows[0]
                    found[key] = (m, r, f, int(c), int(i))
        return found

    async def sweep(self, scope: str, expired_before: int, limit: int) -> int:
        async with self._connection() as db:
            cursor = await db.execute(_SQLITE_SWEEP, (scope, expired_before, limit))
            deleted = int(cursor.rowcount)
            await cursor.close()
        return deleted


# --------------------------------------------------------------------------- per request

#: Where a keyed request's binding waits for its release, in the ASGI scope.
HELD_SCOPE_KEY = "lagompy.idempotency_key"
_HEADER_BYTES = KEY_HEADER.lower().encode()


class Held:
    """A keyed request's binding, released once: when its response starts, or when the
    request ends (see :class:`KeyRelease`). A release that fails is logged (the in-flight
    bound ends it)."""

    __slots__ = ("_binding", "_store", "request_key")

    def __init__(self) -> None:
        self._store: KeyStore | None = None
        self._binding: Binding | None = None
        self.request_key: RequestKey | None = None

    async def bind(self, store: KeyStore, key: str, fingerprint: Fingerprint) -> RequestKey:
        """Bind ``key`` to the request (raises :class:`IdempotencyKeyReused`)."""
        binding = await store.claim(key, fingerprint)
        self._store, self._binding = store, binding
        self.request_key = RequestKey(key, binding.created_us)
        return self.request_key

    async def response_started(self, status: int) -> None:
        """Release now if the request asked (the key stays bound, its request answered) or
        failed (an error response made no ask: the key is unbound). A success that asked
        nothing yet may still ask while its body streams: it is released when it ends."""
        request_key = self.request_key
        if request_key is not None and (request_key.asked or status >= 400):
            await self.release()

    async def release(self) -> None:
        store, binding, request_key = self._store, self._binding, self.request_key
        if store is None or binding is None or request_key is None:
            return
        self._store = None
        try:
            await store.release(request_key.key, binding, asked=request_key.asked)
        except Exception as e:
            log.warning("releasing Idempotency-Key %r failed: %s", request_key.key, e)
