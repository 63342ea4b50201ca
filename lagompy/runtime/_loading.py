"""Finding the entity code by name, in this process and in the worker processes.

Ray workers import entity classes, their commands and read-side processors by module name
(``module:qualname``): :func:`check_importable` and :func:`check_entity_importable` refuse, with
the reason, a class they could not import (defined in ``__main__`` or in a function);
:func:`resolve_class` imports one; :func:`import_roots` gives the directories the classes are
imported from, :func:`program_path` the directories this program imports from that a new process
of the same Python would not have (both for the workers' path, see
``lagompy.runtime._ray_cluster``), :func:`installed_root` tells a directory the interpreter has
anyway; :func:`code_fingerprint` digests the entity code, so that processes attached to one app
can tell that they run the same code.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import site
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lagompy.entity import PersistentEntity, union_members
from lagompy.errors import ConfigurationError

EntityClass = type[PersistentEntity[Any, Any, Any]]


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


def _real(path: str) -> str:
    return os.path.realpath(path)


def _interpreter_dirs() -> tuple[list[str], set[str]]:
    """This interpreter's prefixes (its standard library and site-packages lie under them), and
    its site-packages directories (the user's too)."""
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    sites = set(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        sites.add(site.getusersitepackages())
    paths = sysconfig.get_paths()
    sites.update(paths[key] for key in ("purelib", "platlib") if key in paths)
    return [_real(p) for p in prefixes], {_real(p) for p in sites}


def installed_root(root: str) -> bool:
    """Whether ``root`` (from :func:`import_roots`) is one of this interpreter's site-packages
    directories: a class imported from there is an installed package's, which a worker process
    of the same Python imports without help."""
    return _real(root) in _interpreter_dirs()[1]


def program_path() -> list[str]:
    """The directories on this process's ``sys.path`` that a new process of the same Python
    would not have by itself, in ``sys.path`` order: the script's directory, the current
    directory, ``PYTHONPATH`` entries, directories the program (or its test runner) inserted.
    Entries under the interpreter's prefixes (its standard library and site-packages) and
    entries that are not directories are left out."""
    prefixes, _ = _interpreter_dirs()
    out: list[str] = []
    for entry in sys.path:
        path = os.path.abspath(entry or os.curdir)
        real = _real(path)
        if not os.path.isdir(path) or path in out:
            continue
        if any(real == p or real.startswith(p.rstrip(os.sep) + os.sep) for p in prefixes):
            continue
        out.append(path)
    return out


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
