"""The consumer core: one :class:`EventConsumer` per (consumer, partition), whatever it does with
events. A partition is a tag of the journal, keyed by the tag itself; on a journal placed on
several databases a consumer of a tag has one partition per database, keyed
``tag@database`` (``lagompy.journal._placement.partition_key``) and reading that database's
journal: the key names the lease and the stored position, ``journal_tag`` is what it reads.

Everything that follows the journal is the same machine, and this module is it::

    lease (fenced, one owner per consumer and tag)          LeaseStore
      -> strategy.prepare                                    (under the lease)
      -> catch up, then tail live                            PageTailer (lagompy.journal)
           page of events after the stored position
           -> strategy.commit(page)                          effects + position, as promised
           -> short page: wait for NOTIFY or the poll interval (lease renewed meanwhile)
      -> pause / failed flags, backoff, stalls, status

The tail loop is :class:`~lagompy.journal.PageTailer`'s (the one :class:`EventTailer
<lagompy.journal.EventTailer>` runs too): the same settings (:class:`TailSettings
<lagompy.journal.TailSettings>`), the same LISTEN connection per process, the same waits.

What differs between consumers is the **commit strategy** (:class:`CommitStrategy`): what a page
of events becomes and how its position is recorded with it. The one strategy today is the read
side's (``lagompy.readside``): the handlers' SQL writes and the new position in one transaction,
fenced by the lease's epoch, hence exactly-once effects. The protocol leaves room for others,
each only a strategy away:

* a topic producer: publish the page's messages to a broker, then record the position (or find
  it in the broker's last message at ``prepare``): at least once, deduplicated by message id;
* a process manager (``lagompy.process``): the commands it sends (ids derived from the
  event's position, so that a re-run is absorbed by the entity's stored replies), then its
  state and the position in one transaction.

Leases, positions, pause and failure flags live in a :class:`LeaseStore` (the read side's
``OffsetStore`` today).

With a :class:`~lagompy.consumer.Membership` (one per running instance of the consumer, shared
by its consumers of every partition), a consumer takes a free lease only for a partition whose
*target* is its own member, and hands a partition whose target is another live member over
between two pages: its last commit stored, it releases the lease and stands by (see
``_members.py``). Without one, it takes any free lease, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from lagompy.consumer._lease import (
    FAILED,
    SET_OFFSET_OWNER,
    SKIP_OWNER,
    STALLED,
    Flags,
    Lease,
    LeaseStore,
    describe_owner,
)
from lagompy.consumer._members import Membership
from lagompy.errors import (
    EventDecodeError,
    JournalUnavailable,
    LagompyError,
    LeaseLost,
    ReadSideDecodeFailed,
    ReadSideHandlerFailed,
)
from lagompy.journal._journal import Journal, TagPage
from lagompy.journal._tailing import PageTailer, TailSettings

#: The default logger of consumers (a user of the core passes its own: ``lagompy.readside``).
log = logging.getLogger("lagompy.consumer")

__all__ = [
    "CommitStrategy",
    "ConsumerSettings",
    "ConsumerStopped",
    "EventConsumer",
    "Progress",
    "describe_taken",
]


class ConsumerStopped(Exception):
    """Raised out of a consumer's waits once :meth:`EventConsumer.stop` was called: the
    consumer ends after its current transaction. Commit strategies let it through."""


class _HandedOver(Exception):
    """Internal: the consumer released its lease at a batch boundary, for ``target``, the
    partition's target member (see :class:`~lagompy.consumer.Membership`)."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.target = target


class ConsumerSettings(Protocol):
    """The settings the core reads (``ReadSideSettings`` has them)."""

    @property
    def max_batch(self) -> int:
        """Events read per query (the page size)."""
        ...

    @property
    def lease_ttl(self) -> float: ...

    @property
    def renew_interval(self) -> float: ...

    @property
    def max_attempts(self) -> int: ...

    @property
    def retry_initial_delay(self) -> float: ...

    @property
    def retry_max_delay(self) -> float: ...

    @property
    def tail(self) -> TailSettings:
        """How the consumer waits for new events (poll interval, LISTEN...)."""
        ...


