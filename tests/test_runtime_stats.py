"""What the sharded runtime reports: the region client's view in this process, and every shard
host's counters, read over Ray from any attached process."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from ray_entities import Add, CounterEntity

from lagompy import start
from lagompy.runtime import shutdown_app
from lagompy.settings import JournalSettings


async def test_region_and_host_stats(ray_session: Any, tmp_path: object) -> None:
    app = f"stats-{uuid.uuid4().hex[:8]}"
    settings = JournalSettings(url=f"sqlite:///{tmp_path}/stats.db")
    entities = await start(
        app=app, entities=[CounterEntity], journal_settings=settings, hosts=1, shards=8
    )
    try:
        await asyncio.gather(
            *(entities.ref_for(CounterEntity, f"c{i % 20}").ask(Add(1)) for i in range(200))
        )
        region = entities.stats()
        assert region["asks"] == 200 and region["outstanding"] == 0
        assert region["queue_depth"] == [0] and region["in_flight"] == [0]
        assert 1 <= region["mean_batch"] <= 200 and region["max_batch_seen"] >= 1
        assert region["asks_per_second"] > 0
        latency = region["latency"]
        assert 0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"]

        (host,) = await entities.host_stats()
        assert host["live_entities"] == 20
        assert host["activations"] == 20
        assert host["commands"] >= 200 and host["events_persisted"] == 200
        for key in ("passivations", "conflicts", "duplicates", "write_transactions", "batches"):
            assert key in host
    finally:
        await entities.close()
        await shutdown_app(app)
