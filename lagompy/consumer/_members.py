"""The members of a consumer, and which of its partitions each should hold.

Every running instance of a consumer (a process running a read side's workers, say) is a
*member*: :class:`Membership` registers it in a :class:`MemberStore` and renews that with one
heartbeat per renew interval, however many workers (one per partition) the instance runs; a
member that stops leaves, one that dies expires like a lease. The live members, sorted by
name, give each partition (sorted too) a *target*, round robin (:func:`assign`): with ``M``
members and ``P`` partitions every member is the target of ``P // M`` or ``P // M + 1``.

The workers follow the targets and the leases keep them honest::

    holder:  at a batch boundary (its offset committed), a partition whose target is another
             live member is released                            -> standby
    standby: takes a free (or expired) lease only when it is the partition's target

so a member joining gets its share within a few renew intervals, and one leaving (or dying)
gives its partitions back once the others see it gone (at once when it leaves, after
``lease_ttl`` when it dies). The choice is deterministic (same view, same targets), so
partitions move only when the members change. Two views that disagree for a moment (a member
saw the new one a renew interval before another) may move a partition once more, never put two
workers on it: a lease is taken only when free, and every write is fenced by its epoch.

A partition that stays free while its target is live (that member does not run it, or its
worker is stuck) is taken by another member after ``lease_ttl + renew_interval``, which hands
it back after ``lease_ttl`` (and takes it again if it stays free).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

__all__ = ["MemberStore", "Membership", "assign", "member_ttl"]

log = logging.getLogger("lagompy.consumer")


class MemberStore(Protocol):
    """Where the members of consumers are registered (the read side's ``OffsetStore``)."""

    async def heartbeat(self, consumer: str, member: str, ttl: float) -> list[str]:
        """Register ``member`` of ``consumer`` as live for ``ttl`` seconds (joining if it is
        new); return the live members of ``consumer``, sorted (``member`` among them)."""
        ...

    async def leave(self, consumer: str, member: str) -> None:
        """Remove ``member`` of ``consumer`` (it stopped)."""
        ...


def member_ttl(lease_ttl: float, renew_interval: float) -> float:
    """How long a member counts as live after its heartbeat: a little less than a lease
    (``lease_ttl - renew_interval``, at least halfway between the two), so that the others
    see a dead member gone about when its leases expire, and give its partitions straight to
    their new targets."""
    return max(lease_ttl - renew_interval, (lease_ttl + renew_interval) / 2)


def assign(partitions: Sequence[str], members: Sequence[str]) -> dict[str, str]:
    """The target member of every partition: partitions and members sorted, round robin.
    Empty when there are no members."""
    ms = sorted(set(members))
    if not ms:
        return {}
    return {p: ms[i % len(ms)] for i, p in enumerate(sorted(set(partitions)))}


class Membership:
    """One instance's membership of ``consumer``, shared by the workers it runs (one per
    partition): one heartbeat per ``interval`` for all of them, and the targets they follow.

    ``partitions`` are all the consumer's partitions (the same list in every member).
    """

    def __init__(
        self,
        consumer: str,
        partitions: Sequence[str],
        store: MemberStore,
        *,
        member: str,
        ttl: float,
        interval: float,
        logger: logging.Logger = log,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < interval < ttl:
            raise ValueError(f"a membership's interval ({interval}) must be below its ttl ({ttl})")
        self.consumer = consumer
        self.partitions = sorted(set(partitions))
        self.store = store
        self.member = member
        self.ttl = ttl
        self.interval = interval
        self.log = logger
        self._clock = clock
        self._view: list[str] = []
        self._targets: dict[str, str] = {}
        self._fresh_until = float("-inf")
        self._lock = asyncio.Lock()
        self._failing = False
        self._left = False

    @property
    def view(self) -> list[str]:
        """The live members as last seen (sorted; empty before the first heartbeat)."""
        return list(self._view)

    async def members(self) -> list[str]:
        """The live members, sorted (this one among them): the last view while it is younger
        than ``interval``, else after a heartbeat. When the heartbeat fails the last view
        stays (or this member alone: every partition is then its target, as without
        membership) until the next try, an interval later."""
        if self._clock() < self._fresh_until:
            return self._view
        async with self._lock:
            if self._clock() < self._fresh_until:
                return self._view
            await self._heartbeat()
        return self._view

    async def _heartbeat(self) -> None:
        try:
            seen = await self.store.heartbeat(self.consumer, self.member, self.ttl)
        except Exception as e:
            if not self._failing:
                self.log.warning(
                    "consumer %r, member %r: heartbeat failed, keeping the last view of the "
                    "members: %s",
                    self.consumer,
                    self.member,
                    e,
                )
            self._failing = True
            seen = self._view or [self.member]
        else:
            self._failing = False
            self._left = False
        view = sorted({*seen, self.member})
        self._fresh_until = self._clock() + self.interval
        if view != self._view:
            self._view = view
            self._targets = assign(self.partitions, view)
            mine = [p for p, m in self._targets.items() if m == self.member]
            self.log.info(
                "consumer %r: %d live member(s) %s; member %r is the target of %s",
                self.consumer,
                len(view),
                view,
                self.member,
                mine,
            )

    async def target(self, partition: str) -> str:
        """The member that should hold ``partition`` (this one for a partition it does not
        know)."""
        await self.members()
        return self._targets.get(partition, self.member)

    async def leave(self) -> None:
        """Deregister (best effort: a member that cannot leave expires after ``ttl``)."""
        async with self._lock:
            self._fresh_until = float("-inf")
            self._view = []
            self._targets = {}
            if self._left:
                return
            self._left = True
            try:
                await self.store.leave(self.consumer, self.member)
            except Exception as e:
                self.log.warning(
                    "consumer %r, member %r: could not leave (it expires): %s",
                    self.consumer,
                    self.member,
                    e,
                )
