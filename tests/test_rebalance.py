"""Partitions spread over the members of a consumer (``lagompy.consumer.Membership``).

Several read sides of one processor (each a member, as a process would be) on one journal
and projection database: a member joining gets its share of the tags at a batch boundary, one
leaving (or dying) gives its tags back, and whatever the joins and leaves, every event is
handled exactly once and no two workers hold one tag. Both journal backends.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from readside_processors import SpreadCredits
from sqlalchemy import text

from lagompy import JournalSettings, sharded_tag
from lagompy.consumer import Membership, assign
from lagompy.journal import AtomicWrite, Storage, open_storage
from lagompy.readside import ReadSide, start_readside
from lagompy.readside._store import OffsetStore
from lagompy.testkit.readside import Credited, readside_contract_serializer

TAG = sharded_tag("rebalance-credits", shards=4)  # SpreadCredits.tag
TAGS = TAG.all_tags

#: Short leases: a dead member's tags come back within seconds.
SETTINGS: dict[str, Any] = {"lease_ttl": 2.0, "renew_interval": 0.2, "max_batch": 20}


async def until(check: Callable[[], Any], timeout: float, what: str) -> float:
    """Wait for ``check()`` (sync or async); returns the seconds it took."""
    start = time.monotonic()
    while True:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


class Writer:
    """Appends credits to 16 accounts (spread over the four tags) until stopped; keeps the
    offset of every event."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.offsets: list[int] = []
        self._seq: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def write(self, n: int) -> None:
        for _ in range(n):
            account = f"acct-{len(self.offsets) % 16}"
            seq = self._seq[account]
            write = AtomicWrite(
                "contract-account",
                account,
                seq,
                [Credited(account, 1)],
                [(TAG.for_entity(account),)],
            )
            (result,) = await self.storage.journal.append([write])
            self.offsets += [e.offset for e in result.unwrap()]
            self._seq[account] += 1

    def start(self, pause: float = 0.005) -> None:
        async def loop() -> None:
            while not self._stop.is_set():
                await self.write(2)
                await asyncio.sleep(pause)

        self._task = asyncio.create_task(loop())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


@pytest.fixture
async def storage(journal_settings: JournalSettings) -> AsyncIterator[Storage]:
    async with await open_storage(
        settings=journal_settings, serializer=readside_contract_serializer()
    ) as s:
        yield s


async def member(journal_settings: JournalSettings, **overrides: Any) -> ReadSide:
    return await start_readside(
        [SpreadCredits],
        journal_settings=journal_settings,
        serializer=readside_contract_serializer(),
        **{**SETTINGS, **overrides},
    )


def held(rs: ReadSide) -> set[str]:
    """The tags whose lease a worker of ``rs`` holds (as the worker believes)."""
    return {w.tag for w in rs.workers if w.lease is not None}


async def crash(rs: ReadSide) -> None:
    """End ``rs`` like a process killed between two transactions: its leases are not
    released and it does not leave (both expire after ``lease_ttl``). (Cancelling its tasks
    would leave a SQLite write transaction open in this process, which a kill does not.)"""

    async def keep(lease: Any, *, state: str = "stopped") -> bool:
        return False

    for w in rs.workers:
        w.store.release = keep  # type: ignore[method-assign]
    rs.memberships = []
    await rs.close()


async def caught_up(rs: ReadSide, writer: Writer) -> None:
    store = OffsetStore(rs.projection)

    async def done() -> bool:
        rows = {r.tag: r.offset for r in await store.rows(SpreadCredits.name)}
        return all(rows.get(t, 0) >= head for t, head in heads(writer).items())

    await until(done, 30, "every tag caught up")


def heads(writer: Writer) -> dict[str, int]:
    # Accounts rotate acct-0..15 from offset order: the n-th event went to acct-(n % 16).
    out: dict[str, int] = {}
    for n, offset in enumerate(writer.offsets):
        t = TAG.for_entity(f"acct-{n % 16}")
        out[t] = max(out.get(t, 0), offset)
    return out


async def handled(rs: ReadSide) -> list[int]:
    async with rs.projection.read() as conn:
        rows = await conn.execute(text("SELECT event_offset FROM contract_credits"))
        return sorted(int(r[0]) for r in rows)


# --------------------------------------------------------------------------- the targets