class CommitStrategy(Protocol):
    """What a consumer does with its events, and how it records that it did.

    Each method runs under ``lease`` and must write only fenced by it (a lease another consumer
    took makes the write fail with ``LeaseLost``); each tells the consumer where it got with
    :meth:`EventConsumer.moved` (or :meth:`EventConsumer.set_flags`). ``LeaseLost``,
    :class:`ConsumerStopped` and ``JournalUnavailable`` must pass through; any other error of
    :meth:`prepare` is retried by the core with backoff (a stall from ``max_attempts`` on).
    """

    async def prepare(self, consumer: EventConsumer, lease: Lease, *, clear_stall: bool) -> None:
        """Set up for the tag under a fresh lease (the read side: ``processor.prepare``), and
        write the row once, fenced (``clear_stall``: clear the stall it records)."""
        ...

    async def commit(
        self, consumer: EventConsumer, lease: Lease, page: TagPage, *, ignore_pause: bool
    ) -> None:
        """Apply the page's events and record the position up to ``page.last_offset`` (past
        the events not wanted), or as far as it got: the consumer reads on from
        :attr:`EventConsumer.offset`. Stop early when the row is held (paused or failed),
        unless ``ignore_pause``. An event it cannot get past raises after recording the
        failure (or is skipped, as the strategy's policy says)."""
        ...

    async def undecodable(
        self, consumer: EventConsumer, lease: Lease, error: EventDecodeError
    ) -> None:
        """The next event of the tag cannot be decoded (``error.offset``): the consumer reads
        it again after this returns, until the strategy records it as failed or skipped."""
        ...

    async def hand_over(self, consumer: EventConsumer, lease: Lease) -> None:
        """Called between two batches, after the last commit, before the consumer releases
        ``lease`` to the partition's target member: stop the work done under the lease
        besides the consumer's own (the workflow executor: its run drivers), so that the next
        holder starts alone. The read side and the topic producers have none."""
        ...

    async def idle(self, consumer: EventConsumer, lease: Lease) -> None:
        """Called while the consumer runs (not held) and its row's flags ask for work that
        waits for the lease holder (:attr:`Flags.retry`: the read side's operators' retries
        of parked events); the flags come with the lease renewals and commits, so this runs
        within about ``renew_interval`` of the request. Fenced like every write; once done
        it resets ``retry`` in the consumer's flags (:meth:`EventConsumer.set_flags`)."""
        ...


Progress = Callable[[int], None]


class PageSource(Protocol):
    """Where a consumer's pages come from: a journal tag's :class:`~lagompy.journal.PageTailer`
    by default; a topic subscriber's message feed (``lagompy.topic``) has the same shape. An
    optional ``reading`` attribute says what a failing read was doing, for the status
    (default: ``"reading the journal"``)."""

    async def start(self) -> None: ...

    async def next_page(self, after: int) -> TagPage: ...

    async def wait(self, limit: float | None = None) -> None: ...

    def wake(self) -> None: ...

    async def close(self) -> None: ...


def describe_taken(lease: Lease) -> str:
    """How a lease was taken, for the log."""
    text = f"lease taken by {lease.owner!r} (epoch {lease.epoch})"
    previous = lease.previous_owner
    if previous is None or previous == lease.owner:
        return text
    if previous.startswith((SET_OFFSET_OWNER, SKIP_OWNER)):
        return f"{text} after {describe_owner(previous)}"
    if lease.previous_live:
        return f"{text} from {describe_owner(previous)}, which still held it"
    return f"{text} from {describe_owner(previous)}, whose lease had expired"


