"""Process managers: react to an entity's events by sending commands to entities, with state
per association key, durable timers, and exactly-once effect without two-phase commit.

* ``_manager.py``: :class:`ProcessManager` (what users subclass) and :class:`ProcessContext`
  (``send``, ``after``, ``cancel``, ``end``).
* ``_store.py``: the states and timers in SQL (``lagompy_process_states``,
  ``lagompy_process_timers``).
* ``_worker.py``: :class:`ProcessWorker`, the consumer core (``lagompy.consumer``) with the
  process manager's commit strategy, and the partition's timer loop.
* ``_runner.py``: :func:`start_process_managers` and :class:`ProcessManagers` (status, pause,
  resume, skip, set-offset, state).
* ``_component.py``: :class:`ProcessManagersComponent`, the managers as part of a ``Service``.

See docs/process-managers.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lagompy._lazy import on_first_use

if TYPE_CHECKING:
    from lagompy.process._component import ProcessManagersComponent
    from lagompy.process._manager import ProcessContext, ProcessManager, offset_key
    from lagompy.process._runner import ManagerStatus, ProcessManagers, start_process_managers
    from lagompy.process._worker import ProcessWorker

#: The public names, by the module that defines them; each is imported on first use
#: (:mod:`lagompy._lazy`).
_HOMES = {
    "lagompy.process._manager": (
        "ProcessContext",
        "ProcessManager",
        "offset_key",
    ),
    "lagompy.process._runner": (
        "ManagerStatus",
        "ProcessManagers",
        "start_process_managers",
    ),
    "lagompy.process._worker": ("ProcessWorker",),
    "lagompy.process._component": ("ProcessManagersComponent",),
}

__all__ = [
    "ManagerStatus",
    "ProcessContext",
    "ProcessManager",
    "ProcessManagers",
    "ProcessManagersComponent",
    "ProcessWorker",
    "offset_key",
    "start_process_managers",
]

if not TYPE_CHECKING:  # mypy sees the names above and flags any other
    __getattr__, __dir__ = on_first_use(__name__, _HOMES, globals())