@given(
    partitions=st.sets(st.text(min_size=1, max_size=5), min_size=1, max_size=40),
    members=st.sets(st.text(min_size=1, max_size=8), min_size=1, max_size=10),
    shuffle=st.randoms(),
)
def test_targets_are_fair_and_deterministic(
    partitions: set[str], members: set[str], shuffle: random.Random
) -> None:
    targets = assign(sorted(partitions), sorted(members))
    assert set(targets) == partitions and set(targets.values()) <= members
    counts = Counter(targets.values())
    low, high = len(partitions) // len(members), -(-len(partitions) // len(members))
    assert all(low <= counts.get(m, 0) <= high for m in members)
    ps, ms = list(partitions), list(members)
    shuffle.shuffle(ps)
    shuffle.shuffle(ms)
    assert assign(ps, ms) == targets  # whatever order each member sees them in


async def test_one_heartbeat_per_interval_for_all_the_workers_of_a_member() -> None:
    class Store:
        beats = 0

        async def heartbeat(self, consumer: str, member: str, ttl: float) -> list[str]:
            self.beats += 1
            await asyncio.sleep(0.01)
            return ["a", "b"]

        async def leave(self, consumer: str, member: str) -> None:
            pass

    store = Store()
    m = Membership("c", TAGS, store, member="a", ttl=2.0, interval=0.2)
    targets = await asyncio.gather(*(m.target(t) for t in TAGS * 10))
    assert store.beats == 1
    assert targets[:4] == ["a", "b", "a", "b"]
    await asyncio.sleep(0.25)
    await m.target(TAGS[0])
    assert store.beats == 2


async def test_a_failing_heartbeat_keeps_the_last_view() -> None:
    class Store:
        fail = False

        async def heartbeat(self, consumer: str, member: str, ttl: float) -> list[str]:
            if self.fail:
                raise OSError("the database is unreachable")
            return ["a", "b"]

        async def leave(self, consumer: str, member: str) -> None:
            raise OSError("the database is unreachable")

    store = Store()
    m = Membership("c", TAGS, store, member="b", ttl=1.0, interval=0.01)
    assert await m.members() == ["a", "b"]
    store.fail = True
    await asyncio.sleep(0.02)
    assert await m.members() == ["a", "b"]
    await m.leave()  # logged, not raised: the member expires


# --------------------------------------------------------------------------- members


async def test_a_joining_member_gets_half_and_every_event_is_handled_once(
    journal_settings: JournalSettings, storage: Storage
) -> None:
    writer = Writer(storage)
    await writer.write(40)
    a = await member(journal_settings)
    running = [a]
    try:
        await until(lambda: held(a) == set(TAGS), 10, "the first member holds every tag")
        writer.start()
        b = await member(journal_settings)
        running.append(b)
        # The second member's share, within a few renew intervals (0.2 s each).
        took = await until(lambda: len(held(a)) == 2 and len(held(b)) == 2, 10, "two tags each")
        print(f"joined: two tags each after {took:.2f} s")
        assert took < 5.0, took
        assert held(a).isdisjoint(held(b))
        members = await OffsetStore(a.projection).members(SpreadCredits.name)
        assert {m.member: set(m.tags) for m in members} == {
            a.member: held(a),
            b.member: held(b),
        }
        await asyncio.sleep(0.3)  # events keep coming while both hold two tags
        # Each process waits for every tag, the other's too (its own workers of those stand by).
        await a.wait_until_caught_up(timeout=20)
        await b.wait_until_caught_up(timeout=20)
        # The second leaves: the first gets its tags back (a clean leave: at once).
        await b.close()
        running.remove(b)
        took = await until(lambda: held(a) == set(TAGS), 10, "the first holds every tag again")
        print(f"left: every tag back after {took:.2f} s")
        assert took < 5.0, took
        await writer.stop()
        await caught_up(a, writer)
        assert await handled(a) == sorted(writer.offsets)  # each exactly once
        assert len(writer.offsets) > 40
    finally:
        await writer.stop()
        for rs in running:
            await rs.close()


async def test_a_dead_members_tags_come_back_within_a_lease_timeout(
    journal_settings: JournalSettings, storage: Storage
) -> None:
    writer = Writer(storage)
    a = await member(journal_settings)
    b = await member(journal_settings)
    try:
        writer.start()
        await until(lambda: len(held(a)) == 2 and len(held(b)) == 2, 10, "two tags each")
        await crash(b)  # no lease released, no leave
        took = await until(lambda: held(a) == set(TAGS), 10, "the survivor holds every tag")
        print(f"died: every tag back after {took:.2f} s")
        # A dead member's leases and membership both expire after lease_ttl (2 s).
        assert took < SETTINGS["lease_ttl"] + 3.0, took
        await writer.stop()
        await caught_up(a, writer)
        assert await handled(a) == sorted(writer.offsets)
    finally:
        await writer.stop()
        await b.close()
        await a.close()


