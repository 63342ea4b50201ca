"""Topics over NATS JetStream, on PostgreSQL and SQLite, with default settings, on a nats-server
of the bench's own (a free loopback port, a temporary file store), each figure beside its
baseline measured in the same run:

* producer throughput, journal -> JetStream (``start_producers`` with a ``NatsTransport``,
  defaults: 1,000 events per page, 1,000 publications in flight): messages/s from start until
  every partition's producer position reaches the journal's head, beside raw nats-py
  ``publish_async`` of the same payloads and headers with the same in-flight bound into a
  stream of the same shape (floor: >= 0.5);
* catch-up of a new subscriber group over the published messages (a subscriber that writes
  nothing but its positions), beside reading and decoding the same events from the journal
  (floor: >= 0.5);
* lag from commit to handled under 2,000 events/s of live load, through producers and broker
  (floor: p99 <= 100 ms).

    .venv/bin/python bench/topics_nats_bench.py                 # prints
    .venv/bin/python bench/topics_nats_bench.py --runs 3 --write   # also writes docs/benchmarks.md
    .venv/bin/python bench/topics_nats_bench.py --quick         # 10,000 events, 3 s of load
    .venv/bin/python bench/topics_nats_bench.py --catch-up 3    # only the catch-up, 3 times

The producers and the subscriber run in the benchmark's process as they run in a service's
process under ``lagompy run``: with the collector tuned once it has started
(``lagompy.tune_collector``; ``--default-gc`` leaves Python's). Reading and decoding, the
baseline, runs in the same process.

``--catch-up N`` publishes once (through the producers), then runs N catch-ups of new groups,
each between two readings of the floor's baseline (reading and decoding the journal, right
before and right after it: the ratio is over the mean of their times) and after nats-py reading
the same stream alone: for profiling the subscriber's path
(``py-spy record -- .venv/bin/python bench/topics_nats_bench.py --catch-up 5``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import topics_bench
from bench._report import cpu_reference, write_section
from bench.topics_bench import Writer, backend, lag, serializer
from lagompy import JournalSettings, open_storage
from lagompy._collector import tune_collector
from lagompy.journal import Journal
from lagompy.testkit.nats import nats_server
from lagompy.testkit.topics import contract_topic
from lagompy.topic._codec import encode_payload
from lagompy.topic._nats import BrokerSettings, NatsTransport
from lagompy.topic._nats_wire import _headers
from lagompy.topic._producers import start_producers


async def raw_publish(url: str, journal: Journal, in_flight: int) -> tuple[float, float]:
    """nats-py publish_async of the topic's messages (payloads and headers made beforehand),
    at most ``in_flight`` unacknowledged, into a fresh stream; then nats-py reading them back
    with pull requests of 1,000, doing nothing with them: (published/s, read/s)."""
    import nats

    messages = []
    for p, tag in enumerate(contract_topic.tag.all_tags):
        after = 0
        while True:
            page = await journal.read_tag(tag, after_offset=after, limit=1000)
            for envelope in page.envelopes:
                m = contract_topic.message(envelope, p)
                if m is not None:
                    data = encode_payload(contract_topic, m.payload)
                    headers = _headers(m, contract_topic.media_type)
                    messages.append((f"raw.{contract_topic.name}.{p}", data, headers))
            after = page.last_offset
            if not page.full:
                break
    nc = await nats.connect(url)
    try:
        js = nc.jetstream(publish_async_max_pending=in_flight)
        name = f"raw_{uuid.uuid4().hex[:6]}"
        await js.add_stream(name=name, subjects=[f"raw.{contract_topic.name}.*"])
        started = time.perf_counter()
        futures = [await js.publish_async(s, d, headers=h) for s, d, h in messages]
        await asyncio.gather(*futures)
        elapsed = time.perf_counter() - started
        read = await _raw_read(nc, js, name, len(messages))
        await js.delete_stream(name)
    finally:
        await nc.close()
    return len(messages) / elapsed, read


async def _raw_read(nc: Any, js: Any, stream: str, count: int, name: str = "raw") -> float:
    """nats-py reading ``count`` messages of ``stream`` (all its subjects) with a consumer
    ``name`` of its own and pull requests of 1,000, acking each 1,000th: msg/s."""
    from nats.js import api

    await js.add_consumer(stream, api.ConsumerConfig(name=name, ack_policy=api.AckPolicy.ALL))
    inbox = nc.new_inbox()
    ask = json.dumps({"batch": 1000, "expires": int(10e9)}).encode()
    done = asyncio.Event()
    got = 0

    async def received(msg: Any) -> None:
        nonlocal got
        if msg.headers and msg.headers.get("Status"):
            return
        got += 1
        if got % 1000 == 0:
            await msg.ack()
            await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}", ask, reply=inbox)
        if got >= count:
            done.set()

    sub = await nc.subscribe(inbox, cb=received)
    started = time.perf_counter()
    await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}", ask, reply=inbox)
    await asyncio.wait_for(done.wait(), 600)
    elapsed = time.perf_counter() - started
    await sub.unsubscribe()
    await js.delete_consumer(stream, name)
    return count / elapsed


async def produce(url: str, journal: Journal, events: int) -> tuple[float, NatsTransport]:
    """Start the producers; messages/s until every partition's position is at the head.

    The positions are the producers' own (each moves once its stored position commits), read
    every 10 ms; the stored rows are checked once at the end. (Polling the full status, whose
    journal lag and parked counts are several SQL reads, every 10 ms cost the producers' process
    ~10% of its CPU per message, 64-66 against 58-60 us, 2026-12-07: the observer slowed what it
    measured.)"""
    transport = NatsTransport(BrokerSettings(url=url), journal=journal)
    started = time.perf_counter()
    producers = await start_producers([contract_topic], transport)
    try:
        target = await _heads(journal)
        running = list(producers.producers.values())
        while True:
            at = {getattr(p, "tag", ""): getattr(p, "offset", -1) for p in running}
            if all(at.get(t, -1) >= h for t, h in target.items()):
                break
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        stored = {s.tag: s.offset for s in await producers.status()}
        assert all(stored.get(t, -1) >= h for t, h in target.items()), (stored, target)
    except BaseException:
        await producers.close()
        raise
    transport._producers = producers  # type: ignore[attr-defined]
    return events / elapsed, transport


async def _heads(journal: Journal) -> dict[str, int]:
    from lagompy.topic._embedded import partition_position
    from lagompy.topic._topic import StartFrom

    return {
        tag: await partition_position(journal.database, tag, StartFrom.latest())
        for tag in contract_topic.tag.all_tags
    }


async def bracketed(
    journal: Journal, settings: JournalSettings, url: str, events: int
) -> tuple[float, float]:
    """(read and decode, catch-up) in events and messages/s: topics_bench's catch-up between
    two readings of its baseline, over a NATS transport of its own."""
    transport = NatsTransport(BrokerSettings(url=url))
    try:
        b = await topics_bench.bracketed(journal, settings, transport, events)
    finally:
        await transport.close()
    return b.baseline, b.rate


async def run_backend(name: str, events: int, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lagompy-bench-") as tmp:
        async with backend(name, Path(tmp)) as settings, nats_server() as server:
            async with await open_storage(settings=settings, serializer=serializer()) as storage:
                writer = Writer(storage.journal)
                for first in range(0, events, 1000):
                    await writer.append(first, min(1000, events - first))
                if topics_bench.TUNED:  # as `lagompy run` tunes a service's process
                    tune_collector()
                cpu = cpu_reference()
                raw, raw_read = await raw_publish(
                    server.url, storage.journal, BrokerSettings().max_in_flight
                )
                produced, transport = await produce(server.url, storage.journal, events)
                print(
                    f"[{name}] producers {produced:,.0f} msg/s, raw publish_async {raw:,.0f} "
                    f"msg/s: {produced / raw:.2f}",
                    flush=True,
                )
                decode, caught = await bracketed(storage.journal, settings, server.url, events)
                print(
                    f"[{name}] catch-up {caught:,.0f} msg/s, read and decode {decode:,.0f} "
                    f"events/s: {caught / decode:.2f} (nats-py reading alone: {raw_read:,.0f} "
                    f"msg/s, {raw_read / decode:.2f})",
                    flush=True,
                )
                subscriber_transport = NatsTransport(BrokerSettings(url=server.url))
                try:
                    r = await lag(settings, writer, subscriber_transport, events, seconds, 2000)
                finally:
                    await subscriber_transport.close()
                    await transport._producers.close()  # type: ignore[attr-defined]
                    await transport.close()
                print(
                    f"[{name}] lag at {r['rate']:,.0f} events/s: p50 {r['p50']:.1f} ms, "
                    f"p99 {r['p99']:.1f} ms ({r['events']:,} messages); CPU ref {cpu:.0f} ms",
                    flush=True,
                )
                return {
                    "backend": name,
                    "cpu": cpu,
                    "produced": produced,
                    "raw": raw,
                    "raw_read": raw_read,
                    "caught": caught,
                    "decode": decode,
                    **r,
                }


async def catch_up_only(name: str, events: int, times: int) -> None:
    """Publish once, then ``times`` catch-ups of new groups, each after reading and decoding
    the journal and nats-py reading the topic's stream alone (the same messages, position
    markers included)."""
    import nats

    from lagompy.topic._nats import stream_name

    with tempfile.TemporaryDirectory(prefix="lagompy-bench-") as tmp:
        async with backend(name, Path(tmp)) as settings, nats_server() as server:
            async with await open_storage(settings=settings, serializer=serializer()) as storage:
                writer = Writer(storage.journal)
                for first in range(0, events, 1000):
                    await writer.append(first, min(1000, events - first))
                if topics_bench.TUNED:  # as `lagompy run` tunes a service's process
                    tune_collector()
                _, transport = await produce(server.url, storage.journal, events)
                await transport._producers.close()  # type: ignore[attr-defined]
                await transport.close()
                stream = stream_name(BrokerSettings().stream_prefix, contract_topic)
                nc = await nats.connect(server.url)
                try:
                    js = nc.jetstream()
                    stored = (await js.stream_info(stream)).state.messages
                    for i in range(times):
                        cpu = cpu_reference()
                        raw = await _raw_read(nc, js, stream, stored, f"raw{i}")
                        decode, caught = await bracketed(
                            storage.journal, settings, server.url, events
                        )
                        print(
                            f"[{name}] catch-up {caught:,.0f} msg/s, read and decode "
                            f"{decode:,.0f} events/s: {caught / decode:.2f} (the floor's ratio); "
                            f"nats-py alone {raw:,.0f} msg/s ({stored:,} stored): "
                            f"{caught / raw:.2f}; CPU ref {cpu:.0f} ms",
                            flush=True,
                        )
                finally:
                    await nc.close()


NOTES = """\
Notes. Every figure moves with the machine's load: the CPU reference and the raw baselines of
the same row say how loaded it was. Producers: a page's payloads are encoded in one call, each
time written out once per page, and its messages written as one run of commands whose answers
come to one inbox (not through nats-py's `publish_async`, the baseline: so they publish faster
than it, at the same in-flight bound). A new group's catch-up goes around nats-py's own
per-message path: the connection's parser splits a read of lagompy's own messages at them in
one call of the regex engine (every body checked against its control line's lengths) and hands
them to the feed in columns, which it decodes a column at a time (no nats-py message objects,
subscription queue, callback or header dict; reads of any other form go message by message),
the next pull request goes out once half of the current one has arrived (the broker sends while
the subscriber commits), and a batch is decoded at once with the collector paused. So the whole
catch-up, commits included, reads faster than nats-py reading the same messages and doing
nothing with them (the column beside it), and its ratio to the journal's read-and-decode moves
with that baseline, which varies most between runs.
The subscriber here keeps its positions in the journal's database: on SQLite the same file as
the writer at 2,000 events/s, and its producers poll that file (no NOTIFY), which is most of
SQLite's lag; on PostgreSQL the lag floor holds.
"""

HEADER = (
    "| run | backend | CPU ref | producers / raw publish_async (msg/s) "
    "| catch-up / read and decode (msg/s) | nats-py reading alone (msg/s, ratio) "
    "| load (events/s) | lag p50 / p99 |\n"
    "| ---: | --- | ---: | --- | --- | --- | ---: | --- |"
)


def _summary(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f}, worst {min(values):.2f}"


async def main(runs: int, quick: bool, write: bool) -> None:
    events, seconds = (10_000, 3.0) if quick else (100_000, 10.0)
    rows: list[dict[str, Any]] = []
    for run in range(runs):
        for name in ("postgres", "sqlite"):
            row = await run_backend(name, events, seconds)
            row["run"] = run + 1
            rows.append(row)
    if not write:
        return
    table = "\n".join(
        f"| {r['run']} | {r['backend']} | {r['cpu']:.0f} ms | {r['produced']:,.0f} / "
        f"{r['raw']:,.0f} = **{r['produced'] / r['raw']:.2f}** | {r['caught']:,.0f} / "
        f"{r['decode']:,.0f} = **{r['caught'] / r['decode']:.2f}** | {r['raw_read']:,.0f} "
        f"({r['raw_read'] / r['decode']:.2f}) | {r['rate']:,.0f} | "
        f"{r['p50']:.1f} / **{r['p99']:.1f}** ms |"
        for r in rows
    )
    lines = []
    for name in ("postgres", "sqlite"):
        mine = [r for r in rows if r["backend"] == name]
        lines.append(
            f"- {name}: producers/raw {_summary([r['produced'] / r['raw'] for r in mine])}; "
            f"catch-up/read {_summary([r['caught'] / r['decode'] for r in mine])}; lag p99 "
            f"worst {max(r['p99'] for r in mine):.1f} ms"
        )
    flag = (" --quick" if quick else "") + (f" --runs {runs}" if runs != 1 else "")
    flag += "" if topics_bench.TUNED else " --default-gc"
    body = f"""Command: `.venv/bin/python bench/topics_nats_bench.py{flag} --write`
({events:,} events; {seconds:g} s of load at 2,000 events/s for the lag). A nats-server of the
bench's own (file store, loopback); default settings everywhere. Floors: producers >= 0.5 of
raw `publish_async` (same payloads, headers and in-flight bound, same run); catch-up of a new
group >= 0.5 of reading and decoding the same events from the journal (same run); lag p99
<= 100 ms. CPU ref: `sum(range(10**6))`, best of 5, in ms, as in the other sections.
{topics_bench.COLLECTORS[topics_bench.TUNED].replace("Both processes'", "The process's")}

{HEADER}
{table}

{chr(10).join(lines)}

{NOTES}"""
    write_section("topics-nats", "Topics over NATS JetStream", body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--catch-up", type=int, default=0, metavar="N")
    parser.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--default-gc", action="store_true", help="Python's default collector")
    args = parser.parse_args()
    topics_bench.TUNED = not args.default_gc
    if args.catch_up:
        asyncio.run(catch_up_only(args.backend, 10_000 if args.quick else 100_000, args.catch_up))
    else:
        asyncio.run(main(args.runs, args.quick, args.write))
