"""The audit log: every action taken in the console, one row each in ``lagompy_console_audit``
(in the journal's database)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import insert, select

from lagompy.journal._model import from_us, now_us
from lagompy.sql import _schema as schema
from lagompy.sql._database import Database

__all__ = ["AuditEntry", "AuditLog"]

_T = schema.console_audit


@dataclass(frozen=True)
class AuditEntry:
    """One action: who did what to which target, when, and how it ended."""

    id: int
    at: str  # ISO 8601, UTC
    service: str
    actor: str
    action: str
    target: str
    #: ``ok``, ``refused`` (the operation said no, e.g. nothing to skip) or ``failed``.
    result: str
    detail: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AuditLog:
    """Writes and reads the audit rows of one service."""

    def __init__(self, database: Database, service: str) -> None:
        self.database = database
        self.service = service

    async def record(
        self, *, actor: str, action: str, target: str, result: str, detail: str | None
    ) -> None:
        values = {
            "at_us": now_us(),
            "service": self.service[:255],
            "actor": actor[:255],
            "action": action[:64],
            "target": target[:2000],
            "result": result[:32],
            "detail": None if detail is None else detail[:2000],
        }
        async with self.database.write() as conn:
            await conn.execute(insert(_T).values(**values))

    async def recent(self, limit: int = 200) -> list[AuditEntry]:
        """The newest ``limit`` rows of this service, newest first."""
        stmt = select(_T).where(_T.c.service == self.service).order_by(_T.c.id.desc()).limit(limit)
        async with self.database.read() as conn:
            rows = (await conn.execute(stmt)).mappings().all()
        return [
            AuditEntry(
                id=int(r["id"]),
                at=from_us(int(r["at_us"])).isoformat(),
                service=r["service"],
                actor=r["actor"],
                action=r["action"],
                target=r["target"],
                result=r["result"],
                detail=r["detail"],
            )
            for r in rows
        ]
