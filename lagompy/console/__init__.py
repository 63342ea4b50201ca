"""The management console: server-rendered pages over the service's own status and operations.

::

    service = Service(name="users", entities=[UserEntity], components=[readside])
    app = FastAPI(lifespan=service.lifespan)
    service.install(app, console=True)          # or LAGOMPY_CONSOLE_ENABLED=true

Pages under ``/console``: Overview (health checks, hosts, breakers, recent read-side failures),
Read sides (every processor x tag, with pause, resume, skip and set offset), Failed (tags
stopped at an event, filtered by processor and error class; retry or skip one or all),
Entities (an entity's events and snapshot), Circuit breakers and Audit. Each page is a view of a
JSON route under ``/console/api/`` and of the operations the CLI and Python already offer.

Read-only unless :class:`ConsoleSettings` has a ``token``: then actions are taken with it as a
bearer token (``POST /console/actions/{action}``), or from the pages after logging in with it
(a session cookie, CSRF tokens on every form, a confirmation for what cannot be undone). Every
action is written to the audit table ``lagompy_console_audit``. Payloads are masked unless
``show_payloads``.

The modules: ``_settings.py`` (:class:`ConsoleSettings`), ``_backend.py`` (the data and the
operations), ``_auth.py`` (token, session, CSRF), ``_audit.py`` (the audit log), ``_router.py``
(:class:`Console`: the routes), ``templates/`` and ``static/`` (Jinja2 templates and a small
script, shipped in the wheel: no build step, nothing from a CDN).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lagompy._lazy import on_first_use

if TYPE_CHECKING:
    from lagompy.console._audit import AuditEntry, AuditLog
    from lagompy.console._router import ACTIONS, Console
    from lagompy.console._settings import ConsoleSettings

#: The public names, by the module that defines them; each is imported on first use
#: (:mod:`lagompy._lazy`).
_HOMES = {
    "lagompy.console._audit": (
        "AuditEntry",
        "AuditLog",
    ),
    "lagompy.console._router": (
        "ACTIONS",
        "Console",
    ),
    "lagompy.console._settings": ("ConsoleSettings",),
}

__all__ = ["ACTIONS", "AuditEntry", "AuditLog", "Console", "ConsoleSettings"]

if not TYPE_CHECKING:  # mypy sees the names above and flags any other
    __getattr__, __dir__ = on_first_use(__name__, _HOMES, globals())
