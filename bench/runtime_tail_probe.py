"""Tail probe: where the time of single asks goes, the slowest ones first (PostgreSQL, 1
outstanding ask, the default configuration), beside the floor's baselines under the same
conditions.

Asks one at a time to random entities of 1,000 (all activated first), each stage of every ask
timestamped on the machine's monotonic clock (which the processes share): the driver until the
Ray call is made (region client, pickling), the call's dispatch (``.remote()``), Ray to the
host, the host until the journal's append (unpickling, routing, deciding), the append (encoding
and PostgreSQL), the host after it (release, pickling), Ray back to the driver (until Ray's
callback thread has the reply), the driver's event loop waking, the ask's caller resuming. The
garbage collector's collections are timed in the driver and the host.

Beside every ask, in a random order, one call of each baseline: a no-op Ray actor call, a
one-row asyncpg transaction from the driver, and the two composed in one Ray call (an actor
that runs the one-row transaction on its event loop, as a shard host runs its journal, without
lagompy). Interleaved, the asks and the baselines meet the same load of the shared machine,
which a run where each is measured apart does not give. Prints p50 / p99 of each stage, the
stages' median and worst over the slowest 1% of asks, which stage was furthest above its median
in each of them, the asks' and the composed call's sides at p50 and p99 (from the caller until
the actor's method begins, inside it, back until the caller resumes; and the asks' journal
append against the composed call's transaction), and the asks' p50 and p99 against the floor's
base (no-op p50 + one-row tx p50) and against the composed baseline. Prints only.

    .venv/bin/python bench/runtime_tail_probe.py --asks 2000 --rounds 3
"""

from __future__ import annotations

import asyncio
import gc
import pickle
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._counter import CounterEntity, Increment, NoopActor, Read
from bench._report import cpu_reference, probe_parser, probe_session
from bench._tail_actors import TracingHost, TracingHostAtRayNiceness, TxActor
from bench.runtime_bench import PG_URL
from lagompy import JournalSettings, start
from lagompy.runtime import _ray as ray_runtime

ENTITIES = 1_000
STAGES = (
    "driver -> call",
    "dispatch",
    "Ray -> host",
    "host before append",
    "append (PostgreSQL)",
    "host after append",
    "Ray -> driver",
    "driver loop wakes",
    "caller resumes",
)

#: Per host link (its id), per Ray call of the region, on the driver: start of the link's
#: send, ``.remote()`` returned, Ray's callback had the reply, the awaiting task resumed.
_CALLS: dict[int, list[list[float]]] = {}
#: The composed baseline's actor, and when each of its calls began and ended in the driver.
_COMPOSED: dict[str, Any] = {"actor": None, "calls": []}
#: The apps compared with --compare: label -> the class their hosts run.
HOSTS = {
    "default (hosts at niceness 0)": TracingHost,
    "hosts at Ray's niceness (15)": TracingHostAtRayNiceness,
}


def _patch() -> None:
    """Timestamp the region's Ray calls (``_RayHostLink._submit`` and ``_outcomes``, as they
    run, with the marks between)."""
    import ray.exceptions

    from lagompy.runtime._region import HostUnreachable

    def submit(self: Any, method: Any, *args: Any) -> Any:
        marks = [time.perf_counter()]
        _CALLS.setdefault(id(self), []).append(marks)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        ref = method.remote(*args)
        marks.append(time.perf_counter())

        def completed(result: Any, ref: Any = ref) -> None:
            marks.append(time.perf_counter())
            settle = ray_runtime._ray_settle()
            assert settle is not None  # the probe needs this Ray's completion rule
            loop.call_soon_threadsafe(ray_runtime._settle, settle, future, result)

        ref._on_completed(completed)
        return future

    async def outcomes(self: Any, answer: Any) -> Any:
        try:
            result = await answer
            _CALLS[id(self)][-1].append(time.perf_counter())
        except ray.exceptions.RayActorError as e:
            raise HostUnreachable(str(e)) from e
        return pickle.loads(result) if isinstance(result, bytes) else result

    ray_runtime._RayHostLink._submit = submit  # type: ignore[method-assign]
    ray_runtime._RayHostLink._outcomes = outcomes  # type: ignore[method-assign]


def pct(xs: list[float], q: float) -> float:
    """The ``q`` quantile of seconds ``xs``, in ms."""
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * q))] * 1000


async def baselines(schema: str) -> dict[str, Callable[[], Awaitable[Any]]]:
    """The baselines, as calls to make beside the asks."""
    import ray

    noop: Any = ray.remote(NoopActor).options(max_concurrency=1).remote()
    actor: Any = ray.remote(TxActor).options(max_concurrency=1).remote(PG_URL, schema)
    conn = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
    await conn.execute("CREATE TABLE IF NOT EXISTS tx_driver (k bigserial, v bytea)")

    async def tx() -> None:
        async with conn.transaction():
            await conn.execute("INSERT INTO tx_driver (v) VALUES ($1)", b"x" * 40)

    async def ping() -> None:
        await noop.ping.remote(b"")

    async def composed() -> None:
        t0 = time.perf_counter()
        await actor.tx.remote(b"")
        _COMPOSED["calls"].append((t0, time.perf_counter()))

    _COMPOSED["actor"] = actor

    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "no-op Ray call": ping,
        "one-row tx": tx,
        "composed": composed,
    }
    for _ in range(50):
        for call in calls.values():
            await call()
    return calls


