"""Exports imported on first use: the module ``__getattr__`` of lagompy's package ``__init__`` s.

``import lagompy`` runs in every ``lagompy`` command, every ``lagompy run`` worker, every Ray
worker that imports an entity module and every test subprocess. Importing SQLAlchemy, asyncpg,
pydantic, Ray or FastAPI there cost about a second on a 2-core machine, most of it for names the
process never touches. So a package ``__init__`` names its exports under ``TYPE_CHECKING`` (mypy
and IDEs see them) and builds its runtime ``__getattr__`` (PEP 562) with :func:`on_first_use`:
the first ``from lagompy.journal import Journal`` imports ``lagompy.journal._journal``, and the
value is then stored in the package's namespace, so later look-ups never reach ``__getattr__``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["on_first_use"]


def on_first_use(
    package: str, homes: Mapping[str, Iterable[str]], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` whose names live in ``homes``.

    ``homes`` maps a module to the names it defines; ``namespace`` is the package's
    ``globals()``, where each value is stored once imported. A name that is no export but a
    submodule of ``package`` (``lagompy.journal`` from ``lagompy``) is imported too, as it was
    when the package imported everything eagerly.
    """
    home_of = {name: module for module, names in homes.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = home_of.get(name)
        if module is not None:
            value = getattr(importlib.import_module(module), name)
            namespace[name] = value
            return value
        if not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}"):
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(home_of))

    return __getattr__, __dir__