class _Rate:
    """Events per second over the last few seconds."""

    WINDOW = 5.0

    def __init__(self) -> None:
        self._marks: deque[tuple[float, int]] = deque()
        self._started = time.monotonic()

    def add(self, n: int) -> float:
        now = time.monotonic()
        self._marks.append((now, n))
        while self._marks and self._marks[0][0] < now - self.WINDOW:
            self._marks.popleft()
        return self.value(now)

    def value(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        span = min(self.WINDOW, max(now - self._started, 1e-3))
        return round(sum(n for t, n in self._marks if t >= now - self.WINDOW) / span, 1)


ErrorText = Callable[[BaseException], str]

#: What a strategy raises once it has stored that it stopped at an event (its handler kept
#: failing, or it cannot be decoded): the consumer holds until an operator resumes or skips.
EVENT_FAILURES = (ReadSideHandlerFailed, ReadSideDecodeFailed)


class EventConsumer:
    """Follows one tag of the journal for one named consumer: lease, prepare, catch up, tail,
    commit pages through its :class:`CommitStrategy`.

    :meth:`run` goes on until :meth:`stop` (re-acquiring the lease if it is lost);
    :meth:`catch_up` handles what is in the journal now and returns (tests, rebuilds).
    Status: :attr:`state`, :attr:`offset`, :attr:`lease`, :attr:`events_handled`,
    :attr:`transactions`, :attr:`failures`, :attr:`last_error`, :attr:`events_per_s`.

    Anything that keeps failing outside one event (reading the journal, ``prepare``, the
    store) is retried with capped exponential backoff and, from ``max_attempts`` on, stored as
    ``stalled`` with the error until it succeeds; a failing *event* is the strategy's to
    retry, skip or stop at.
    """

    def __init__(
        self,
        name: str,
        tag: str,
        *,
        journal: Journal | None,
        store: LeaseStore,
        strategy: CommitStrategy,
        settings: ConsumerSettings,
        owner: str,
        event_types: frozenset[str] | None = None,
        kind: str = "consumer",
        describe_error: ErrorText = repr,
        logger: logging.Logger = log,
        pages: Callable[[], PageSource] | None = None,
        membership: Membership | None = None,
        journal_tag: str | None = None,
    ) -> None:
        self.name = name
        #: The partition's key: its lease, its stored position, its failures and parked rows.
        self.tag = tag
        #: The journal tag the consumer reads (``tag`` unless the key names a database too).
        self.journal_tag = tag if journal_tag is None else journal_tag
        self.journal = journal
        self.store = store
        self.strategy = strategy
        self.settings = settings
        self.owner = owner
        self.kind = kind
        self.describe_error = describe_error
        self.log = logger
        self.state = "starting"
        #: The position: the offset of the last event whose commit is stored.
        self.offset = 0
        self.lease: Lease | None = None
        #: Events committed (handled, or passed as not wanted within a batch).
        self.events_handled = 0
        #: Commits of events (transactions of the read side).
        self.transactions = 0
        self.failures = 0
        self.last_error: str | None = None
        #: Stored type names of the events wanted (None: all): the others are never decoded.
        self.event_types = event_types
        self.rate = _Rate()
        self._stop = asyncio.Event()
        #: Makes the page sources (None: the journal's tag, through a PageTailer).
        self._pages = pages
        #: The tailer of :meth:`run` (subscribed to wake-ups while it runs).
        self._tailer: PageSource | None = None
        #: The row's flags as the last fenced write saw them.
        self._flags = Flags(False, False)
        #: The offset of the row's failure line (cleared once the consumer commits past it).
        self._error_offset: int | None = None
        #: The row holds a stall (cleared once the failing step succeeds).
        self._stalled = False
        #: The instance's membership of the consumer (None: hold whatever lease is free).
        self.membership = membership
        #: The target member whose partition this consumer took, free too long, and until
        #: when it keeps it before giving the target another chance.
        self._covering: str | None = None
        self._covering_until = 0.0

    # ------------------------------------------------------------------ control and status

    async def stop(self) -> None:
        """Ask :meth:`run` to end after the current transaction (it releases the lease)."""
        self._stop.set()
        if self._tailer is not None:
            self._tailer.wake()

    def wake(self) -> None:
        """Query the journal now instead of at the next poll."""
        if self._tailer is not None:
            self._tailer.wake()

    @property
    def events_per_s(self) -> float:
        return self.rate.value()

    @property
    def flags(self) -> Flags:
        """The row's flags as the last fenced write saw them."""
        return self._flags

    def set_flags(self, flags: Flags) -> None:
        self._flags = flags

    @property
    def tailer(self) -> PageTailer | None:
        """The journal tailer :meth:`run` reads with (None when not running, or when the
        pages come from another source)."""
        tailer = self._tailer
        return tailer if isinstance(tailer, PageTailer) else None

    def where(self) -> str:
        if self.journal_tag != self.tag:
            return f"{self.kind} {self.name!r}, partition {self.tag!r}"
        return f"{self.kind} {self.name!r}, tag {self.tag!r}"

    def passes_failure(self, offset: int) -> bool:
        """True when committing up to ``offset`` moves past the row's failure line."""
        return self._error_offset is not None and offset >= self._error_offset

    def moved(self, offset: int, cleared: bool, flags: Flags) -> None:
        """A fenced write stored ``offset`` (``cleared``: and cleared the failure line)."""
        self.offset = offset
        self._flags = flags
        if cleared:
            self._error_offset = None

    def failed_at(self, offset: int | None, flags: Flags) -> None:
        """A fenced write stored a failure line at ``offset``."""
        self._flags = flags
        self._error_offset = offset

    def committed(self, events: int) -> float:
        """Count a commit of ``events``; returns the rate to store with it."""
        self.events_handled += events
        self.transactions += 1
        return self.rate.add(events)

    async def sleep(self, seconds: float) -> None:
        """Sleep, or raise :class:`ConsumerStopped` as soon as :meth:`stop` is called."""
        if self._stop.is_set():
            raise ConsumerStopped
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()
        if self._stop.is_set():
            raise ConsumerStopped

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before try ``attempt + 1``: doubled each time, capped."""
        s = self.settings
        return float(min(s.retry_max_delay, s.retry_initial_delay * 2 ** max(0, attempt - 1)))

    def _new_tailer(self) -> PageSource:
        if self._pages is not None:
            return self._pages()
        if self.journal is None:
            raise ValueError(f"{self.where()}: give the consumer a journal or a page source")
        return PageTailer(
            self.journal,
            tag=self.journal_tag,
            event_types=self.event_types,
            page_size=self.settings.max_batch,
            settings=self.settings.tail,
        )

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        """Hold the lease and process events until :meth:`stop`."""
        tailer = self._new_tailer()
        self._tailer = tailer
        trouble = 0
        last_trouble = 0.0
        try:
            await tailer.start()
            while True:
                lease = None
                try:
                    lease = await self._hold(balanced=True)
                    self.lease = lease
                    await self._prepare(lease)
                    await self._consume(lease, tailer)
                except _HandedOver as e:
                    self.state = "standby"
                    if lease is not None:
                        await self.strategy.hand_over(self, lease)
                    await self._release(lease, "idle")
                    self.log.info(
                        "%s: lease released at offset %d for member %r, the partition's target",
                        self.where(),
                        self.offset,
                        e.target,
                    )
                    lease = None
                except LeaseLost as e:
                    self.log.warning("%s; waiting to get it back", e)
                    self.state = "standby"
                    if self.lease is lease:
                        self.lease = None
                    lease = None
                except ConsumerStopped:
                    raise
                except Exception as e:  # the database is unreachable, for instance
                    # Consecutive troubles count towards `stalled`, even when the consumer gets
                    # as far as consuming in between; a quiet lease_ttl starts the count over.
                    now = time.monotonic()
                    if now - last_trouble > self.settings.lease_ttl + self.settings.retry_max_delay:
                        trouble = 0
                    last_trouble = now
                    trouble += 1
                    self.last_error = self.describe_error(e)
                    self.state = "retrying"
                    self.log.warning(
                        "%s: %s (attempt %d, retrying)",
                        self.where(),
                        self.last_error,
                        trouble,
                        exc_info=not isinstance(e, LagompyError),
                    )
                    state = "retrying"
                    if trouble >= self.settings.max_attempts:
                        state = STALLED
                        await self._stall(lease, self.last_error, trouble)
                    await self._release(lease, state)
                    await self.sleep(self.backoff(trouble))
        except ConsumerStopped:
            await self._release(self.lease, "stopped")
        finally:
            self.state = "stopped"
            await tailer.close()

    async def _release(self, lease: Lease | None, state: str) -> None:
        if lease is None:
            return
        # No longer ours from here on (the consumer writes nothing more under it), even
        # before the release commits: another may take it as soon as it does.
        if self.lease is lease:
            self.lease = None
        try:
            await self.store.release(lease, state=state)
        except LagompyError as e:
            self.log.warning("%s: could not release the lease: %s", self.where(), e)

    async def catch_up(self, *, force: bool = False, progress: Progress | None = None) -> int:
        """Take the lease (``force``: from whoever holds it), prepare, handle every event in
        the journal now, release the lease; returns the offset reached. Ignores the pause flag
        and a ``failed`` state; an event the strategy cannot get past raises."""
        lease = await self._hold(force=force)
        self.lease = lease
        # Its own tailer, never started: it only reads (nothing waits for new events).
        pages = self._new_tailer()
        try:
            await self._prepare(lease)
            self.state = "running"
            page = await self._read(pages, lease)
            while True:
                # Read the next page while this one's transaction runs (the journal read and
                # the decoding overlap the commit's writes).
                ahead = None
                if page.full:
                    ahead = asyncio.create_task(self._read(pages, lease, after=page.last_offset))
                try:
                    await self.strategy.commit(self, lease, page, ignore_pause=True)
                    if page.error is not None:
                        await self.strategy.undecodable(self, lease, page.error)
                except BaseException:
                    if ahead is not None:
                        ahead.cancel()
                        await asyncio.gather(ahead, return_exceptions=True)
                    raise
                if progress is not None and page.scanned:
                    progress(page.scanned)
                if ahead is not None:
                    page = await ahead
                elif page.error is not None:
                    page = await self._read(pages, lease)  # the undecodable event, or past it
                else:
                    return self.offset
        except ConsumerStopped:
            return self.offset
        finally:
            await pages.close()
            await self._release(lease, "idle")

    async def _hold(self, *, force: bool = False, balanced: bool = False) -> Lease:
        """Take the lease (``balanced``: only when this member is the partition's target, or
        when the partition stayed free for ``lease_ttl + renew_interval``)."""
        waiting_since = time.monotonic()
        waiting_for: str | None = None
        while True:
            covering = None
            if balanced and self.membership is not None:
                target = await self.membership.target(self.tag)
                s = self.settings
                if target != waiting_for:
                    # A new target gets its own lease_ttl + renew_interval to take it.
                    waiting_since = time.monotonic()
                    waiting_for = target
                if target != self.membership.member:
                    if time.monotonic() - waiting_since <= s.lease_ttl + s.renew_interval:
                        self.state = "standby"
                        await self.sleep(s.renew_interval)
                        continue
                    covering = target
            lease = await self.store.acquire(
                self.name, self.tag, self.owner, self.settings.lease_ttl, force=force
            )
            if lease is not None:
                self._covering = covering
                self._covering_until = time.monotonic() + self.settings.lease_ttl
                if covering is not None:
                    self.log.warning(
                        "%s: took the partition of member %r, which left it free",
                        self.where(),
                        covering,
                    )
                self.offset = lease.offset
                self._flags = lease.flags
                self._error_offset = lease.error_offset
                self._stalled = lease.state == STALLED
                level = logging.WARNING if lease.previous_live else logging.INFO
                self.log.log(level, "%s: %s", self.where(), describe_taken(lease))
                return lease
            self.state = "standby"
            await self.sleep(self.settings.renew_interval)

    async def _prepare(self, lease: Lease) -> None:
        self.state = "preparing"
        attempt = 0
        while True:
            try:
                stalled = self._stalled
                await self.strategy.prepare(self, lease, clear_stall=stalled)
                if stalled:
                    self._stalled = False
                    self._error_offset = None
                return
            except (LeaseLost, ConsumerStopped, JournalUnavailable):
                raise
            except Exception as e:
                attempt += 1
                self.failures += 1
                self.last_error = f"prepare({self.journal_tag!r}) failed: {self.describe_error(e)}"
                self.log.error("%s: %s (attempt %d)", self.where(), self.last_error, attempt)
                if attempt >= self.settings.max_attempts:
                    await self._stall(lease, self.last_error, attempt)
                await self.sleep(self.backoff(attempt))

    async def _read(
        self, pages: PageSource, lease: Lease | None = None, after: int | None = None
    ) -> TagPage:
        attempt = 0
        while True:
            start = self.offset if after is None else after
            try:
                page = await pages.next_page(start)
            except Exception as e:
                attempt += 1
                self.last_error = (
                    f"{getattr(pages, 'reading', 'reading the journal')} after offset {start} "
                    f"failed: {self.describe_error(e)}"
                )
                self.log.warning(
                    "%s: %s (attempt %d)",
                    self.where(),
                    self.last_error,
                    attempt,
                    exc_info=not isinstance(e, LagompyError),
                )
                if attempt >= self.settings.max_attempts:
                    await self._stall(lease, self.last_error, attempt)
                await self.sleep(self.backoff(attempt))
                continue
            if self._stalled and lease is not None and not self._flags.failed:
                self._stalled = False
                self._error_offset = None
                self._flags = await self.store.clear_failure(lease, state="running")
                self.log.info("%s: reads the journal again", self.where())
            return page

    async def _stall(self, lease: Lease | None, error: str, attempts: int) -> None:
        """Store that the consumer cannot make progress (``stalled``, with the error), unless
        it is stopped by a failing event already. Best effort: the store may be what fails."""
        self.state = STALLED
        if lease is None or self._flags.failed:
            return
        try:
            self._flags = await self.store.record_failure(
                lease,
                error=error,
                offset=self.offset,
                entity_type=None,
                entity_id=None,
                seq_nr=None,
                attempts=attempts,
                state=STALLED,
            )
            self._stalled = True
            self._error_offset = self.offset
        except LagompyError as e:
            self.log.warning("%s: could not store the stall: %s", self.where(), e)

    async def _hand_over(self) -> None:
        """Between batches: raise :class:`_HandedOver` when another live member is the
        partition's target (unless this consumer covers for that member)."""
        if self.membership is None:
            return
        target = await self.membership.target(self.tag)
        if target == self.membership.member:
            return
        if target == self._covering and time.monotonic() < self._covering_until:
            return
        raise _HandedOver(target)

    async def _consume(self, lease: Lease, tailer: PageSource) -> None:
        s = self.settings
        next_renew = time.monotonic() + s.renew_interval
        while True:
            if self._stop.is_set():
                raise ConsumerStopped
            await self._hand_over()
            if self._flags.hold:
                self.state = FAILED if self._flags.failed else "paused"
                await self.sleep(min(s.renew_interval, max(0.0, next_renew - time.monotonic())))
                state = "paused" if self._flags.paused else "running"
                self._flags = await self.store.renew(lease, s.lease_ttl, state=state)
                next_renew = time.monotonic() + s.renew_interval
                continue
            self.state = "running"
            if self._flags.retry:
                await self.strategy.idle(self, lease)
            page = await self._read(tailer, lease)
            try:
                if page.envelopes or page.last_offset > self.offset:
                    await self.strategy.commit(self, lease, page, ignore_pause=False)
                    next_renew = time.monotonic() + s.renew_interval
                if page.error is not None and not self._flags.hold:
                    await self.strategy.undecodable(self, lease, page.error)
                    continue
            except EVENT_FAILURES:
                continue  # stored as failed: `resume` or `skip` moves it on
            if self._flags.hold or self._stop.is_set():
                continue
            await tailer.wait(limit=next_renew - time.monotonic())
            if time.monotonic() >= next_renew:
                self._flags = await self.store.renew(
                    lease, s.lease_ttl, state="running", events_per_s=self.rate.value()
                )
                next_renew = time.monotonic() + s.renew_interval