async def one_round(
    apps: dict[str, Any], asks: int, seed: int, others: dict[str, Callable[[], Awaitable[Any]]]
) -> dict[str, dict[str, float]]:
    """``asks`` asks to each app, each beside one call of every baseline, in a random order."""
    rng = random.Random(seed)
    prefix = {label: f"a{n}-e" for n, label in enumerate(apps)}
    beside: dict[str, list[float]] = {name: [] for name in others}
    asked: dict[str, list[tuple[float, float]]] = {label: [] for label in apps}
    gcs: list[tuple[float, float, int]] = []
    gc_start = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            gcs.append((gc_start[0], time.perf_counter(), info["generation"]))

    for entities in apps.values():
        await entities._links[0].handle.traces.remote()
    _CALLS.clear()
    await _COMPOSED["actor"].traces.remote()
    _COMPOSED["calls"].clear()
    gc.callbacks.append(on_gc)
    try:
        for _ in range(asks):
            for name in rng.sample([*others, *apps], len(others) + len(apps)):
                t0 = time.perf_counter()
                if name in apps:
                    entity = f"{prefix[name]}{rng.randrange(ENTITIES)}"
                    ref = apps[name].ref_for(CounterEntity, entity)
                    await ref.ask(Increment(), timeout=60)
                    asked[name].append((t0, time.perf_counter()))
                else:
                    await others[name]()
                    beside[name].append(time.perf_counter() - t0)
    finally:
        gc.callbacks.remove(on_gc)
    for name, xs in beside.items():
        print(f"  beside: {name:<20} p50 {pct(xs, 0.5):.2f} p99 {pct(xs, 0.99):.2f} ms")
    base = pct(beside["no-op Ray call"], 0.5) + pct(beside["one-row tx"], 0.5)
    out = {
        "composed": {
            "p50": pct(beside["composed"], 0.5) / base,
            "p99": pct(beside["composed"], 0.99) / base,
        }
    }
    composed_trace = await _COMPOSED["actor"].traces.remote()
    for label, entities in apps.items():
        link = entities._links[0]
        host = await link.handle.traces.remote()
        print(f"  {label}:")
        out[label] = _stages(asked[label], _CALLS[id(link)], host, gcs, base)
        _against_composed(asked[label], host["trace"], _COMPOSED["calls"], composed_trace)
    print(
        f"  against no-op p50 + one-row tx p50 ({base:.2f} ms): "
        + "; ".join(f"{k} p50 {v['p50']:.2f}x, p99 {v['p99']:.2f}x" for k, v in out.items())
    )
    return out