@pytest.mark.parametrize("end", ["terminated", "killed"])
async def test_a_member_process_takes_half_and_gives_it_back(
    end: str, journal_settings: JournalSettings, storage: Storage
) -> None:
    # The second member is a real process: its share while it runs, every tag back to the
    # first when it stops (SIGTERM: it releases and leaves) or dies (SIGKILL: they expire).
    writer = Writer(storage)
    a = await member(journal_settings)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).parent / "rebalance_member.py"),
        str(journal_settings.url),
        journal_settings.postgres_schema or "",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        other = (await asyncio.wait_for(child.stdout.readline(), 60)).decode().strip()
        assert other and other != a.member
        writer.start()
        store = OffsetStore(a.projection)

        async def split() -> bool:
            found = {m.member: len(m.tags) for m in await store.members(SpreadCredits.name)}
            return found == {a.member: 2, other: 2}

        took = await until(split, 30, "two tags each")
        print(f"process joined: two tags each after {took:.2f} s")
        await asyncio.sleep(0.5)
        if end == "killed":
            child.kill()
        else:
            child.terminate()
        assert await child.wait() == (-signal.SIGKILL if end == "killed" else 0)
        took = await until(lambda: held(a) == set(TAGS), 15, "every tag back")
        print(f"process {end}: every tag back after {took:.2f} s")
        assert took < (5.0 if end == "killed" else 2.0), took
        await writer.stop()
        await caught_up(a, writer)
        assert await handled(a) == sorted(writer.offsets)  # each exactly once
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        await writer.stop()
        await a.close()


async def test_without_rebalance_a_second_member_stands_by(
    journal_settings: JournalSettings, storage: Storage
) -> None:
    a = await member(journal_settings, rebalance=False)
    b = await member(journal_settings, rebalance=False)
    try:
        await until(lambda: len(held(a)) + len(held(b)) == 4, 10, "every tag held")
        first = (held(a), held(b))
        await asyncio.sleep(1.0)
        assert (held(a), held(b)) == first
        assert await OffsetStore(a.projection).members() == []
    finally:
        await b.close()
        await a.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_joins_and_leaves_keep_one_worker_per_tag_and_exactly_once(
    seed: int, journal_settings: JournalSettings, storage: Storage
) -> None:
    rnd = random.Random(seed)
    writer = Writer(storage)
    live: list[ReadSide] = [await member(journal_settings)]
    dead: list[ReadSide] = []
    overlaps: list[str] = []
    stop = asyncio.Event()

    async def watch() -> None:
        # No tag is believed held by two running workers at once.
        while not stop.is_set():
            holders = Counter(
                w.tag
                for rs in list(live)
                for w in rs.workers
                if w.lease is not None and w.state in ("running", "preparing")
            )
            overlaps.extend(f"{t} x{n}" for t, n in holders.items() if n > 1)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        writer.start()
        for _ in range(6):
            await asyncio.sleep(rnd.uniform(0.1, 0.6))
            action = rnd.choice(["join", "join", "leave", "crash"]) if len(live) > 1 else "join"
            if action == "join" and len(live) < 3:
                live.append(await member(journal_settings))
            elif action in ("leave", "crash") and len(live) > 1:
                gone = live.pop(rnd.randrange(len(live)))
                if action == "crash":
                    await crash(gone)
                    dead.append(gone)
                else:
                    await gone.close()
        # The survivors settle on a fair share of every tag.
        share = -(-len(TAGS) // len(live))

        def settled() -> bool:
            tags = [t for rs in live for t in held(rs)]
            return sorted(tags) == sorted(TAGS) and all(len(held(rs)) <= share for rs in live)

        try:
            await until(settled, 15, f"{len(live)} members share the tags")
        except AssertionError:
            raise AssertionError(f"held: {[sorted(held(rs)) for rs in live]}") from None
        await writer.stop()
        await caught_up(live[0], writer)
        assert await handled(live[0]) == sorted(writer.offsets)
        assert overlaps == []
    finally:
        stop.set()
        await watcher
        await writer.stop()
        for rs in live + dead:
            await rs.close()
