"""Node loss on a simulated multi-node Ray cluster, as a process of its own.

Run by ``tests/test_node_loss.py`` (``python -m tests.node_loss_scenario --journal LABEL URL
[SCHEMA] ...``): a ``ray.cluster_utils.Cluster`` has to own the Ray of its process, so it cannot
share the test session's Ray. Each ``--journal`` runs the scenario in turn on the same cluster
(starting one costs seconds), a new worker node replacing the one the last scenario removed.
The head node has no CPUs and three worker nodes one CPU each; two shard hosts reserve one CPU
each, so they run on two different worker nodes and the third is free.

Under load (asks with command ids, each carrying its id in the event), the worker node running
host 0 is removed without a graceful shutdown. Ray restarts host 0 on the free node; the region
resends the batches that were in flight. Checked, with the outcome printed as one JSON line
per journal:

* asks for host 0's entities succeed again within 30 s of the removal;
* every acknowledged command is in the journal exactly once, and no command twice (asks whose
  outcome stayed unknown are asked again with the same id, which reveals it);
* every entity's state equals a replay of its journal;
* no lagompy actor of the app is left behind.

Exit status 0 when all of that holds on every journal, 1 (with the reasons on stderr)
otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections import Counter
from typing import Any

ENTITIES = 40
CONCURRENCY = 48
RECOVERY_LIMIT = 30.0
#: asks on the lost host's entities acknowledged before its node is removed, at least
WARM_ASKS = 100


async def scenario(
    cluster: Any,
    workers: list[Any],
    args: argparse.Namespace,
    label: str,
    url: str,
    schema: str | None,
) -> dict[str, Any]:
    import ray

    import lagompy
    from lagompy.errors import LagompyError, OutcomeUnknown
    from lagompy.journal import open_storage
    from lagompy.runtime import shutdown_app
    from lagompy.runtime._sharding import host_of
    from tests.ray_entities import Add, CounterEntity, GetValue

    app = f"node-loss-{uuid.uuid4().hex[:8]}"
    journal: dict[str, Any] = {"auto_migrate": True}
    if schema:
        journal["postgres_schema"] = schema
    entities = await lagompy.start(
        app=app,
        entities=[CounterEntity],
        journal_url=url,
        hosts=2,
        shards=16,
        host_num_cpus=1,
        retries=40,
        retry_backoff=0.25,
        retry_backoff_max=1.0,
        start_timeout=120,
        **journal,
    )
    shards, hosts = entities.topology.shards, entities.topology.hosts
    ids = [f"n{i}" for i in range(ENTITIES)]
    on_lost_host = {e for e in ids if host_of(e, shards, hosts) == 0}
    assert on_lost_host and len(on_lost_host) < ENTITIES, "both hosts need entities"

    acknowledged: dict[str, str] = {}  # command id -> entity
    unknown: dict[str, str] = {}
    errors: Counter[str] = Counter()
    removed_at: float | None = None
    moved_at: float | None = None  # when host 0 first answered from another node
    back_at: float | None = None  # first success, after the move, of an ask on host 0
    slowest_after_removal = 0.0  # the longest ask on host 0 sent after the removal
    stop = asyncio.Event()

    async def load(worker: int) -> None:
        nonlocal back_at, slowest_after_removal
        n = 0
        while not stop.is_set():
            entity = ids[(worker + n * CONCURRENCY) % ENTITIES]
            n += 1
            cid = uuid.uuid4().hex
            sent = time.monotonic()
            try:
                await entities.ref_for(CounterEntity, entity).ask(
                    Add(1, token=cid), command_id=cid, timeout=90
                )
            except OutcomeUnknown:
                unknown[cid] = entity
                continue
            except LagompyError as e:
                errors[type(e).__name__] += 1
                unknown[cid] = entity  # may or may not have been applied: find out below
                await asyncio.sleep(0.05)
                continue
            acknowledged[cid] = entity
            if removed_at is not None and sent > removed_at and entity in on_lost_host:
                now = time.monotonic()
                slowest_after_removal = max(slowest_after_removal, now - sent)
                if back_at is None and moved_at is not None and sent > moved_at:
                    back_at = now

    async def node_of(handle: Any) -> str:
        node: str = await handle.__ray_call__.remote(
            lambda _self: ray.get_runtime_context().get_node_id()
        )
        return node

    host0 = ray.get_actor("host-0", namespace=entities.namespace)
    node_of_host0 = await node_of(host0)
    victim = next(w for w in workers if w.node_id == node_of_host0)

    async def watch_host0() -> None:
        # The old process may answer for a while after its node is gone (a zombie): host 0
        # has moved when it answers from another node.
        nonlocal moved_at
        while not stop.is_set():
            try:
                node = await asyncio.wait_for(node_of(host0), 5)
            except Exception:
                node = None  # dead or restarting: ask again
            if node is not None and node != node_of_host0:
                moved_at = time.monotonic()
                return
            await asyncio.sleep(0.1)

    tasks = [asyncio.create_task(load(w)) for w in range(CONCURRENCY)]
    try:
        # Load until both hosts have acknowledged asks (the lost one's entities too), for at
        # least --warmup seconds: polled, not a fixed wait that a loaded machine may not fill.
        warm_until = time.monotonic() + args.warmup
        while time.monotonic() < warm_until or (
            sum(1 for e in acknowledged.values() if e in on_lost_host) < WARM_ASKS
            and time.monotonic() < warm_until + 60
        ):
            await asyncio.sleep(0.05)
        before = len(acknowledged)
        removed_at = time.monotonic()
        cluster.remove_node(victim, allow_graceful=False)
        tasks.append(asyncio.create_task(watch_host0()))
        deadline = removed_at + RECOVERY_LIMIT + 30
        while back_at is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if back_at is not None:
            await asyncio.sleep(args.after)  # more load on the recovered host
    finally:
        stop.set()
        await asyncio.gather(*tasks)

    # Asks whose outcome stayed unknown: the same id again reveals it (applied at most once).
    for cid, entity in list(unknown.items()):
        await entities.ref_for(CounterEntity, entity).ask(
            Add(1, token=cid), command_id=cid, timeout=90
        )
        acknowledged[cid] = entity
    values = {e: await entities.ref_for(CounterEntity, e).ask(GetValue(), timeout=60) for e in ids}
    node_after = await node_of(host0)
    host_stats = await entities.host_stats()
    region_stats = entities.stats()
    await entities.close()

    storage = await open_storage(url, entities=[CounterEntity], **journal)
    try:
        tokens: Counter[str] = Counter()
        replayed: dict[str, int] = {}
        for e in ids:
            events = await storage.journal.events("counter", e)
            assert [ev.seq_nr for ev in events] == list(range(1, len(events) + 1)), e
            replayed[e] = sum(ev.event.amount for ev in events)
            tokens.update(ev.event.token for ev in events)
    finally:
        await storage.close()
    stopped = await shutdown_app(app)
    left = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == entities.namespace
    ]

    twice = [t for t, n in tokens.items() if n > 1]
    missing = [cid for cid in acknowledged if tokens[cid] != 1]
    wrong = {e: (values[e], replayed[e]) for e in ids if values[e] != replayed[e]}
    assert removed_at is not None
    recovery = None if back_at is None else round(back_at - removed_at, 2)
    summary = {
        "journal": label,
        "acknowledged": len(acknowledged),
        "acknowledged_before_removal": before,
        "unknown_then_asked_again": len(unknown),
        "errors": dict(errors),
        "recovery_seconds": recovery,
        "moved_after_seconds": None if moved_at is None else round(moved_at - removed_at, 2),
        "slowest_ask_after_removal_seconds": round(slowest_after_removal, 2),
        "host0_moved": node_after != node_of_host0,
        "resends": region_stats["resends"],
        "events": sum(tokens.values()),
        "twice": twice[:5],
        "missing": missing[:5],
        "state_differs_from_replay": wrong,
        "hosts_stopped": stopped,
        "actors_left": left,
        "host_activations": [h.get("activations") for h in host_stats],
    }
    print(json.dumps(summary), flush=True)
    problems = []
    if before == 0:
        problems.append("no ask was acknowledged before the removal")
    if recovery is None or recovery > RECOVERY_LIMIT:
        problems.append(
            f"asks on the lost node's host did not succeed again within 30 s: {recovery}"
        )
    if not summary["host0_moved"]:
        problems.append("host 0 did not move to another node")
    if twice:
        problems.append(f"commands persisted twice: {twice[:5]}")
    if missing:
        problems.append(f"acknowledged commands not in the journal exactly once: {missing[:5]}")
    if wrong:
        problems.append(f"states differ from a replay: {wrong}")
    if left:
        problems.append(f"actors left behind: {left}")
    if problems:
        raise AssertionError("; ".join(problems))
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--journal",
        action="append",
        nargs="+",
        required=True,
        metavar="LABEL URL [SCHEMA]",
        help="a journal to run the scenario on (its label, URL, PostgreSQL schema); repeated: "
        "one scenario after the other on the same cluster, a new worker node added in place "
        "of the one each removes",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help=f"seconds of load before, at least (and until {WARM_ASKS} asks on host 0 succeeded)",
    )
    parser.add_argument(
        "--after", type=float, default=1.0, help="seconds of load on the recovered host"
    )
    parser.add_argument(
        "--health-check-period-ms",
        type=int,
        default=1000,
        help="Ray's node health check period (0: Ray's default, 3000 ms with 5 misses)",
    )
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from lagompy.runtime._ray_cluster import job_config

    head: dict[str, Any] = {"num_cpus": 0, "include_dashboard": False}
    if args.health_check_period_ms:
        # How fast Ray declares a silent node dead, and so restarts its actors elsewhere:
        # about failure_threshold x period after the node stops answering.
        head["_system_config"] = {
            "health_check_period_ms": args.health_check_period_ms,
            "health_check_failure_threshold": 3,
        }
    failed = 0
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        for _ in range(3):  # started side by side, then waited for together
            cluster.add_node(num_cpus=1, wait=False)
        cluster.wait_for_nodes()
        # The job's path (no runtime_env): actors restarted on another node after the loss
        # take that node's ready workers instead of waiting for a new one.
        ray.init(address=cluster.address, job_config=job_config(), log_to_driver=False)
        for i, (label, url, *schema) in enumerate(args.journal):
            if i:  # three worker nodes again: the last scenario removed one
                cluster.add_node(num_cpus=1)
                cluster.wait_for_nodes()
            workers = list(cluster.worker_nodes)
            try:
                asyncio.run(scenario(cluster, workers, args, label, url, (schema or [None])[0]))
            except AssertionError as e:
                print(f"node loss scenario failed on {label}: {e}", file=sys.stderr, flush=True)
                failed += 1
    finally:
        ray.shutdown()
        cluster.shutdown()  # type: ignore[no-untyped-call]
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
