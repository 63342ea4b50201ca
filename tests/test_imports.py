"""The package's import surface: every public name imports, and importing stays cheap.

The package ``__init__`` s load their names on first use (:mod:`lagompy._lazy`). These tests
hold both sides of that: each name of each ``__all__`` resolves (a name listed in ``__all__``
but missing from its package's ``_HOMES``, or a home that does not define it, fails here), and
``import lagompy``, ``import lagompy.<subpackage>`` and ``lagompy --help`` do not import the heavy
dependencies (an eager import added back to an ``__init__`` or a command module fails here).
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import textwrap

import pytest

import lagompy

SUBPACKAGES = sorted(
    info.name
    for info in pkgutil.iter_modules(lagompy.__path__, "lagompy.")
    if info.ispkg and not info.name.rsplit(".", 1)[1].startswith("_")
)
PUBLIC_PACKAGES = ["lagompy", *SUBPACKAGES]

#: What ``import lagompy`` (and each subpackage) and ``lagompy --help`` must not load.
HEAVY = (
    "sqlalchemy",
    "asyncpg",
    "aiosqlite",
    "alembic",
    "pydantic",
    "pydantic_settings",
    "msgpack",
    "ray",
    "fastapi",
    "starlette",
    "uvicorn",
    "httpx",
    "jinja2",
    "nats",
    "prometheus_client",
    "pybreaker",
)


def _loaded_after(code: str) -> list[str]:
    """The HEAVY modules loaded by running ``code`` in a fresh interpreter."""
    script = code + textwrap.dedent(
        f"""
        import sys
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return eval(proc.stdout.splitlines()[-1])  # type: ignore[no-any-return]  # a list literal


def test_the_public_packages_are_all_found() -> None:
    assert {"lagompy.journal", "lagompy.runtime", "lagompy.service"} <= set(SUBPACKAGES)


@pytest.mark.parametrize("package", PUBLIC_PACKAGES)
def test_every_public_name_imports(package: str) -> None:
    module = importlib.import_module(package)
    names: list[str] = module.__all__
    assert names, f"{package} has an empty __all__"
    for name in names:
        value = getattr(module, name)
        exec(f"from {package} import {name}", {})  # the form users write
        assert name in dir(module), f"{name} is missing from dir({package})"
        assert value is getattr(module, name)


@pytest.mark.parametrize("package", PUBLIC_PACKAGES)
def test_an_unknown_name_is_an_attribute_error(package: str) -> None:
    module = importlib.import_module(package)
    with pytest.raises(AttributeError, match="no_such_name"):
        module.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        exec(f"from {package} import no_such_name", {})


def test_a_subpackage_is_an_attribute_of_lagompy_as_before() -> None:
    # ``import lagompy`` used to import lagompy.journal (and others) eagerly, so code could
    # write ``lagompy.journal.Journal`` after ``import lagompy`` alone; it still can.
    assert _loaded_after("import lagompy\nassert lagompy.journal.Journal\n") != []


def test_import_lagompy_loads_no_heavy_dependency() -> None:
    assert _loaded_after("import lagompy\n") == []


@pytest.mark.parametrize(
    # (not the testkit: its driver is imported eagerly, and only tests import it)
    "package",
    [p for p in SUBPACKAGES if p != "lagompy.testkit"],
)
def test_importing_a_subpackage_loads_no_heavy_dependency(package: str) -> None:
    assert _loaded_after(f"import {package}\n") == []


def test_lagompy_help_loads_no_heavy_dependency() -> None:
    code = textwrap.dedent(
        """
        from lagompy.cli import main

        try:
            main(["--help"])
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
        """
    )
    assert _loaded_after(code) == []


def test_lagompy_version_loads_no_heavy_dependency_but_typers() -> None:
    # Running any command makes typer convert its parameters with pydantic (typer's own
    # import, lagompy's commands cannot avoid it); nothing else may load.
    code = textwrap.dedent(
        """
        from lagompy.cli import main

        for argv in (["version"], ["version", "--verbose"]):
            try:
                main(argv)
            except SystemExit as exc:
                assert exc.code in (0, None), (argv, exc.code)
        """
    )
    assert set(_loaded_after(code)) <= {"pydantic"}


def test_first_use_loads_what_it_needs() -> None:
    # The lazy names still work in a fresh process (not only in this one, where other tests
    # have imported everything already).
    code = textwrap.dedent(
        """
        from lagompy import Journal, RuntimeSettings, __version__
        from lagompy.service import Service

        assert Journal.__module__ == "lagompy.journal._journal"
        assert RuntimeSettings.__module__ == "lagompy.settings"
        assert Service.__module__ == "lagompy.service._service"
        assert isinstance(__version__, str) and __version__
        """
    )
    assert {"sqlalchemy", "pydantic", "fastapi"} <= set(_loaded_after(code))
