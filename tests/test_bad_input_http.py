"""Bad input that only the journal's rules catch still gets a 4xx problem document, never a
500, and nothing is written; an outcome that cannot travel back says whether it was applied."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI
from pydantic import BaseModel

from lagompy import Command, Effect, PersistentEntity
from lagompy.errors import InvalidSettings, RefusedValue, UndeliverableOutcome, WriteRefused
from lagompy.journal import open_storage
from lagompy.service import Refs, Service, ServiceSettings, problem_for, refs
from lagompy.settings import JournalSettings
from lagompy.testkit.server import serve_in_thread


@dataclass(frozen=True)
class Notes:
    texts: tuple[str, ...] = ()
    total: int = 0


@dataclass(frozen=True)
class AddNote(Command[Notes]):
    text: str


@dataclass(frozen=True)
class AddToTotal(Command[Notes]):
    amount: int


@dataclass(frozen=True)
class NoteAdded:
    text: str


@dataclass(frozen=True)
class TotalAdded:
    amount: int


class NotesEntity(PersistentEntity[AddNote | AddToTotal, NoteAdded | TotalAdded, Notes]):
    """Takes any text and any integer: only the journal's own rules (no NUL, 64 bits) can
    refuse them."""

    type_name = "notes"
    initial_state = Notes()

    def on_command(self, state: Notes, command: AddNote | AddToTotal) -> Effect[Notes]:
        match command:
            case AddNote(text=text):
                return Effect.persist(NoteAdded(text)).then_reply(lambda s: s)
            case AddToTotal(amount=amount):
                return Effect.persist(TotalAdded(amount)).then_reply(lambda s: s)
        return Effect.unhandled()

    def on_event(self, state: Notes, event: NoteAdded | TotalAdded) -> Notes:
        match event:
            case NoteAdded(text=text):
                return replace(state, texts=(*state.texts, text))
            case TotalAdded(amount=amount):
                return replace(state, total=state.total + amount)
        return state


class Note(BaseModel):
    text: str


NotesRefs = Annotated[Refs[AddNote | AddToTotal], Depends(refs(NotesEntity))]


def notes_app(journal_settings: JournalSettings) -> FastAPI:
    service = Service(entities=[NotesEntity], journal_settings=journal_settings, ray=False)
    app = FastAPI(lifespan=service.lifespan)
    service.install(app)

    @app.post("/notes/{notes_id}")
    async def add(notes_id: str, note: Note, notes: NotesRefs) -> list[str]:
        return list((await notes(notes_id).ask(AddNote(note.text))).texts)

    @app.post("/notes/{notes_id}/total")
    async def add_to_total(notes_id: str, amount: int, notes: NotesRefs) -> int:
        return (await notes(notes_id).ask(AddToTotal(amount))).total

    return app


async def test_a_nul_character_in_a_request_is_a_422_naming_the_field(
    journal_settings: JournalSettings,
) -> None:
    with serve_in_thread(notes_app(journal_settings)) as url, httpx.Client(base_url=url) as http:
        refused = http.post("/notes/n1", json={"text": "Ada\u0000Lovelace"})
        assert refused.status_code == 422, refused.text
        problem = refused.json()
        assert refused.headers["content-type"] == "application/problem+json"
        assert problem["type"] == "urn:lagompy:problem:refused-value"
        assert ".text" in problem["detail"] and "NUL character" in problem["detail"]
        # The same request without the NUL goes through: nothing of the first was kept.
        fine = http.post("/notes/n1", json={"text": "Ada Lovelace"})
        assert fine.status_code == 200 and fine.json() == ["Ada Lovelace"], fine.text
    async with await open_storage(settings=journal_settings, entities=[NotesEntity]) as storage:
        events = await storage.journal.events("notes", "n1")
    assert [e.event for e in events] == [NoteAdded("Ada Lovelace")]


async def test_an_integer_beyond_64_bits_is_a_422_naming_the_field(
    journal_settings: JournalSettings,
) -> None:
    """An int query parameter lets any integer through (as the README's deposit does): one the
    journal cannot store is bad input, refused with a 422 that names the field, and nothing
    of it is stored; a total that would outgrow 64 bits is refused the same way."""
    with serve_in_thread(notes_app(journal_settings)) as url, httpx.Client(base_url=url) as http:
        for amount in (2**64, -(2**63) - 1, 10**30):
            refused = http.post("/notes/t1/total", params={"amount": amount})
            assert refused.status_code == 422, refused.text
            assert refused.headers["content-type"] == "application/problem+json"
            problem = refused.json()
            assert problem["type"] == "urn:lagompy:problem:refused-value"
            assert "not applied" in problem["detail"], problem
            assert "outside the range the journal stores" in problem["detail"], problem
        top = 2**64 - 1
        assert http.post("/notes/t1/total", params={"amount": top}).json() == top
        over = http.post("/notes/t1/total", params={"amount": 1})  # the total would be 2**64
        assert over.status_code == 422 and "Notes.total" in over.json()["detail"], over.text
    async with await open_storage(settings=journal_settings, entities=[NotesEntity]) as storage:
        events = await storage.journal.events("notes", "t1")
    assert [e.event for e in events] == [TotalAdded(top)]


def test_a_refused_write_is_a_422_naming_the_entity_only() -> None:
    error = WriteRefused(
        'write for account/a1 refused: new row violates check constraint "positive"',
        entity_type="account",
        entity_id="a1",
    )
    status, body, _ = problem_for(error)
    assert status == 422
    assert body["detail"] == (
        "the journal refused the data of this command for account/a1; nothing of it was stored"
    )


def test_an_undeliverable_outcome_says_whether_the_command_was_applied() -> None:
    for committed, said in ((True, "was applied"), (False, "nothing was applied")):
        error = UndeliverableOutcome("reply holds a lock", command_id="c-1", committed=committed)
        status, body, _ = problem_for(error)
        assert status == 500
        assert body["command_id"] == "c-1" and body["committed"] is committed
        assert said in body["detail"] and "lock" not in body["detail"]


def test_refused_value_is_an_encode_error() -> None:
    from lagompy.errors import EncodeError

    assert issubclass(RefusedValue, EncodeError)


def limited_notes_app(journal_settings: JournalSettings, limit: int | None) -> FastAPI:
    settings = ServiceSettings() if limit is None else ServiceSettings(max_body_size=limit)
    service = Service(
        entities=[NotesEntity], journal_settings=journal_settings, settings=settings, ray=False
    )
    app = FastAPI(lifespan=service.lifespan)
    service.install(app)

    @app.post("/notes/{notes_id}")
    async def add(notes_id: str, note: Note, notes: NotesRefs) -> list[str]:
        return list((await notes(notes_id).ask(AddNote(note.text))).texts)

    return app


def _assert_too_large(response: httpx.Response, limit: int) -> None:
    assert response.status_code == 413, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 413
    assert problem["detail"] == f"the request body is larger than the limit of {limit:,} bytes"
    assert problem["request_id"] == response.headers["x-request-id"]


async def test_a_body_above_the_limit_is_a_413_and_nothing_is_applied(
    journal_settings: JournalSettings,
) -> None:
    """A body over ``max_body_size`` is refused with a 413 problem document whether its size
    is declared (Content-Length, refused before it is read) or not (chunked, refused as it
    streams past the limit), with or without an Idempotency-Key (whose fingerprint reads the
    body); a body within the limit goes through, and only it is stored."""
    limit = 200
    big = {"text": "x" * 300}

    def chunks() -> Iterator[bytes]:
        body = json.dumps(big).encode()
        for start in range(0, len(body), 50):
            yield body[start : start + 50]

    app = limited_notes_app(journal_settings, limit)
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        _assert_too_large(http.post("/notes/b1", json=big), limit)
        chunked = http.post(
            "/notes/b1", content=chunks(), headers={"content-type": "application/json"}
        )
        assert "content-length" not in chunked.request.headers
        _assert_too_large(chunked, limit)
        keyed = http.post(
            "/notes/b1",
            content=chunks(),
            headers={"content-type": "application/json", "Idempotency-Key": "big-1"},
        )
        _assert_too_large(keyed, limit)
        fine = http.post("/notes/b1", json={"text": "small"}, headers={"Idempotency-Key": "big-1"})
        assert fine.status_code == 200 and fine.json() == ["small"], fine.text
    async with await open_storage(settings=journal_settings, entities=[NotesEntity]) as storage:
        events = await storage.journal.events("notes", "b1")
    assert [e.event for e in events] == [NoteAdded("small")]


def test_the_default_body_limit_is_one_mebibyte(journal_settings: JournalSettings) -> None:
    limit = 1_048_576
    assert ServiceSettings().max_body_size == limit
    app = limited_notes_app(journal_settings, None)
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        _assert_too_large(http.post("/notes/d1", json={"text": "x" * limit}), limit)
        text = "y" * (limit - 100)
        assert http.post("/notes/d1", json={"text": text}).json() == [text]


def test_the_body_limit_must_be_positive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAGOMPY_HTTP_MAX_BODY_SIZE", "0")
    with pytest.raises(InvalidSettings, match=r"max_body_size \(LAGOMPY_HTTP_MAX_BODY_SIZE\)"):
        ServiceSettings()


def test_a_client_that_sends_its_whole_body_first_still_reads_the_413(
    journal_settings: JournalSettings,
) -> None:
    """A client that writes a large body before it reads (no ``Expect: 100-continue``, as
    urllib and most scripts do) gets the 413, not a reset connection: the refused body is read
    and dropped (never kept) before the answer, up to a bound."""
    limit = 1_000
    body = json.dumps({"text": "z" * (8 * 1024 * 1024)}).encode()
    app = limited_notes_app(journal_settings, limit)
    with serve_in_thread(app) as url:
        for chunked in (False, True):
            request = urllib.request.Request(
                f"{url}/notes/u1",
                data=iter([body]) if chunked else body,
                method="POST",
                headers={"content-type": "application/json"}
                | ({"transfer-encoding": "chunked"} if chunked else {}),
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            assert refused.value.code == 413, chunked
            problem = json.loads(refused.value.read())
            assert problem["detail"] == (
                f"the request body is larger than the limit of {limit:,} bytes"
            )


def test_a_client_that_waits_for_100_continue_is_answered_before_it_sends(
    journal_settings: JournalSettings,
) -> None:
    """``Expect: 100-continue`` with a declared length above the limit: the 413 comes at once,
    with no ``100 Continue`` before it, so the client never sends the body."""
    app = limited_notes_app(journal_settings, 1_000)
    with serve_in_thread(app) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /notes/e1 HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                b"Content-Length: 50000000\r\nExpect: 100-continue\r\n\r\n"
            )
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(65536)
                assert chunk, answer
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
