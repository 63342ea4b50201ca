"""One ask's bad input fails that ask alone: ids are checked at the ask (the same rules on every
backend, a 400 over HTTP), a request with a bad id that reaches a processor fails alone, and on
Ray a command or an outcome that does not pickle fails its own ask only, never hiding a commit.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import uuid
from collections.abc import AsyncIterator
from enum import StrEnum
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from ray_blast_entities import (
    BlastEntity,
    Bump,
    Guarded,
    Peek,
    Refuse,
    Seal,
    Value,
)
from test_journal import refuse_poison

from lagompy import (
    CommandRejected,
    JournalSettings,
    ShardedEntities,
    open_storage,
    start,
    start_in_process,
)
from lagompy.errors import (
    InvalidCommandId,
    InvalidEntityId,
    InvalidId,
    SerializationError,
    UndeliverableOutcome,
    WriteRefused,
)
from lagompy.runtime import EntityRef, shutdown_app
from lagompy.runtime._processing import Request
from lagompy.service import Refs, Service, refs
from lagompy.testkit.server import serve_in_thread

#: Ids every runtime refuses, with (a piece of) the rule the error names.
BAD_IDS: list[tuple[Any, str]] = [
    ("x" * 256, "at most 255 characters, got 256"),
    ("x" * 300, "at most 255 characters, got 300"),
    ("", "must not be empty"),
    ("a\x00b", "NUL character"),
    ("a\ud800b", "lone surrogate"),
    (7, "must be a str, got int 7"),
    (None, "must be a str, got NoneType"),
    (b"7", "must be a str, got bytes"),
]
GOOD_IDS = ["x" * 255, "ünïcødé ✓", "a/b c", "7", "😀"]


class Color(StrEnum):
    RED = "red"


def _never(request: Request) -> asyncio.Future[Any]:
    raise AssertionError(f"nothing may be sent: {request}")


# --------------------------------------------------------------------------- the rules


@pytest.mark.parametrize(("bad", "rule"), BAD_IDS, ids=[repr(b)[:12] for b, _ in BAD_IDS])
async def test_a_bad_id_is_refused_at_the_ref_or_the_ask_naming_the_rule(
    bad: Any, rule: str
) -> None:
    with pytest.raises(InvalidEntityId, match=rf"^an entity id .*{rule}") as refused:
        EntityRef(_never, "blast", bad)
    # A rejection answered with 400 by a service, and a ValueError for plain Python callers.
    error = refused.value
    assert isinstance(error, CommandRejected) and isinstance(error, ValueError)
    assert isinstance(error, InvalidId) and error.http_status == 400

    if bad is None:
        return  # no command id: the ref makes one
    ref: EntityRef[Any] = EntityRef(_never, "blast", "fine")
    with pytest.raises(InvalidCommandId, match=rf"^a command id .*{rule}"):
        await ref.ask(Bump(), command_id=bad)
    with pytest.raises(InvalidCommandId, match=rule):
        ref.tell(Bump(), command_id=bad)


async def test_good_ids_pass_and_a_str_subclass_becomes_a_plain_str() -> None:
    sent: list[Request] = []

    def submit(request: Request) -> asyncio.Future[Any]:
        sent.append(request)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    for good in GOOD_IDS:
        ref: EntityRef[Any] = EntityRef(submit, "blast", good)
        await ref.ask(Bump(), command_id=good)
    assert [(r.entity_id, r.command_id) for r in sent] == [(g, g) for g in GOOD_IDS]
    red: EntityRef[Any] = EntityRef(submit, "blast", Color.RED)
    assert type(red.entity_id) is str and red.entity_id == "red"


# --------------------------------------------------------------------------- one tick, one batch


async def test_one_ask_with_a_bad_id_fails_alone_on_both_backends(
    journal_settings: JournalSettings,
) -> None:
    async with await start_in_process(entities=[BlastEntity], settings=journal_settings) as ents:

        async def ask(entity_id: Any, command_id: Any = None) -> int:
            reply: int = await ents.ref_for(BlastEntity, entity_id).ask(
                Bump(), command_id=command_id
            )
            return reply

        # In one tick: good asks (with and without command ids) beside bad ones.
        outcomes = await asyncio.gather(
            ask("a"),
            ask("b", "b-1"),
            ask("x" * 300),
            ask("c", "bad\x00"),
            ask("d", "bad\ud800"),
            ask("e\x00"),
            ask(7),
            ask("a", "a-1"),
            return_exceptions=True,
        )
        assert outcomes[:2] == [1, 1] and outcomes[7] == 2
        assert [type(o) for o in outcomes[2:7]] == [
            InvalidEntityId,
            InvalidCommandId,
            InvalidCommandId,
            InvalidEntityId,
            InvalidEntityId,
        ]
        journal = ents.storage.journal
        for entity_id in ("c", "d", "x" * 255):
            assert await journal.highest_seq_nr("blast", entity_id) == 0
        assert sorted(e.entity_id for e in await journal.all_events()) == ["a", "a", "b"]


async def test_a_request_with_a_bad_id_that_reaches_a_processor_fails_alone(
    journal_settings: JournalSettings,
) -> None:
    # Requests made without a ref (the host's own callers, a test) are checked too: before,
    # a NUL command id failed the reply lookup of every request with a command id, and a long
    # entity id the write of every entity of the batch on PostgreSQL.
    async with await start_in_process(entities=[BlastEntity], settings=journal_settings) as ents:
        processor = ents.processor
        for n, bad in enumerate(
            [
                Request("blast", "x" * 300, Bump(), "c1"),
                Request("blast", "c", Bump(), "bad\x00", True),
                Request("blast", "c", Bump(), "bad\ud800", True),
                Request("blast", "c\ud800", Bump(), "z", True),
                Request("blast", "c\x00", Bump(), "z", True),
            ],
            1,
        ):
            results = await processor.process(
                [
                    Request("blast", "a", Bump(), f"a-{n}", True),
                    bad,
                    Request("blast", "b", Bump(), f"b-{n}"),
                    bad,  # the same bad request twice: both answered
                ]
            )
            assert [r.reply for r in results[::2]] == [n, n]
            for r in results[1::2]:
                assert isinstance(r.error, (InvalidEntityId, InvalidCommandId)), r
        assert await ents.storage.journal.highest_seq_nr("blast", "c") == 0


async def test_an_ask_whose_write_the_database_refuses_fails_alone(
    journal_settings: JournalSettings,
) -> None:
    # The database refuses the rows of entities named "poison..." (a trigger, a CHECK): the
    # asks to the other entities of the same group commit get their replies.
    async with await start_in_process(entities=[BlastEntity], settings=journal_settings) as ents:
        await refuse_poison(ents.storage)

        def ask(entity_id: str, command_id: str | None = None) -> Any:
            return ents.ref_for(BlastEntity, entity_id).ask(Bump(), command_id=command_id)

        outcomes = await asyncio.gather(
            ask("a"), ask("poison-1", "p-1"), ask("b", "b-1"), ask("a"), return_exceptions=True
        )
        assert (outcomes[0], outcomes[2], outcomes[3]) == (1, 1, 2), outcomes
        refused = outcomes[1]
        assert isinstance(refused, WriteRefused), refused
        assert "write for blast/poison-1 refused by the database" in str(refused)
        journal = ents.storage.journal
        assert await journal.highest_seq_nr("blast", "poison-1") == 0
        assert await journal.stored_replies([("blast", "poison-1", "p-1")]) == {}
        assert await ask("a") == 3


# --------------------------------------------------------------------------- HTTP

Blasts = Annotated[Refs[Any], Depends(refs(BlastEntity))]


def _app(journal_settings: JournalSettings) -> FastAPI:
    service = Service(
        name=f"blast-{uuid.uuid4().hex[:6]}",
        entities=[BlastEntity],
        journal_settings=journal_settings,
        ray=False,
    )
    app = FastAPI(lifespan=service.lifespan)
    service.install(app)

    @app.post("/tallies/{tally_id}")
    async def bump(tally_id: str, tallies: Blasts) -> dict[str, int]:
        return {"value": await tallies(tally_id).ask(Bump())}

    return app


async def test_over_http_a_bad_id_is_a_400_and_the_requests_beside_it_succeed(
    journal_settings: JournalSettings,
) -> None:
    with serve_in_thread(_app(journal_settings)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            paths = [f"/tallies/t{i}" for i in range(20)]
            paths[7] = "/tallies/" + "x" * 300
            paths[13] = "/tallies/nul%00here"
            responses = await asyncio.gather(*(http.post(p) for p in paths))
    for n, response in enumerate(responses):
        if n in (7, 13):
            assert response.status_code == 400, response.text
            assert response.headers["content-type"].startswith("application/problem+json")
            problem = response.json()
            assert problem["type"] == "urn:lagompy:problem:invalid-entity-id"
            assert problem["detail"].startswith("an entity id m")
        else:
            assert response.status_code == 200, response.text
            assert response.json() == {"value": 1}


# --------------------------------------------------------------------------- Ray: pickling


@pytest.fixture
async def app(ray_session: Any) -> AsyncIterator[str]:
    name = f"blast-{uuid.uuid4().hex[:8]}"
    yield name
    await shutdown_app(name)


@pytest.fixture
async def on_ray(app: str, journal_settings: JournalSettings) -> AsyncIterator[ShardedEntities]:
    """The blast entity on one shard host (so asks made in one tick travel in one batch)."""
    entities = await start(
        app=app, entities=[BlastEntity], journal_settings=journal_settings, hosts=1, shards=16
    )
    try:
        assert await entities.ref_for(BlastEntity, "w").ask(Bump(), timeout=60) == 1  # warm up
        yield entities
    finally:
        await entities.close()


async def _entity_ids(journal_settings: JournalSettings) -> list[str]:
    storage = await open_storage(settings=journal_settings, entities=[BlastEntity])
    try:
        return sorted(e.entity_id for e in await storage.journal.all_events())
    finally:
        await storage.close()


async def test_on_ray_a_command_that_does_not_pickle_fails_alone(
    on_ray: ShardedEntities, journal_settings: JournalSettings
) -> None:
    # Before: the batch's pickling failed, then Ray's, and every ask of the batch got a
    # TypeError naming the others' requests.
    ref = functools.partial(on_ray.ref_for, BlastEntity)
    outcomes = await asyncio.gather(  # in one tick: one batch to the one host
        ref("a").ask(Bump()),
        ref("g").ask(Guarded(threading.Lock())),
        ref("b").ask(Bump(), command_id="b-1"),
        ref("a").ask(Bump()),
        return_exceptions=True,
    )
    assert (outcomes[0], outcomes[2], outcomes[3]) == (1, 1, 2), outcomes
    guarded = outcomes[1]
    assert type(guarded) is SerializationError, guarded
    assert "command Guarded for blast/g" in str(guarded) and "it was not run" in str(guarded)
    assert await ref("g").ask(Value()) == 0
    assert await _entity_ids(journal_settings) == ["a", "a", "b", "w"]


async def test_on_ray_an_outcome_that_does_not_pickle_fails_alone_and_never_hides_a_commit(
    on_ray: ShardedEntities, journal_settings: JournalSettings
) -> None:
    # Before: the whole batch became a RayTaskError(TypeError), the asks whose events were
    # committed included, with no command id to retry.
    ref = functools.partial(on_ray.ref_for, BlastEntity)
    outcomes = await asyncio.gather(  # in one tick: one batch to the one host
        ref("a").ask(Bump()),
        ref("p").ask(Peek(), command_id="peek-1"),  # its reply does not pickle
        ref("b").ask(Bump(), command_id="b-1"),
        ref("r").ask(Refuse(), command_id="refuse-1"),  # nor its rejection
        ref("s").ask(Seal(), command_id="seal-1"),  # committed; its reply does not pickle
        ref("a").ask(Bump()),
        return_exceptions=True,
    )
    assert (outcomes[0], outcomes[2], outcomes[5]) == (1, 1, 2), outcomes
    peek, refuse, seal = outcomes[1], outcomes[3], outcomes[4]
    for error, command_id in ((peek, "peek-1"), (refuse, "refuse-1"), (seal, "seal-1")):
        assert isinstance(error, UndeliverableOutcome), error
        assert error.command_id == command_id
    assert isinstance(peek, UndeliverableOutcome) and not peek.committed
    assert "reply to command Peek" in str(peek) and "persisted nothing" in str(peek)
    assert isinstance(refuse, UndeliverableOutcome) and not refuse.committed
    assert "the Locked that answered command Refuse" in str(refuse)
    assert "refuses, holding a lock" in str(refuse)
    # A committed command's caller is told that it WAS applied, with its command id.
    assert isinstance(seal, UndeliverableOutcome) and seal.committed
    assert "WAS applied" in str(seal)
    assert await ref("s").ask(Value()) == 1
    # Asked again with its command id: answered from the stored reply (still undeliverable),
    # still said to be committed, and not applied twice.
    with pytest.raises(UndeliverableOutcome) as again:
        await ref("s").ask(Seal(), command_id="seal-1")
    assert again.value.committed and again.value.command_id == "seal-1"
    assert await ref("s").ask(Value()) == 1
    assert await _entity_ids(journal_settings) == ["a", "a", "b", "s", "w"]
