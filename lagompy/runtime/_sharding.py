"""Where an entity lives: logical shards, shard hosts and the app's recorded topology.

Pure code (no Ray): an entity id maps to one of ``shards`` logical shards by a stable hash, and
a shard maps to one of ``hosts`` host actors. The :class:`Topology` of an app is recorded when
its hosts are first started; every process that attaches to the app must compute the same one,
or two processes could route one entity to two hosts. Finding and fingerprinting the entity
code lives apart, in ``_loading.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from typing import Any

from lagompy.entity import HASH_VERSION, stable_hash
from lagompy.runtime._loading import EntityClass, code_fingerprint
from lagompy.settings import JournalSettings
from lagompy.sql._database import normalize_url

DEFAULT_SHARDS = 256


def shard_of(entity_id: str, shards: int) -> int:
    """The logical shard of an entity: ``stable_hash(entity_id) % shards``."""
    return stable_hash(entity_id) % shards


def host_of(entity_id: str, shards: int, hosts: int) -> int:
    return stable_hash(entity_id) % shards % hosts


@dataclass(frozen=True)
class Topology:
    """What every process attached to an app must agree on."""

    app: str
    shards: int
    hosts: int
    hash_version: int
    journal: str
    entities: tuple[str, ...]
    code_fingerprint: str

    @cached_property
    def key(self) -> str:
        """A short digest of the whole topology, sent with every batch so that a host refuses
        batches routed by a client that uses another topology (computed once: hosts check it
        on every batch)."""
        text = repr(sorted(asdict(self).items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Topology:
        values: dict[str, Any] = {f.name: data.get(f.name) for f in fields(cls)}
        values["entities"] = tuple(values["entities"] or ())
        return cls(**values)

    def differences(self, running: Topology) -> list[str]:
        """Human-readable differences between this (asked) topology and the running one."""
        out = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(running, f.name)
            if mine != theirs:
                out.append(f"{f.name}: the app runs with {theirs!r}, this process has {mine!r}")
        return out


def describe_journal(settings: JournalSettings) -> str:
    """The journal's identity without its password: the URL (SQLite paths made absolute, the
    async driver chosen), the PostgreSQL schema, and each other database with its slices."""
    url = normalize_url(settings.url).render_as_string(hide_password=True)
    if settings.postgres_schema:
        url += f" (schema {settings.postgres_schema})"
    for name, placed in sorted(settings.databases.items()):
        other = normalize_url(placed.url).render_as_string(hide_password=True)
        url += f"; {name}: {other} (slices {placed.slices})"
    return url


def topology_for(
    app: str,
    entities: Sequence[EntityClass],
    journal: JournalSettings,
    *,
    shards: int,
    hosts: int,
) -> Topology:
    return Topology(
        app=app,
        shards=shards,
        hosts=hosts,
        hash_version=HASH_VERSION,
        journal=describe_journal(journal),
        entities=tuple(sorted(cls.type_name for cls in entities)),
        code_fingerprint=code_fingerprint(entities),
    )
