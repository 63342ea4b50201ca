"""PostgreSQL notifications name the tags a write carried: a tailer of another tag is not
woken to read nothing (migration 0012), and nothing a tailer follows is ever left unseen.

The tailers poll every 30 s here: an event seen within seconds came from a notification. The
channel is database-wide, so writers in other schemas (other test runs) may wake any tailer
with a payload of their own; the checks are on what each tailer was woken *by*.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest
from conftest import POSTGRES_URL

from examples.user_service.entity import UserRegistered
from lagompy import AtomicWrite, Storage
from lagompy.journal import JournalNotifier, PageTailer, TailSettings
from lagompy.journal._postgres import _PG_COPY_FROM, NOTIFY_TAGS_BYTES, notify_tags
from lagompy.journal._tailing import WakeReason

NEVER = 30.0
SETTINGS = TailSettings(poll_interval=NEVER, listen_poll_interval=NEVER)


def writes(prefix: str, n_events: int, tags: tuple[str, ...]) -> list[AtomicWrite]:
    """``n_events`` events over entities of their own, each carrying ``tags``."""
    out = []
    for n in range(n_events):
        uid = f"{prefix}{n}"
        out.append(AtomicWrite("user", uid, 0, [UserRegistered(uid, uid, f"{uid}@x.org")], [tags]))
    return out


class Watched:
    """A tailer of one tag (or all events) waiting after its last page, and the payloads of
    the notifications that woke it (delivered to a subscription of the same tag)."""

    def __init__(self, storage: Storage, tag: str | None) -> None:
        self.tag = tag
        self.tailer = PageTailer(storage.journal, tag=tag, settings=SETTINGS)
        self.after = 0
        self.events = 0
        self.woken_by: list[str | None] = []
        self._task: asyncio.Task[Any] | None = None

    async def start(self) -> None:
        await self.tailer.start()
        notifier = self.tailer.notifier
        assert isinstance(notifier, JournalNotifier)
        assert await notifier.wait_connected(5)
        notifier.subscribe(lambda _r: self.woken_by.append(notifier.last_payload), self.tag)
        await self._read()
        self._task = asyncio.create_task(self._loop())

    async def _read(self) -> None:
        page = await self.tailer.next_page(self.after)
        self.events += len(page.envelopes)
        self.after = page.last_offset if page.envelopes else self.after

    async def _loop(self) -> None:
        while True:
            await self.tailer.wait()
            await self._read()

    async def until(self, events: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while self.events < events:
                await asyncio.sleep(0.01)

    def tags_that_woke_it(self) -> list[set[str]]:
        """The tags named by each notification that woke it (those naming none left out)."""
        return [set(p.split("\n")[1:]) for p in self.woken_by if p is not None and "\n" in p]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.tailer.close()


@pytest.mark.parametrize(
    "size", [1, 2, _PG_COPY_FROM], ids=["one-write", "write-function", "large-batch"]
)
async def test_only_the_tailers_of_the_written_tags_are_woken(
    pg_storage: Storage, size: int
) -> None:
    # Every write path: one write of one event (its own statement), the write function (small
    # batches) and the large batches' statement.
    ta, tb = f"a-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    a, b, every = Watched(pg_storage, ta), Watched(pg_storage, tb), Watched(pg_storage, None)
    for w in (a, b, every):
        await w.start()
    try:
        await pg_storage.journal.append(writes("x", size, (ta,)))
        await a.until(size)
        await every.until(size)
        assert f"{a.after}\n{ta}" in a.woken_by  # the payload: the offset, then the tag
        # The notifications of the tags a tailer does not read never wake it.
        await pg_storage.journal.append(writes("y", size, (ta, tb)))
        await b.until(size)  # woken by the write of both
        await a.until(2 * size)
        await every.until(2 * size)
        await pg_storage.journal.append(writes("z", size, ()))  # no tag
        await every.until(3 * size)
        await pg_storage.journal.append(writes("w", size, (ta,)))
        await a.until(3 * size)
        await every.until(4 * size)
        await asyncio.sleep(0.2)  # any late wake-up of b is in by now
        assert {ta, tb} in a.tags_that_woke_it() and {ta, tb} in b.tags_that_woke_it()
        assert all(ta in tags for tags in a.tags_that_woke_it())
        assert all(tb in tags for tags in b.tags_that_woke_it())
        assert {""} in every.tags_that_woke_it()  # the write with no tag: "<offset>\n"
        assert b.events == size
        assert a.tailer.poll_wakeups == b.tailer.poll_wakeups == every.tailer.poll_wakeups == 0
    finally:
        for w in (a, b, every):
            await w.stop()


@pytest.mark.parametrize("size", [1, 2], ids=["one-write", "write-function"])
async def test_a_refused_write_notifies_nobody(pg_storage: Storage, size: int) -> None:
    # Writes whose expected sequence number is stale insert nothing and send no notification;
    # the accepted write after them sends one, that names its tag.
    refused, accepted = f"r-{uuid.uuid4().hex[:8]}", f"a-{uuid.uuid4().hex[:8]}"
    first = writes("n", size, (refused,))
    assert all(r.ok for r in await pg_storage.journal.append(first))
    payloads: list[str] = []
    listener = await asyncpg.connect(POSTGRES_URL)
    try:
        await listener.add_listener("lagompy_events", lambda *a: payloads.append(a[3]))
        stale = writes("n", size, (refused,))  # expect 0 again: every one conflicts
        results = await pg_storage.journal.append(stale)
        assert [r.ok for r in results] == [False] * size
        [ok] = await pg_storage.journal.append(writes("m", 1, (accepted,)))
        async with asyncio.timeout(5):
            while not any(accepted in p.split("\n") for p in payloads):
                await asyncio.sleep(0.01)
        assert f"{ok.offsets[-1]}\n{accepted}" in payloads
        assert not any(refused in p.split("\n") for p in payloads)
    finally:
        await listener.close()


async def test_a_write_with_too_many_tags_to_name_wakes_every_tailer(pg_storage: Storage) -> None:
    many = tuple(f"{n:03d}" + "t" * 247 for n in range(40))  # 10,000 bytes: over the limit
    a = Watched(pg_storage, f"a-{uuid.uuid4().hex[:8]}")
    await a.start()
    try:
        [result] = await pg_storage.journal.append(writes("m", 1, many))
        assert result.ok
        top = result.offsets[-1]
        async with asyncio.timeout(5):
            while str(top) not in a.woken_by:  # the offset alone: woken, whatever its tag
                await asyncio.sleep(0.01)
        assert a.events == 0
    finally:
        await a.stop()


async def test_a_notification_that_names_no_tags_wakes_every_subscriber(
    pg_storage: Storage,
) -> None:
    # What a writer of an older version sends (the offset alone), and a write whose tags do
    # not fit: every subscriber reads again. A payload naming tags wakes only theirs, and the
    # subscribers of every event.
    tailer = PageTailer(pg_storage.journal, tag="a", settings=SETTINGS)
    await tailer.start()
    try:
        notifier = tailer.notifier
        assert isinstance(notifier, JournalNotifier)
        woken: list[str] = []
        subs = [
            notifier.subscribe(lambda _r, n=name: woken.append(n), tag)  # type: ignore[misc]
            for name, tag in (("a", "a"), ("b", "b"), ("all", None))
        ]
        notifier._on_notification(None, 0, "lagompy_events", "42")
        assert sorted(woken) == ["a", "all", "b"]
        woken.clear()
        notifier._on_notification(None, 0, "lagompy_events", "43\nb\nc")
        assert sorted(woken) == ["all", "b"]
        woken.clear()
        notifier._wake_all(WakeReason.CONNECTED)  # connection changes wake everyone
        assert sorted(woken) == ["a", "all", "b"]
        for sub in subs:
            sub.close()
    finally:
        await tailer.close()


def test_the_tags_named_fit_the_payload_or_are_left_out() -> None:
    assert notify_tags([]) == "\n"  # no tag: only the tailers of every event read
    assert notify_tags(["a", "a"]) == "\na"
    assert set(notify_tags(["a", "b"]).split("\n")) == {"", "a", "b"}
    assert notify_tags(["a\nb"]) == ""  # a line break would split a name
    fits = ["x" * (NOTIFY_TAGS_BYTES - 1)]
    assert notify_tags(fits) == "\n" + fits[0]
    assert notify_tags(["x" * NOTIFY_TAGS_BYTES]) == ""


async def test_a_tailer_of_a_tag_never_misses_its_events_among_others(
    pg_storage: Storage,
) -> None:
    # Many small writes of four tags from concurrent writers: each tailer of one tag sees all
    # of its events within seconds (its poll is 30 s).
    run = uuid.uuid4().hex[:8]
    tags = [f"t{n}-{run}" for n in range(4)]
    watched = [Watched(pg_storage, t) for t in tags]
    for w in watched:
        await w.start()
    try:

        async def writer(n: int) -> None:
            for i in range(25):
                uid = f"w{n}-{i}"
                event = UserRegistered(uid, uid, "e@x.org")
                await pg_storage.journal.append_one(
                    AtomicWrite("user", uid, 0, [event], [(tags[(n + i) % 4],)])
                )

        await asyncio.gather(*(writer(n) for n in range(4)))
        for w in watched:
            await w.until(25, timeout=10)
        await asyncio.sleep(0.1)
        # (A page held back by another tag's writer in flight is read again within 20 ms:
        # that writer's notification does not name this tailer's tag.)
        assert [w.events for w in watched] == [25, 25, 25, 25]
    finally:
        for w in watched:
            await w.stop()
