"""A consumer's hold on one (consumer, tag) and the store that fences it.

A consumer *acquires* the lease of its row: the row gets its name as owner, ``epoch + 1`` and an
expiry. Every later write of the consumer to the row (its position above all) is conditioned on
``epoch`` still being the one it got: a consumer whose lease another took cannot write anything
any more, whatever it still believes (fencing by epoch, not a lock held on a connection). The
expiry only decides when another consumer may *take* the lease.

The types here are the core's; :class:`LeaseStore` is what the core needs of a store. The read
side's ``OffsetStore`` (``lagompy_readside_offsets`` in the projection database) is the one
implementation today.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

__all__ = [
    "FAILED",
    "REBUILD_OWNER",
    "SET_OFFSET_OWNER",
    "SKIP_OWNER",
    "STALLED",
    "Flags",
    "Lease",
    "LeaseStore",
    "describe_owner",
]

#: The state of a consumer stopped by an event it could not get past (persisted until cleared).
FAILED = "failed"
#: The state of a consumer that keeps failing at something that is not one event (reading the
#: journal, ``prepare``) and retries on its own.
STALLED = "stalled"

#: Owner-name prefixes of the operations that take a lease from the consumer holding it.
SET_OFFSET_OWNER = "set-offset:"
SKIP_OWNER = "skip:"
REBUILD_OWNER = "rebuild:"


def describe_owner(owner: str | None) -> str:
    """Who a lease owner is, for logs and errors: an operator's set-offset or skip, a rebuild,
    or another worker."""
    if owner is None:
        return "nobody (the lease was released)"
    if owner.startswith(SET_OFFSET_OWNER):
        return f"an operator's set-offset ({owner!r})"
    if owner.startswith(SKIP_OWNER):
        return f"an operator's skip ({owner!r})"
    if owner.startswith(REBUILD_OWNER):
        return f"a rebuild ({owner!r})"
    return f"another worker ({owner!r})"


class Flags(NamedTuple):
    """What a fenced write of a worker learns from its row."""

    #: An operator paused the worker.
    paused: bool
    #: The worker is stopped by a failing event (until resume, skip or set-offset).
    failed: bool
    #: An operator asked for work that waits for the lease holder (the read side: retries of
    #: parked events): the strategy's ``idle`` runs it.
    retry: bool = False

    @property
    def hold(self) -> bool:
        """True when the worker must not handle events."""
        return self.paused or self.failed


@dataclass(frozen=True)
class Lease:
    """A worker's hold on one (processor, tag): valid while the row's epoch is ``epoch``."""

    processor: str
    tag: str
    owner: str
    epoch: int
    #: The stored offset when the lease was taken: the worker resumes after it.
    offset: int
    paused: bool
    #: The row's state when the lease was taken (``failed``: stopped by a failing event).
    state: str = "idle"
    #: The offset of the row's failure line, if it has one (it clears once committed past).
    error_offset: int | None = None
    #: Who held the lease before (None: nobody), and whether that lease was still live.
    previous_owner: str | None = None
    previous_live: bool = False
    #: An operator's retry waited for the lease holder when the lease was taken.
    retry: bool = False

    @property
    def flags(self) -> Flags:
        return Flags(self.paused, self.state == FAILED, self.retry)


class LeaseStore(Protocol):
    """What the consumer core does with its row outside a commit strategy's transactions.
    Every method but :meth:`acquire` is fenced: it raises ``LeaseLost`` when the row's epoch
    is no longer the lease's, and returns the row's :class:`Flags` as it wrote them."""

    async def acquire(
        self, processor: str, tag: str, owner: str, ttl: float, *, force: bool = False
    ) -> Lease | None:
        """Take the lease if it is free, expired or ``owner``'s already (``force``: whoever
        holds it); None while another holds it."""
        ...

    async def renew(
        self, lease: Lease, ttl: float, *, state: str, events_per_s: float | None = None
    ) -> Flags:
        """Extend the lease and store ``state`` (a ``failed`` row stays failed)."""
        ...

    async def record_failure(
        self,
        lease: Lease,
        *,
        error: str,
        offset: int | None,
        entity_type: str | None,
        entity_id: str | None,
        seq_nr: int | None,
        attempts: int,
        state: str,
    ) -> Flags:
        """Store the failure line and ``state``."""
        ...

    async def clear_failure(self, lease: Lease, *, state: str) -> Flags:
        """Clear the failure line (a stall is over)."""
        ...

    async def release(self, lease: Lease, *, state: str = "stopped") -> bool:
        """Give the lease up if it is still ours; True if it was."""
        ...
