"""Test kit: drive entities against a real journal in tests, and the contract suites every
journal and snapshot-store backend must pass.

Nothing in the lagompy package imports this module; it may use every layer. The contract suites
(:mod:`lagompy.testkit.contracts`) need pytest and pytest-asyncio, so they are imported only
when one of their names is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lagompy.testkit.driver import EntityTestDriver, Issue, Outcome

if TYPE_CHECKING:
    from lagompy.testkit.contracts import (
        JournalContract,
        SnapshotStoreContract,
        StorageOpener,
        contract_serializer,
    )
    from lagompy.testkit.readside import ReadSideContract, ReadSideTestDriver
    from lagompy.testkit.topics import ProducerTopicContract, TopicContract

_CONTRACT_NAMES = frozenset(
    {"JournalContract", "SnapshotStoreContract", "StorageOpener", "contract_serializer"}
)
#: The read-side driver and contract (lagompy.testkit.readside), imported on first use too.
_READSIDE_NAMES = frozenset({"ReadSideContract", "ReadSideTestDriver"})
#: The topic contract (lagompy.testkit.topics), imported on first use too.
_TOPIC_NAMES = frozenset({"ProducerTopicContract", "TopicContract"})

__all__ = [
    "EntityTestDriver",
    "Issue",
    "JournalContract",
    "Outcome",
    "ProducerTopicContract",
    "ReadSideContract",
    "ReadSideTestDriver",
    "SnapshotStoreContract",
    "StorageOpener",
    "TopicContract",
    "contract_serializer",
]


def __getattr__(name: str) -> Any:
    if name in _CONTRACT_NAMES:
        from lagompy.testkit import contracts

        return getattr(contracts, name)
    if name in _READSIDE_NAMES:
        from lagompy.testkit import readside

        return getattr(readside, name)
    if name in _TOPIC_NAMES:
        from lagompy.testkit import topics

        return getattr(topics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
