"""Settings classes, and the openers in both their forms (``tests/test_openers.py``), type-check
in users' ``mypy --strict`` code. The checks live in one file so that they run in one test
process and share its mypy cache: lagompy is analysed once (~12 s cold), not once per check.

Pydantic's classes look like dataclasses to mypy (``dataclass_transform``): a field whose default
is given positionally (``Field(5, ...)``) counts as *required*, so ``JournalSettings(url=...)``
failed a user's strict type check with one "missing named argument" per other field. This test
type-checks a user's module that builds every settings class of the package with no argument,
with every field as a keyword argument, and with one wrong keyword (which must be reported:
the check really sees the classes' signatures).
"""

from __future__ import annotations

import importlib
import textwrap
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from tests.reference_tables import settings_classes

ROOT = Path(__file__).resolve().parent.parent

#: Where users import the settings classes from (the first that has the name wins).
PUBLIC_MODULES = ["lagompy", "lagompy.journal", "lagompy.readside", "lagompy.service"]


def _public_module(cls: type[BaseSettings]) -> str:
    for name in [*PUBLIC_MODULES, cls.__module__]:
        if getattr(importlib.import_module(name), cls.__name__, None) is cls:
            return name
    raise AssertionError(f"{cls.__name__} is not importable")  # pragma: no cover


def _keywords(cls: type[BaseSettings]) -> str:
    """Every field of ``cls`` as a keyword argument with its default: a literal, or a call of
    the settings class that makes it (``tail=TailSettings()``: imported by the module too)."""
    keywords = []
    for name, field in cls.model_fields.items():
        factory = field.default_factory
        value = f"{factory.__name__}()" if isinstance(factory, type) else repr(field.default)
        keywords.append(f"{name}={value}")
    return ", ".join(keywords)


def user_module() -> str:
    classes = settings_classes()
    lines = ["from __future__ import annotations", ""]
    lines += [f"from {_public_module(cls)} import {cls.__name__}" for cls in classes]
    lines += ["", "", "def build() -> None:"]
    lines.append('    JournalSettings(url="sqlite:///x.db")')
    for cls in classes:
        lines.append(f"    {cls.__name__}()")
        lines.append(f"    {cls.__name__}({_keywords(cls)})")
    # The control: a keyword that is no field must be an error, else the ignore is unused
    # (strict mode warns about it) and the check fails.
    lines.append("    JournalSettings(no_such_setting=1)  # type: ignore[call-arg]")
    lines.append("    pool_size: int = JournalSettings().pool_size")
    lines.append("    url: str = JournalSettings().url")
    lines.append("    print(pool_size, url)")
    return "\n".join(lines) + "\n"


def strict_mypy_errors(source: str, tmp_path: Path, cache: Path) -> list[str]:
    """The errors ``mypy --strict`` reports in ``source``, a user's module that imports lagompy
    (with no plugin: what a user's project sees). ``cache`` is the session's mypy cache (the
    ``mypy_cache`` fixture): lagompy and its dependencies are analysed once per session, not
    once per check (~25 s each on the 2-core machine)."""
    mypy_api = pytest.importorskip("mypy.api")
    module = tmp_path / "user_code.py"
    module.write_text(source, encoding="utf-8")
    config = tmp_path / "mypy.ini"
    config.write_text(
        textwrap.dedent(
            f"""\
            [mypy]
            strict = True
            mypy_path = {ROOT}
            ignore_missing_imports = True
            """
        ),
        encoding="utf-8",
    )
    stdout, stderr, status = mypy_api.run(
        ["--config-file", str(config), "--cache-dir", str(cache), str(module)]
    )
    assert status in (0, 1), stderr
    # Only the user's module is judged (lagompy itself is checked by its own gate); by its
    # name, as errors replayed from the cache carry the path of the run that found them.
    return [line for line in stdout.splitlines() if f"{module.name}:" in line]


def test_settings_classes_type_check_in_strict_user_code(tmp_path: Path, mypy_cache: Path) -> None:
    source = user_module()
    errors = strict_mypy_errors(source, tmp_path, mypy_cache)
    assert errors == [], source + "\n" + "\n".join(errors)


def test_both_forms_of_the_openers_type_check_in_strict_user_code(
    tmp_path: Path, mypy_cache: Path
) -> None:
    source = """\
from __future__ import annotations

import lagompy
from lagompy import InProcessEntities, Storage, open_storage, start, start_in_process
from lagompy.readside import Projections, ReadSide, open_projections, start_readside
from lagompy.runtime import ShardedEntities


async def main() -> None:
    async with open_storage("sqlite:///x.db") as storage:
        s1: Storage = storage
    s2: Storage = await open_storage("sqlite:///x.db")
    async with start_in_process(entities=[]) as in_process:
        e1: InProcessEntities = in_process
    e2: InProcessEntities = await start_in_process(entities=[])
    async with lagompy.start(entities=[], ray=False) as local:
        e3: InProcessEntities = local
    async with start(entities=[]) as sharded:
        e4: ShardedEntities = sharded
    e5: ShardedEntities = await start(entities=[], hosts=1)
    async with start_readside([]) as readside:
        r1: ReadSide = readside
    r2: ReadSide = await start_readside([])
    async with open_projections() as projections:
        p1: Projections = projections
    p2: Projections = await open_projections()
    print(s1, s2, e1, e2, e3, e4, e5, r1, r2, p1, p2)
    bad: Storage = await start_in_process(entities=[])  # type: ignore[assignment]
    print(bad)
"""
    assert strict_mypy_errors(source, tmp_path, mypy_cache) == []
