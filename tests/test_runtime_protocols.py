"""One protocol per pair of flavours: the service and the read-side component hold an entity
runtime through ``EntityRuntime`` and read-side workers through ``ReadSideRunner``, never by
asking which flavour they have; Ray's attach, release and stop live in one module."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from examples.user_service.entity import RegisterUser, UserEntity
from examples.user_service.projection import UsersProjection
from lagompy import EntityRuntime, start_in_process
from lagompy.readside import ReadSideRunner, start_readside
from lagompy.runtime import EntityRef
from lagompy.service import Service
from lagompy.service._breaker import BreakerRegistry
from lagompy.settings import JournalSettings

PACKAGE = Path(__file__).resolve().parent.parent / "lagompy"
FLAVOURS = {"InProcessEntities", "ShardedEntities", "ReadSide", "RayReadSide"}


def _isinstance_flavours(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
            named = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
            if named & FLAVOURS:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return found


def test_the_service_never_asks_which_flavour_it_holds() -> None:
    users = [*sorted((PACKAGE / "service").rglob("*.py")), PACKAGE / "readside/_component.py"]
    assert [hit for path in users for hit in _isinstance_flavours(path)] == []


def test_no_module_imports_another_modules_private_ray_helpers() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("_ray"):
                found += [
                    f"{path.relative_to(PACKAGE)}: {node.module}.{alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_")
                ]
    assert found == []


async def test_both_in_process_flavours_implement_their_protocols(
    journal_settings: JournalSettings,
) -> None:
    async with await start_in_process(entities=[UserEntity], settings=journal_settings) as ents:
        assert isinstance(ents, EntityRuntime)
        assert ents.local_journal == ents.storage.database.settings
        await ents.check()
        await ents.ref_for(UserEntity, "ada").ask(RegisterUser("Ada", "ada@example.org"))
        (host,) = await ents.host_stats()
        assert "index" not in host and host["events_persisted"] == 1
    readside = await start_readside([UsersProjection], journal_settings=journal_settings)
    try:
        assert isinstance(readside, ReadSideRunner)
        await readside.wait_until_caught_up(timeout=30)
        assert readside.problems() == []
    finally:
        await readside.close(stop=False)  # workers of this process stop either way


class OtherRuntime:
    """An entity runtime that is neither of lagompy's: the service uses it all the same."""

    check_name = "elsewhere"
    local_journal = None

    def __init__(self) -> None:
        self.closed: list[bool] = []
        self.healthy = True

    def ref_for(self, entity: Any, entity_id: str) -> EntityRef[Any]:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        return {}

    async def host_stats(self, *, require_journal: bool = True) -> list[dict[str, Any]]:
        return [{"index": 7, "commands": 3.0}]

    async def check(self) -> None:
        if not self.healthy:
            raise RuntimeError("the other place is down")

    async def close(self, *, shutdown: bool = False) -> None:
        self.closed.append(shutdown)


async def test_a_service_uses_any_entity_runtime_through_the_protocol() -> None:
    runtime = OtherRuntime()
    assert isinstance(runtime, EntityRuntime)
    service = Service(name="other", runtime=runtime, breakers=BreakerRegistry())
    await service.start()
    try:
        assert await service.readiness() == {"service": "ok", "elsewhere": "ok"}
        runtime.healthy = False
        assert (await service.readiness())["elsewhere"] == "RuntimeError (see the service's log)"
        samples = await service.pulled_metrics()
        assert ("lagompy_host_commands", {"host": "7"}, 3.0) in [
            (name, dict(labels), value) for name, _, _, labels, value in samples
        ]
    finally:
        await service.stop()
    assert runtime.closed == []  # given, not started by the service: the caller closes it
