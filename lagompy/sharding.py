"""Where an entity lives: logical shards, shard hosts and the app's recorded topology.

Pure code (no Ray): an entity id maps to one of ``shards`` logical shards by a stable hash, and
a shard maps to one of ``hosts`` host actors. The :class:`Topology` of an app is recorded when
its hosts are first started; every process that attaches to the app must compute the same one,
or two processes could route one entity to two hosts.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from lagompy.entity import HASH_VERSION, PersistentEntity, stable_hash, union_members
from lagompy.errors import ConfigurationError
from lagompy.settings import JournalSettings
from lagompy.sql._database import normalize_url

EntityClass = type[PersistentEntity[Any, Any, Any]]

DEFAULT_SHARDS = 256


def shard_of(entity_id: str, shards: int) -> int:
    """The logical shard of an entity: ``stable_hash(entity_id) % shards``."""
    return stable_hash(entity_id) % shards


def host_of_shard(shard: int, hosts: int) -> int:
    """The host actor that runs a logical shard."""
    return shard % hosts


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
    async driver chosen) and the PostgreSQL schema."""
    url = normalize_url(settings.url).render_as_string(hide_password=True)
    if settings.postgres_schema:
        url += f" (schema {settings.postgres_schema})"
    return url


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def check_importable(cls: type, what: str = "entity class") -> str:
    """``module:qualname`` of a class that worker processes can import by name, or a
    ``ConfigurationError`` saying why they cannot."""
    where = class_path(cls)
    if cls.__module__ == "__main__":
        raise ConfigurationError(
            f"{what} {cls.__qualname__} is defined in __main__ (the script you ran): Ray "
            "workers import entity classes and their commands by module name, so move it into "
            "a module they can import (a package installed in the environment, or a module "
            "beside your code)"
        )
    if "<locals>" in cls.__qualname__:
        raise ConfigurationError(
            f"{what} {where} is defined inside a function: Ray workers import it by name, so "
            "define it at the top level of a module"
        )
    try:
        found = resolve_class(where)
    except ConfigurationError as e:
        raise ConfigurationError(f"{what} {where} is not importable by name: {e}") from e
    if found is not cls:
        raise ConfigurationError(
            f"{what} {where}: importing it by name gives another class object (was the "
            "module reloaded, or the class replaced after it was defined?)"
        )
    return where


def check_entity_importable(cls: EntityClass) -> str:
    """Check the entity class and its command types (which travel to the hosts pickled by
    reference); return the entity's ``module:qualname``."""
    path = check_importable(cls)
    for member in union_members(cls.message_types()[0]):
        if isinstance(member, type):
            check_importable(member, f"command class of {cls.__qualname__}")
    return path


def resolve_class(path: str) -> Any:
    """Import ``module:qualname``."""
    module_name, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:
        raise ConfigurationError(
            f"cannot import module {module_name!r} ({type(e).__name__}: {e}); sys.path is "
            f"{sys.path}"
        ) from e
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(
                f"module {module_name!r} has no attribute {qualname!r}"
            ) from None
    return obj


def import_roots(classes: Iterable[type]) -> list[str]:
    """The directories from which the classes' top-level packages are imported (to put on the
    workers' PYTHONPATH on a local cluster)."""
    roots: list[str] = []
    for cls in classes:
        module = sys.modules.get(cls.__module__)
        file = getattr(module, "__file__", None)
        if not file:
            continue
        path = Path(file).resolve().parent
        depth = cls.__module__.count(".")
        if Path(file).name == "__init__.py":
            depth += 1
        for _ in range(depth):
            path = path.parent
        root = str(path)
        if root not in roots:
            roots.append(root)
    return roots


def code_fingerprint(entities: Sequence[EntityClass]) -> str:
    """A digest of the entity code: type names, qualified names and source of the entity
    classes and of their command, event and state types."""
    digest = hashlib.sha256()
    for cls in sorted(entities, key=lambda c: c.type_name):
        digest.update(f"{cls.type_name}|{class_path(cls)}|{_source(cls)}".encode())
        for annotation in cls.message_types():
            for member in union_members(annotation):
                if isinstance(member, type):
                    digest.update(f"|{class_path(member)}|{_source(member)}".encode())
    return digest.hexdigest()[:16]


def _source(obj: type) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


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
