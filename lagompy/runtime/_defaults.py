"""The runtime's defaults are the fields of :class:`~lagompy.settings.RuntimeSettings`: the
keyword arguments of the in-process runtime, the region client and the shard host take their
defaults from there, so that each default is written once. The one default that depends on the
cluster, the host count, is :func:`default_hosts`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lagompy.settings import RuntimeSettings


def runtime_default(name: str) -> Any:
    """The default of the ``RuntimeSettings`` field ``name``."""
    return RuntimeSettings.model_fields[name].default


def default_hosts(node_cpus: Iterable[float]) -> int:
    """The host count of an app started without ``hosts``: one per node of the cluster that
    has CPUs (``node_cpus``: the CPUs of each live node), at least one.

    Not one per CPU: every host writes through the journal's one ordering fence, so the
    cluster writes at one writer's speed whatever the host count, and each added host splits
    the asks into smaller batches whose transactions cost about as much as large ones. Measured
    on a 2-core node (docs/runtime.md, "Shards and hosts"): one host did 1.4-2.5 times as much
    as two at 64 outstanding asks, and at 1,024 was within ~10% of two (ahead on a loaded
    machine, behind on a calm one: a second host fills the time one host's thread sleeps
    through its batch's round trips to the database, for ~40% more CPU per command). A host
    per node gives every node's cores to deciding and encoding, the part of a batch that runs
    beside the fence, and leaves no node's CPUs idle; a second host on one node only shares
    its cores."""
    nodes = sum(1 for cpus in node_cpus if cpus >= 1)
    return max(1, nodes)
