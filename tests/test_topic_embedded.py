"""The embedded transport makes a partition's messages straight from the journal's rows
(``Journal.read_tag_made`` with ``Topic.message_maker``): the same messages as through
envelopes, filtered events passed, an undecodable event ending the page, a wrong message type
named."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_asyncio

from lagompy import AtomicWrite, JournalSettings, open_storage
from lagompy.errors import EventDecodeError
from lagompy.journal import Journal, Storage, serializer_for
from lagompy.testkit.topics import ContractAccount, Deposit, Deposited, Noted, contract_topic
from lagompy.topic import Message, Topic
from lagompy.topic._embedded import JournalFeed, read_partition


@dataclass(frozen=True)
class Withdrawn:
    """An event type the reading service does not know (written by another one)."""

    account: str
    amount: int


ACCOUNT = "ada"
PARTITION = contract_topic.partition_of(ACCOUNT)
TAG = contract_topic.partition_tag(PARTITION)


@pytest_asyncio.fixture
async def storage(tmp_path: Path) -> AsyncIterator[Storage]:
    settings = JournalSettings(url=f"sqlite:///{tmp_path / 'journal.db'}")
    async with await open_storage(
        settings=settings, serializer=serializer_for([ContractAccount])
    ) as opened:
        yield opened


async def append(journal: Journal, seq: int, *events: Any) -> list[int]:
    write = AtomicWrite(
        ContractAccount.type_name, ACCOUNT, seq, list(events), [(TAG,)] * len(events)
    )
    (result,) = await journal.append([write])
    return [e.offset for e in result.unwrap()]


@pytest.mark.asyncio
async def test_messages_made_from_rows_equal_those_made_from_envelopes(storage: Storage) -> None:
    journal = storage.journal
    offsets = await append(journal, 0, Deposited(ACCOUNT, 1), Noted("x"), Deposited(ACCOUNT, 2))
    make = contract_topic.message_maker(PARTITION)
    assert make is not None
    made = await journal.read_tag_made(TAG, make, after_offset=0, limit=10)
    messages = cast(list[Message[Deposit]], made.envelopes)  # what make made
    page = await journal.read_tag(TAG, after_offset=0, limit=10)
    assert messages == contract_topic.messages(page.envelopes, PARTITION)
    assert [m.payload for m in messages] == [Deposit(ACCOUNT, 1), Deposit(ACCOUNT, 2)]
    # The filtered event is covered: the page moves past it.
    assert (made.last_offset, made.scanned, made.full) == (offsets[-1], 3, False)
    # A full page of the filtered event alone moves past it too.
    only = await journal.read_tag_made(TAG, make, after_offset=offsets[0], limit=1)
    assert (only.envelopes, only.last_offset, only.full) == ([], offsets[1], True)


@pytest.mark.asyncio
async def test_an_undecodable_event_ends_the_page_and_is_raised_when_next(
    storage: Storage,
) -> None:
    journal = storage.journal
    writer_serializer = serializer_for([ContractAccount])
    writer_serializer.register(Withdrawn)
    other = Journal(storage.database, writer_serializer)
    offsets = await append(other, 0, Deposited(ACCOUNT, 1), Withdrawn(ACCOUNT, 1))
    await append(other, 2, Deposited(ACCOUNT, 3))
    feed = JournalFeed(journal, contract_topic, PARTITION)
    try:
        batch = await feed.next_batch(0, 10)
        assert [m.offset for m in batch.messages] == [offsets[0]]
        assert batch.last_offset == offsets[0] and not batch.full
        with pytest.raises(EventDecodeError) as raised:
            await feed.next_batch(offsets[0], 10)
        assert raised.value.offset == offsets[1]
    finally:
        await feed.close()


@pytest.mark.asyncio
async def test_a_message_of_the_wrong_type_is_named_with_its_offset(storage: Storage) -> None:
    wrong = Topic(
        "wrong-deposits",
        Deposit,
        source=ContractAccount,
        to_message=lambda event: event,  # the event itself, not a Deposit
    )
    (offset,) = await append(storage.journal, 0, Deposited(ACCOUNT, 1))
    with pytest.raises(TypeError, match=f"returned a Deposited for the event at offset {offset}"):
        await read_partition(storage.journal, wrong, PARTITION, 0, 10)


@pytest.mark.asyncio
async def test_a_topic_with_its_own_key_reads_envelopes(storage: Storage) -> None:
    keyed = Topic(
        "keyed-deposits",
        Deposit,
        source=ContractAccount,
        to_message=lambda e: Deposit(e.account, e.amount) if isinstance(e, Deposited) else None,
        key=lambda envelope: f"{envelope.entity_id}:{envelope.seq_nr}",
    )
    assert keyed.message_maker(PARTITION) is None
    await append(storage.journal, 0, Deposited(ACCOUNT, 1), Noted("x"))
    batch = await read_partition(storage.journal, keyed, PARTITION, 0, 10)
    assert [m.key for m in batch.messages] == [f"{ACCOUNT}:1"]
