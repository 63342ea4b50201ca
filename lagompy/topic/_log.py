"""Where the producing service reads its topics' partitions: :class:`PartitionLog`, one small
protocol with two implementations, chosen in one place (:func:`partition_log`):

* a journal on one database: the journal's tags themselves
  (:class:`~lagompy.topic._embedded.JournalLog`): a message's offset is its event's journal
  offset, nothing more is written;
* a journal placed on several databases: the relay log in the home database
  (:class:`~lagompy.topic._relay.RelayLog`), where the relays write each partition's messages
  with offsets 1, 2, 3... (see ``_relay.py``).

The HTTP routes, the embedded transport's feeds and the NATS producer read through it, and
serve what they read unchanged either way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from lagompy.journal._tailing import TailSettings
from lagompy.sql._database import Database
from lagompy.topic._topic import StartFrom, Topic
from lagompy.topic._transport import MessageBatch, MessageFeed

if TYPE_CHECKING:
    from lagompy.journal._journal import Journal

__all__ = ["PartitionLog", "partition_log"]


class PartitionLog(Protocol):
    """The messages of topics' partitions in the producing service's database, by position."""

    #: The database it reads.
    database: Database

    def feed(
        self, topic: Topic[Any], partition: int, *, tail: TailSettings | None = None
    ) -> MessageFeed:
        """A feed of the partition (tailing it: catch up, then wait for new messages)."""
        ...

    async def read(self, topic: Topic[Any], partition: int, after: int, limit: int) -> MessageBatch:
        """Up to ``limit`` messages after position ``after``, read now (never waits).
        ``EventDecodeError`` when the next one cannot be decoded."""
        ...

    async def position(self, topic: Topic[Any], partition: int, start: StartFrom) -> int:
        """Where a new group starts (see :meth:`MessageFeed.start_offset
        <lagompy.topic.MessageFeed.start_offset>`)."""
        ...

    async def lag(self, topic: Topic[Any], partition: int, after: int) -> tuple[int, int, float]:
        """(head, messages or events behind ``after``, age in seconds of the oldest of them)."""
        ...


def partition_log(
    journal: Journal, *, placed: bool, tail: TailSettings | None = None
) -> PartitionLog:
    """The log of the topics of ``journal`` (the home database's, on a placed journal): its
    tags, or the relay log when the journal is ``placed`` on several databases."""
    if placed:
        from lagompy.topic._relay import RelayLog

        return RelayLog(journal.database, tail=tail)
    from lagompy.topic._embedded import JournalLog

    return JournalLog(journal, tail=tail)
