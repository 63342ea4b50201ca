"""Register and rename a user through the entity API, on the embedded SQLite journal.

Run it from the repository root:  .venv/bin/python -m examples.user_service.demo
The journal is ./user_service.db unless LAGOMPY_JOURNAL_URL names another database.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid

from examples.user_service.entity import ChangeName, RegisterUser, UserEntity
from lagompy import InvalidCommand, start_in_process


async def main() -> None:
    url = os.environ.get("LAGOMPY_JOURNAL_URL", "sqlite:///user_service.db")
    user_id = f"user-{uuid.uuid4().hex[:8]}"
    async with start_in_process(entities=[UserEntity], journal_url=url) as entities:
        print(f"journal: {entities.storage.database.describe()}")
        user = entities.ref_for(UserEntity, user_id)

        state = await user.ask(RegisterUser("Ada Lovelace", "ada@example.org"))
        print(f"registered: {state}")
        state = await user.ask(ChangeName("Ada King"))
        print(f"renamed:    {state}")
        try:
            await user.ask(RegisterUser("Ada", "ada@example.org"))
        except InvalidCommand as rejection:
            print(f"rejected:   {rejection}")

        print(f"events of {UserEntity.type_name}/{user_id} in the journal:")
        for envelope in await entities.storage.journal.events(UserEntity.type_name, user_id):
            e = envelope
            print(f"  #{e.seq_nr} offset {e.offset} tags {e.tags}: {e.event}")

    # A fresh process would recover the same state from the journal:
    async with start_in_process(entities=[UserEntity], journal_url=url) as entities:
        recovered = await entities.processor.activate(UserEntity.type_name, user_id)
        print(f"recovered:  {recovered.state} at sequence number {recovered.seq_nr}")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
