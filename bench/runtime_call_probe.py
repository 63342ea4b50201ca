"""Call probe: what one one-ask batch costs a shard host when each is a Ray call of its own,
against the same batches run one after the other inside one call (PostgreSQL, the default
configuration, 1 outstanding ask).

Asks one at a time to random entities of 1,000 (all activated first), in chunks of 100, each
chunk followed by 100 batches of one ask packed as the region packs them and run inside one
Ray call (``CallProbeHost.looped``), so that both meet the same load of the shared machine.
Between the asks, in a random order, a one-row transaction (BEGIN, INSERT, COMMIT) that the
host runs on the journal's own write connection, on its own event loop, as it runs a batch.
Prints, p50 in ms: the host thread's CPU time per batch (``time.thread_time``) and in the
journal append, the append's wall time beside the raw transaction's, and what the host's
process spent between two calls (its actor thread: Ray's handling of a call; its other
threads). Prints only.

    .venv/bin/python bench/runtime_call_probe.py --asks 2000 --rounds 2
"""

from __future__ import annotations

import asyncio
import pickle
import random
import sys
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._counter import CounterEntity, Increment, Read
from bench._report import cpu_reference, probe_parser, probe_session
from bench._tail_actors import CallProbeHost
from bench.runtime_bench import PG_URL
from lagompy import JournalSettings, start
from lagompy.runtime import _ray as ray_runtime
from lagompy.runtime._processing import Request

ENTITIES = 1_000
CHUNK = 100


def p50(xs: list[float]) -> float:
    """The median of seconds ``xs``, in ms."""
    s = sorted(xs)
    return s[len(s) // 2] * 1000 if s else float("nan")


async def one_round(entities: Any, asks: int, rng: random.Random) -> None:
    host = entities._links[0].handle
    key = entities.topology.key
    per_call: list[dict[str, float]] = []
    looped: list[dict[str, float]] = []
    raw: list[float] = []
    made = 0
    for _ in range(max(1, asks // CHUNK)):
        await host.measured.remote()
        for _ in range(CHUNK):
            for what in rng.sample(("ask", "raw"), 2):
                if what == "ask":
                    ref = entities.ref_for(CounterEntity, f"e{rng.randrange(ENTITIES)}")
                    await ref.ask(Increment())
                else:
                    await host.raw_tx.remote()
        got = await host.measured.remote()
        per_call += got["batches"]
        raw += got["raw_tx"]
        packs = []
        for _ in range(CHUNK):
            made += 1
            request = Request(
                CounterEntity.type_name,
                f"e{rng.randrange(ENTITIES)}",
                Increment(),
                f"{uuid.uuid4().hex[:16]}{made:016x}",
                False,
            )
            packs.append(pickle.dumps((key, [tuple(request)]), pickle.HIGHEST_PROTOCOL))
        await host.looped.remote(packs)
        looped += (await host.measured.remote())["batches"]
    between = [r for r in per_call if "ray_thread" in r]
    print(
        f"  one-ask batch, host thread CPU: {p50([r['cpu'] for r in per_call]):.3f} ms as a Ray "
        f"call of its own, {p50([r['cpu'] for r in looped]):.3f} inside one call; of it in the "
        f"append {p50([r['append_cpu'] for r in per_call]):.3f} and "
        f"{p50([r['append_cpu'] for r in looped]):.3f}"
    )
    print(
        f"  the host's process between two calls, CPU: actor thread (Ray's handling) "
        f"{p50([r['ray_thread'] for r in between]):.3f}, other threads "
        f"{p50([r['ray_others'] for r in between]):.3f}"
    )
    print(
        f"  wall: the append {p50([r['append_wall'] for r in per_call]):.3f} (inside one call "
        f"{p50([r['append_wall'] for r in looped]):.3f}); a one-row transaction on the same "
        f"connection {p50(raw):.3f}"
    )


async def main() -> None:
    args = probe_parser(__doc__, asks_help="asks per round", rounds=2).parse_args()
    async with probe_session(PG_URL, "callprobe") as (schema, apps):
        ray_runtime.ShardHost = CallProbeHost  # type: ignore[attr-defined]
        js = JournalSettings(url=PG_URL, postgres_schema=schema, auto_migrate=True)
        entities = await start(
            app=f"call-{uuid.uuid4().hex[:6]}", entities=[CounterEntity], journal_settings=js
        )
        apps.append(entities)
        await asyncio.gather(
            *(entities.ref_for(CounterEntity, f"e{i}").ask(Read()) for i in range(ENTITIES))
        )
        for i in range(200):
            await entities.ref_for(CounterEntity, f"e{i}").ask(Increment())
        rng = random.Random(1)
        for r in range(args.rounds):
            print(f"--- round {r + 1}: CPU reference {cpu_reference():.1f} ms")
            await one_round(entities, args.asks, rng)
        print(f"CPU reference after: {cpu_reference():.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
