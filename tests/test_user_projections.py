"""The example's ``users`` projection two ways: written the simple way (``handle``, one
statement per event: examples/user_service/projection.py, the tutorial's) and set-based
(``handle_batch``, an executemany of the registrations then one of the changes, driver SQL
on PostgreSQL: examples/user_service/fast_projection.py, the how-to's). From the same events
both give the rows the events say, on both backends, and replaying the events changes
nothing."""

from __future__ import annotations

import random
from typing import Any

from sqlalchemy import select

from examples.user_service.entity import (
    EmailChanged,
    NameChanged,
    UserDeactivated,
    UserEntity,
    UserRegistered,
)
from examples.user_service.fast_projection import FastUsersProjection
from examples.user_service.projection import UsersProjection, users
from lagompy import AtomicWrite, EventEnvelope, JournalSettings, open_storage
from lagompy.journal import read_pages
from lagompy.readside import open_projections

USERS = 40


def history(seed: int = 7) -> tuple[list[list[AtomicWrite]], dict[str, dict[str, Any]]]:
    """Transactions of writes (registrations, then changes in random order, several events of
    one user in one write at times) and the rows they must leave."""
    rng = random.Random(seed)
    tag = UserEntity.tag
    expected: dict[str, dict[str, Any]] = {}
    seq: dict[str, int] = {}
    pending: list[tuple[str, list[Any]]] = []
    for i in range(USERS):
        uid = f"u{i}"
        pending.append((uid, [UserRegistered(uid, f"User {i}", f"u{i}@x.org")]))
    for n in range(3 * USERS):
        uid = f"u{rng.randrange(USERS)}"
        roll = rng.random()
        if roll < 0.4:
            events: list[Any] = [NameChanged(uid, f"Name {n}")]
        elif roll < 0.7:
            events = [EmailChanged(uid, f"e{n}@x.org")]
        elif roll < 0.9:
            events = [NameChanged(uid, f"Both {n}"), EmailChanged(uid, f"b{n}@x.org")]
        else:
            events = [UserDeactivated(uid)]
        pending.append((uid, events))
    # Registrations first; the changes shuffled among themselves (a user's own stay in order).
    changes = pending[USERS:]
    rng.shuffle(changes)
    transactions: list[list[AtomicWrite]] = []
    ordered = pending[:USERS] + changes
    while ordered:
        size = rng.randint(1, 9)
        chunk, ordered = ordered[:size], ordered[size:]
        writes: dict[str, AtomicWrite] = {}
        for uid, events in chunk:
            if uid in writes:  # one write per entity and transaction: the next transaction
                ordered.insert(0, (uid, events))
                continue
            writes[uid] = AtomicWrite(
                "user", uid, seq.get(uid, 0), events, [(tag.for_entity(uid),)] * len(events)
            )
            seq[uid] = seq.get(uid, 0) + len(events)
            for event in events:
                row = expected.setdefault(uid, {"user_id": uid, "active": True})
                match event:
                    case UserRegistered(name=name, email=email):
                        row.update(name=name, email=email)
                    case NameChanged(name=name):
                        row["name"] = name
                    case EmailChanged(email=email):
                        row["email"] = email
                    case UserDeactivated():
                        row["active"] = False
        transactions.append(list(writes.values()))
    return transactions, expected


async def projected(conn: Any) -> dict[str, dict[str, Any]]:
    query = select(
        users.c.user_id, users.c.name, users.c.email, users.c.active, users.c.updated_offset
    )
    rows = (await conn.execute(query)).mappings().all()
    return {r["user_id"]: {**r, "active": bool(r["active"])} for r in rows}


async def test_the_simple_and_the_set_based_projection_write_the_same_rows(
    journal_settings: JournalSettings,
) -> None:
    transactions, expected = history()
    async with await open_storage(settings=journal_settings, entities=[UserEntity]) as storage:
        for writes in transactions:
            for result in await storage.journal.append(writes):
                result.unwrap()
        envelopes: list[EventEnvelope[Any]] = []
        for t in UserEntity.tag.all_tags:
            async for page in read_pages(storage.journal, tag=t):
                envelopes.extend(page)
        assert len(envelopes) > 2 * USERS
        for e in envelopes:  # a row's updated_offset is its user's last event's offset
            row = expected[e.entity_id]
            row["updated_offset"] = max(row.get("updated_offset", 0), e.offset)
        # Small transactions: runs of one type end and start at every boundary.
        async with await open_projections(
            journal_settings=journal_settings, max_batch=7
        ) as projections:
            for processor in (UsersProjection, FastUsersProjection):
                replayed = await projections.rebuild(processor, journal=storage.journal)
                assert replayed == len(envelopes)
                async with projections.projection.read() as conn:
                    assert await projected(conn) == expected, processor.__name__
                # A replay of every event (an operator's set-offset) leaves the same rows.
                async with projections.projection.write() as conn:
                    await processor().handle_batch(conn, envelopes)
                async with projections.projection.read() as conn:
                    assert await projected(conn) == expected, processor.__name__
