"""An entity for the journal-outage tests. A module of its own (not a test module) so that Ray's
worker processes import it by name, like ``ray_entities``."""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass, replace

import asyncpg
from ray_entities import Add, Added, Counter

from lagompy import Command, Effect, PersistentEntity


@dataclass(frozen=True)
class AddThenCutOff(Command[int]):
    """Add 1; after the commit, cut the journal's database off (``ALLOW_CONNECTIONS false``,
    its connections terminated) through ``admin_url``, then kill the host process before the
    reply leaves. The caller cannot know whether it was applied, and the restarted host cannot
    reach the journal to find out."""

    admin_url: str
    database: str
    token: str


OutageCommand = Add | AddThenCutOff


def cut_off_then_exit(admin_url: str, database: str) -> None:
    async def cut() -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                database,
            )
        finally:
            await conn.close()

    # The host runs this inside its own event loop: the cut gets a loop (and thread) of its own.
    cutter = threading.Thread(target=asyncio.run, args=(cut(),))
    cutter.start()
    cutter.join()
    os._exit(1)


class OutageCounter(PersistentEntity[OutageCommand, Added, Counter]):
    type_name = "outage-counter"
    initial_state = Counter()

    def on_command(self, state: Counter, command: OutageCommand) -> Effect[Counter]:
        match command:
            case Add(amount=amount, token=token):
                return Effect.persist(Added(amount, token)).then_reply(lambda s: s.value)
            case AddThenCutOff(admin_url=url, database=database, token=token):
                return (
                    Effect.persist(Added(1, token))
                    .then_run(lambda s: cut_off_then_exit(url, database))
                    .then_reply(lambda s: s.value)
                )
        return Effect.unhandled()

    def on_event(self, state: Counter, event: Added) -> Counter:
        return replace(state, value=state.value + event.amount)
