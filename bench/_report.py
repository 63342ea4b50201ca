"""Write one benchmark's section of docs/benchmarks.md, leaving the other sections alone; the
CPU reference every bench prints beside its numbers; the local Ray the runtime's benches
start; and the options the runtime's probes share."""

from __future__ import annotations

import argparse
import contextlib
import platform
import re
import timeit
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"

_HEADER = """# Benchmarks

Numbers measured on the project's 2-core development machine, each section with the command that
produced it (run from the repository root with the virtual environment's Python). Ratios are
measured in one run, contender beside baseline, because the machine is noisy. Rerun a benchmark
to refresh its section.
"""


def cpu_reference() -> float:
    """Milliseconds for ``sum(range(10**6))``, best of 5: how fast this machine's CPU is right
    now (a shared VM's varies with the other work and from day to day), printed beside every
    bench's numbers so that runs can be read against each other."""
    return min(timeit.repeat("sum(range(10**6))", number=1, repeat=5)) * 1000


def write_section(key: str, title: str, body: str) -> None:
    start, end = f"<!-- bench:{key}:start -->", f"<!-- bench:{key}:end -->"
    stamp = (
        f"_Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node() or 'this machine'}"
        f" ({platform.python_implementation()} {platform.python_version()})._"
    )
    section = f"{start}\n## {title}\n\n{stamp}\n\n{body}\n{end}"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else ""
    if not text.startswith("# Benchmarks\n\nNumbers measured"):
        text = _HEADER
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    BENCHMARKS_MD.write_text(text)


def init_local_ray() -> None:
    """A Ray of this process's own (``address="local"``, never a stale cluster), with a small
    object store and no dashboard, as the runtime's benches and probes run on."""
    import ray

    ray.init(
        address="local",
        object_store_memory=256 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
    )


def probe_parser(doc: str | None, *, asks_help: str, rounds: int) -> argparse.ArgumentParser:
    """The options of a runtime probe (``--asks`` per round, ``--rounds``), described by the
    first paragraph of its module's ``doc``; the probe adds its own."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--asks", type=int, default=2000, help=asks_help)
    parser.add_argument("--rounds", type=int, default=rounds)
    return parser


@contextlib.asynccontextmanager
async def probe_session(pg_url: str, prefix: str) -> AsyncIterator[tuple[str, list[Any]]]:
    """A runtime probe's surroundings: a local Ray (:func:`init_local_ray`) and a new
    PostgreSQL schema named ``<prefix>_<hex>``. Yields the schema and a list: the apps
    (``start()``'s entities) the probe appends to it are closed with their actors at the end,
    then the schema is dropped and Ray shut down."""
    import asyncpg
    import ray

    init_local_ray()
    schema = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_url)
    await admin.execute(f"CREATE SCHEMA {schema}")
    apps: list[Any] = []
    try:
        yield schema, apps
    finally:
        for entities in apps:
            await entities.close(shutdown=True)
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()
        ray.shutdown()
