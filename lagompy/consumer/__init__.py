"""Event consumers: one core for everything that follows the journal by offset.

A consumer reads one tag (one partition of a sharded tag) for one name: it holds that pair's
fenced lease, resumes after its stored position, catches up, then tails the journal live, and
hands each page of events to its **commit strategy**, which applies them and records the new
position as it promises::

    EventConsumer (_core.py)                  CommitStrategy (a protocol)
      lease, stored position                    prepare(consumer, lease)
      catch-up, then the live tail  ── page ─▶  commit(consumer, lease, page)
      (journal.PageTailer: NOTIFY or poll)      undecodable(consumer, lease, error)
      pause, failed, backoff, stalls, status

* ``_core.py``: :class:`EventConsumer`, :class:`CommitStrategy`, :class:`ConsumerSettings`.
* ``_lease.py``: :class:`Lease`, :class:`Flags` and :class:`LeaseStore`, what the core needs of
  the store of its leases and positions.
* ``_members.py``: :class:`Membership` (the running instances of a consumer, and which
  partitions each should hold: a member joining gets its share, one leaving gives its
  partitions back) and :class:`MemberStore`.

Users today: the read side (:class:`lagompy.readside.ReadSideWorker`, whose strategy commits the
handlers' SQL writes with the offset in one transaction: exactly once), topic subscribers and
producers (``lagompy.topic``) and process managers (``lagompy.process``: the commands sent with
ids derived from the position, then the state and the position in one transaction): each is
one more strategy, never another tail loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lagompy._lazy import on_first_use

if TYPE_CHECKING:
    from lagompy.consumer._core import (
        CommitStrategy,
        ConsumerSettings,
        ConsumerStopped,
        EventConsumer,
        PageSource,
        Progress,
        describe_taken,
    )
    from lagompy.consumer._lease import FAILED, STALLED, Flags, Lease, LeaseStore, describe_owner
    from lagompy.consumer._members import Membership, MemberStore, assign, member_ttl

#: The public names, by the module that defines them; each is imported on first use
#: (:mod:`lagompy._lazy`).
_HOMES = {
    "lagompy.consumer._core": (
        "CommitStrategy",
        "ConsumerSettings",
        "ConsumerStopped",
        "EventConsumer",
        "PageSource",
        "Progress",
        "describe_taken",
    ),
    "lagompy.consumer._lease": (
        "FAILED",
        "STALLED",
        "Flags",
        "Lease",
        "LeaseStore",
        "describe_owner",
    ),
    "lagompy.consumer._members": (
        "Membership",
        "MemberStore",
        "assign",
        "member_ttl",
    ),
}

__all__ = [
    "FAILED",
    "STALLED",
    "CommitStrategy",
    "ConsumerSettings",
    "ConsumerStopped",
    "EventConsumer",
    "Flags",
    "Lease",
    "LeaseStore",
    "MemberStore",
    "Membership",
    "PageSource",
    "Progress",
    "assign",
    "describe_owner",
    "describe_taken",
    "member_ttl",
]

if not TYPE_CHECKING:  # mypy sees the names above and flags any other
    __getattr__, __dir__ = on_first_use(__name__, _HOMES, globals())
