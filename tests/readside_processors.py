"""Read-side processors for the tests, in a module Ray workers can import by name."""

from __future__ import annotations

import os
from typing import Any, ClassVar

from sqlalchemy.ext.asyncio import AsyncConnection

from lagompy import sharded_tag
from lagompy.journal import EventEnvelope
from lagompy.testkit.readside import CreditsProjection


class PoisonedCredits(CreditsProjection):
    """CreditsProjection whose handler raises for the accounts in ``poison``."""

    name = "poisoned-credits"
    poison: ClassVar[set[str]] = set()

    async def handle(self, conn: AsyncConnection, envelope: EventEnvelope[Any]) -> None:
        if envelope.entity_id in type(self).poison:
            raise ValueError(f"account {envelope.entity_id} is poisoned")
        await super().handle(conn, envelope)


class ExitingCredits(CreditsProjection):
    """Kills its process (no clean-up at all) right after handling the event of the account
    named in LAGOMPY_TEST_DIE_AFTER, before the transaction commits."""

    name = "contract-credits"

    async def handle(self, conn: AsyncConnection, envelope: EventEnvelope[Any]) -> None:
        await super().handle(conn, envelope)
        if envelope.entity_id == os.environ.get("LAGOMPY_TEST_DIE_AFTER"):
            os._exit(17)


class PoisonOnRay(CreditsProjection):
    """CreditsProjection whose handler always fails for the account named "poison" (Ray
    workers import it afresh: no class state to set). Declares only ``Credited`` in
    ``event_types``, like CreditsProjection: its serializer knows no other event type."""

    name = "ray-credits"

    async def handle(self, conn: AsyncConnection, envelope: EventEnvelope[Any]) -> None:
        if envelope.entity_id == "poison":
            raise ValueError("account poison cannot be projected")
        await super().handle(conn, envelope)


class StallingCredits(CreditsProjection):
    """CreditsProjection whose ``prepare`` fails while ``prepare_fails`` is set."""

    name = "stalling-credits"
    prepare_fails: ClassVar[bool] = False

    async def prepare(self, conn: AsyncConnection, tag: str) -> None:
        if type(self).prepare_fails:
            raise RuntimeError("the projection's schema is being migrated")


class SpreadCredits(CreditsProjection):
    """The contract's credits projection (one row per handled event) on four tags, for the
    tests of partitions spreading over processes (tests/test_rebalance.py)."""

    name = "rebalance-credits"
    tag = sharded_tag("rebalance-credits", shards=4)  # type: ignore[assignment]


class PlacedCredits(CreditsProjection):
    """The contract's credits projection (one row per handled event) on two tags, for a
    journal placed on several databases (tests/test_readside_placed.py); records the tags its
    ``prepare`` saw (in this process)."""

    name = "placed-credits"
    tag = sharded_tag("placed-credits", shards=2)  # type: ignore[assignment]
    prepared: ClassVar[list[str]] = []

    async def prepare(self, conn: AsyncConnection, tag: str) -> None:
        type(self).prepared.append(tag)


class PoisonedPlacedCredits(PlacedCredits):
    """PlacedCredits whose handler raises for the accounts in ``poison``."""

    name = "poisoned-placed-credits"
    poison: ClassVar[set[str]] = set()

    async def handle(self, conn: AsyncConnection, envelope: EventEnvelope[Any]) -> None:
        if envelope.entity_id in type(self).poison:
            raise ValueError(f"account {envelope.entity_id} is poisoned")
        await super().handle(conn, envelope)
