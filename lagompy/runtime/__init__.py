"""Where entities live and how a command reaches one: refs, shards, shard hosts, Ray.

The path of a command, module by module:

* ``_refs.py``: :class:`EntityRef`, what callers hold; ``ask`` checks the ids, stamps a command
  id and a deadline, and hands the request on.
* ``_region.py`` (Ray) or ``_in_process.py``: the caller's side. The region groups pending asks
  per shard host, one Ray call per host per batch, and resends a batch whose host died.
* ``_sharding.py``: which logical shard and which host an entity belongs to, and the app's
  recorded topology that every attached process must share.
* ``_host.py``: the shard host, a named Ray actor that runs ``_processing.py``'s
  ``EntityProcessor`` on each batch: activate, decide, commit to the journal in one
  transaction, reply (in-process, the processor runs in the caller's event loop).
* ``_ray.py``: :func:`start`, :class:`ShardedEntities` and :func:`shutdown_app`: the entities
  on Ray; ``_ray_cluster.py``: everything that attaches this process to Ray, releases it and
  stops an app's actors (the read sides on Ray use it too); ``_loading.py`` checks that worker
  processes can import the entity code.

:func:`start_in_process` hosts the entities in this process instead (tests, scripts, one-process
services). Both runtimes implement :class:`EntityRuntime` (``_protocol.py``), which is all a
service needs of them; their defaults are the fields of :class:`~lagompy.settings.RuntimeSettings`
(``_defaults.py``). The runtime builds on :mod:`lagompy.journal`; the read sides and the
services use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lagompy._lazy import on_first_use

if TYPE_CHECKING:
    from lagompy.runtime._in_process import InProcessEntities, start_in_process
    from lagompy.runtime._protocol import EntityRuntime
    from lagompy.runtime._ray import ShardedEntities, ShardedEntityRef, shutdown_app, start
    from lagompy.runtime._ray_cluster import namespace_of
    from lagompy.runtime._refs import EntityRef

#: The public names, by the module that defines them; each is imported on first use
#: (:mod:`lagompy._lazy`).
_HOMES = {
    "lagompy.runtime._in_process": (
        "InProcessEntities",
        "start_in_process",
    ),
    "lagompy.runtime._protocol": ("EntityRuntime",),
    "lagompy.runtime._ray": (
        "ShardedEntities",
        "ShardedEntityRef",
        "shutdown_app",
        "start",
    ),
    "lagompy.runtime._ray_cluster": ("namespace_of",),
    "lagompy.runtime._refs": ("EntityRef",),
}

__all__ = [
    "EntityRef",
    "EntityRuntime",
    "InProcessEntities",
    "ShardedEntities",
    "ShardedEntityRef",
    "namespace_of",
    "shutdown_app",
    "start",
    "start_in_process",
]

if not TYPE_CHECKING:  # mypy sees the names above and flags any other
    __getattr__, __dir__ = on_first_use(__name__, _HOMES, globals())