def _stages(
    asked: list[tuple[float, float]],
    calls: list[list[float]],
    host: dict[str, Any],
    gcs: list[tuple[float, float, int]],
    base: float,
) -> dict[str, float]:
    trace = host["trace"]
    assert len(trace) == len(calls) == len(asked), (len(trace), len(calls), len(asked))
    total: list[float] = []
    stages: dict[str, list[float]] = {k: [] for k in STAGES}
    odd: dict[int, int] = {}  # batches with other than one append: appends -> batches
    for (t0, t1), (call, remote, back, woke), h in zip(asked, calls, trace, strict=True):
        appends = h["appends"] or [(h["enter"], h["enter"])]
        a0, a1 = appends[0][0], appends[-1][1]
        if len(appends) != 1:
            odd[len(h["appends"])] = odd.get(len(h["appends"]), 0) + 1
        total.append(t1 - t0)
        for k, v in zip(
            STAGES,
            (
                call - t0,
                remote - call,
                h["enter"] - remote,
                a0 - h["enter"],
                a1 - a0,
                h["leave"] - a1,
                back - h["leave"],
                woke - back,
                t1 - woke,
            ),
            strict=True,
        ):
            stages[k].append(v)
    if odd:
        print(f"    batches with other than one journal append (appends: batches): {odd}")
    n = len(asked)
    slow = sorted(range(n), key=lambda i: total[i])[-max(1, n // 100) :]
    print(f"    {'':<22} {'p50':>6} {'p99':>6} {'slow 1%: median':>16} {'worst':>7}  (ms)")
    for k, xs in {"ask": total, **stages}.items():
        sl = [xs[i] * 1000 for i in slow]
        print(
            f"    {k:<22} {pct(xs, 0.5):6.2f} {pct(xs, 0.99):6.2f} "
            f"{statistics.median(sl):16.2f} {max(sl):7.2f}"
        )
    cpu = [h["cpu"] for h in trace]
    print(
        f"    host thread CPU per batch: p50 {pct(cpu, 0.5):.2f}, p99 {pct(cpu, 0.99):.2f}, "
        f"slow 1% median {statistics.median(cpu[i] for i in slow) * 1000:.2f} ms"
    )
    medians = {k: statistics.median(xs) for k, xs in stages.items()}
    furthest: dict[str, int] = {}
    for i in slow:
        k = max(medians, key=lambda k: stages[k][i] - medians[k])
        furthest[k] = furthest.get(k, 0) + 1
    print(f"    stage furthest above its median, in the slowest 1%: {furthest}")
    in_driver = [(b - a) * 1000 for a, b, _ in gcs]
    in_host = [(b - a) * 1000 for a, b, _ in host["gcs"]]
    during = sum(
        1 for i in slow if any(asked[i][0] <= g <= asked[i][1] for g, _, _ in gcs + host["gcs"])
    )
    print(
        f"    collections: driver {len(in_driver)} (longest {max(in_driver, default=0):.2f} "
        f"ms), host {len(in_host)} (longest {max(in_host, default=0):.2f} ms); during a slow "
        f"ask: {during}"
    )
    return {"p50": pct(total, 0.5) / base, "p99": pct(total, 0.99) / base}


def _against_composed(
    asked: list[tuple[float, float]],
    trace: list[dict[str, Any]],
    calls: list[tuple[float, float]],
    composed: list[tuple[float, float]],
) -> None:
    """Where the asks' time above the composed call's goes, p50 and p99 by side: from the caller
    until the actor's method begins, inside it (and the asks' journal append alone against
    the composed call's one-row transaction), from its end until the caller resumes."""
    ask_sides = {
        "to the actor": [h["enter"] - t0 for (t0, _), h in zip(asked, trace, strict=True)],
        "inside it": [h["leave"] - h["enter"] for h in trace],
        "back": [t1 - h["leave"] for (_, t1), h in zip(asked, trace, strict=True)],
    }
    composed_sides = {
        "to the actor": [e - t0 for (t0, _), (e, _) in zip(calls, composed, strict=True)],
        "inside it": [x - e for e, x in composed],
        "back": [t1 - x for (_, t1), (_, x) in zip(calls, composed, strict=True)],
    }
    appends = [h["appends"][-1][1] - h["appends"][0][0] for h in trace if h["appends"]]
    for q in (0.5, 0.99):
        parts = [
            f"{side} {pct(ask_sides[side], q):.2f} vs {pct(xs, q):.2f} "
            f"({pct(ask_sides[side], q) - pct(xs, q):+.2f})"
            for side, xs in composed_sides.items()
        ]
        print(
            f"    p{round(q * 100)} ms, ask vs composed call: " + "; ".join(parts) + "; the "
            f"append alone {pct(appends, q):.2f} vs the composed call's transaction "
            f"{pct(composed_sides['inside it'], q):.2f}"
        )


async def main() -> None:
    parser = probe_parser(__doc__, asks_help="asks per round and app", rounds=3)
    parser.add_argument(
        "--compare",
        action="store_true",
        help="beside the default, an app whose hosts stay at Ray's niceness (the code before)",
    )
    args = parser.parse_args()
    _patch()
    async with probe_session(PG_URL, "tail") as (schema, started):
        js = JournalSettings(url=PG_URL, postgres_schema=schema, auto_migrate=True)
        apps: dict[str, Any] = {}
        for n, (label, host_class) in enumerate(list(HOSTS.items())[: 2 if args.compare else 1]):
            ray_runtime.ShardHost = host_class  # type: ignore[attr-defined]
            apps[label] = entities = await start(
                app=f"tail-{uuid.uuid4().hex[:6]}", entities=[CounterEntity], journal_settings=js
            )
            started.append(entities)
            (ping,) = [await link.handle.ping.remote() for link in entities._links]
            print(f"{label}: host pid {ping['pid']}, niceness {ping.get('niceness')}")
            await asyncio.gather(
                *(
                    entities.ref_for(CounterEntity, f"a{n}-e{i}").ask(Read())
                    for i in range(ENTITIES)
                )
            )
            for i in range(200):
                await entities.ref_for(CounterEntity, f"a{n}-e{i}").ask(Increment())
        others = await baselines(schema)
        rounds = []
        for r in range(args.rounds):
            print(f"--- round {r + 1}: CPU reference {cpu_reference():.1f} ms")
            rounds.append(await one_round(apps, args.asks, seed=r, others=others))
        print("ratios to no-op p50 + one-row tx p50, every round:")
        for label in rounds[0]:
            for k in ("p50", "p99"):
                print(f"  {label} {k}: " + ", ".join(f"{r[label][k]:.2f}x" for r in rounds))


if __name__ == "__main__":
    asyncio.run(main())
