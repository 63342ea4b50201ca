"""One member of tests/test_rebalance.py's read side in a process of its own.

    python tests/rebalance_member.py <journal url> [<postgres schema>]

Prints its member name once its workers start, then runs until SIGTERM (a clean stop: its
leases released, its membership left) or until it is killed.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from readside_processors import SpreadCredits

from lagompy import JournalSettings
from lagompy.readside import start_readside
from lagompy.testkit.readside import readside_contract_serializer


async def main(url: str, schema: str | None) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with start_readside(
        [SpreadCredits],
        journal_settings=JournalSettings(url=url, postgres_schema=schema),
        serializer=readside_contract_serializer(),
        lease_ttl=2.0,
        renew_interval=0.2,
        max_batch=20,
    ) as readside:
        print(readside.member, flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None))
