"""The generated tables of the reference pages, built from the code.

The reference pages under ``docs/reference/`` hold tables between two markers::

    <!-- BEGIN GENERATED: settings -->
    ...
    <!-- END GENERATED: settings -->

``tests/test_reference_docs.py`` fails when a table differs from what the code gives today
(a setting added, a default changed, a name exported...). To bring the pages in step, run::

    python -m tests.reference_tables --write
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "docs" / "reference"

_BEGIN = "<!-- BEGIN GENERATED: {name} -->"
_END = "<!-- END GENERATED: {name} -->"

# ----------------------------------------------------------------------------- text helpers

_ROLE = re.compile(r":[a-z]+:`~?(?:[\w.]+\.)?(?P<name>[\w]+(?:\(\))?)`")


def _markdown(text: str) -> str:
    """A docstring fragment as one line of markdown: ``x`` becomes `x`, roles lose their
    module, and a pipe cannot break the table."""
    text = _ROLE.sub(lambda m: f"`{m['name']}`", text)
    text = text.replace("``", "`")
    text = " ".join(text.split())
    return text.replace("|", "\\|")


def _first_sentence(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    paragraph = doc.split("\n\n")[0].replace("\n", " ")
    paragraph = re.sub(r"::$", ":", paragraph.strip())
    match = re.match(r"(.+?[.:])(\s|$)", paragraph)
    sentence = match.group(1) if match else paragraph
    return _markdown(sentence.rstrip(":") + ("." if sentence.endswith(":") else ""))


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the public API

#: The modules whose public names the API page lists, in the page's order, with a heading: the
#: package's own exports and the exception tree, then each subpackage's public surface (its
#: ``__init__``). ``lagompy.errors`` has no ``__all__``: its public names are its exception
#: classes.
API_MODULES: list[tuple[str, str]] = [
    ("lagompy", "`lagompy`: the package's own exports"),
    ("lagompy.errors", "`lagompy.errors`: the exception tree"),
    ("lagompy.sql", "`lagompy.sql`: connections, lagompy's tables and their migrations"),
    ("lagompy.journal", "`lagompy.journal`: events, snapshots, reading and tailing"),
    ("lagompy.consumer", "`lagompy.consumer`: the event-consumer core and its commit strategies"),
    ("lagompy.runtime", "`lagompy.runtime`: entity refs, in-process and on Ray"),
    ("lagompy.readside", "`lagompy.readside`: read sides, in-process and on Ray"),
    ("lagompy.service", "`lagompy.service`: FastAPI glue, service clients, circuit breakers"),
    ("lagompy.topic", "`lagompy.topic`: topics, subscribers and their transports"),
    ("lagompy.process", "`lagompy.process`: process managers, their state and timers"),
    ("lagompy.workflow", "`lagompy.workflow`: durable workflows"),
    ("lagompy.console", "`lagompy.console`: the management console"),
    ("lagompy.testkit", "`lagompy.testkit`: testing"),
]


def public_home(module_name: str) -> str:
    """Where a name is imported from: its module, up to the first private part
    (``lagompy.readside._settings`` -> ``lagompy.readside``)."""
    parts = module_name.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_"):
            return ".".join(parts[:i])
    return module_name


def public_names(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [
        name
        for name, value in vars(module).items()
        if inspect.isclass(value)
        and issubclass(value, BaseException)
        and value.__module__ == module_name
        and not name.startswith("_")
    ]


def _kind(value: Any) -> str:
    if inspect.isclass(value):
        if issubclass(value, BaseException):
            return "exception"
        if issubclass(value, BaseSettings):
            return "settings"
        return "class"
    if inspect.isfunction(value) or inspect.iscoroutinefunction(value):
        return "function"
    return "value"


def _api_line(module_name: str, name: str) -> str:
    if module_name == "lagompy" and name == "__version__":
        return "The installed version of lagompy (`0.0.0` in a source tree that is not installed)."
    value = getattr(importlib.import_module(module_name), name)
    if _kind(value) == "value":
        return ""  # constants, type aliases and the like: their docstring is their type's
    return _first_sentence(value)


def api_tables() -> str:
    parts: list[str] = []
    for module_name, heading in API_MODULES:
        module = importlib.import_module(module_name)
        rows = []
        for name in public_names(module_name):
            value = getattr(module, name)
            home = getattr(value, "__module__", None) if _kind(value) != "value" else None
            home = public_home(home) if home else None
            rows.append(
                [
                    f"`{name}`",
                    _kind(value),
                    f"`{home}`" if home else "",
                    _api_line(module_name, name),
                ]
            )
        parts.append(
            f"### {heading}\n\n" + _table(["name", "kind", "defined in", "what it is"], rows)
        )
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- settings

#: The page's order; a settings class found in the package but missing here comes last.
SETTINGS_ORDER = [
    "lagompy.settings.JournalSettings",
    "lagompy.settings.RuntimeSettings",
    "lagompy.journal._tailing.TailSettings",
    "lagompy.readside._settings.ReadSideSettings",
    "lagompy.service._service.ServiceSettings",
    "lagompy.service._client.ClientSettings",
    "lagompy.service._breaker.BreakerSettings",
]


def settings_classes() -> list[type[BaseSettings]]:
    """Every pydantic-settings class defined in the lagompy package (not their base class)."""
    import lagompy
    from lagompy.settings import LagompySettings

    found: dict[str, type[BaseSettings]] = {}
    for info in pkgutil.walk_packages(lagompy.__path__, "lagompy."):
        if info.name == "lagompy.__main__" or info.name.startswith("lagompy.sql.migrations"):
            continue
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseSettings)
                and value not in (BaseSettings, LagompySettings)
                and value.__module__ == info.name
            ):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    ordered = [found.pop(path) for path in SETTINGS_ORDER if path in found]
    return ordered + [found[path] for path in sorted(found)]


def _default(field: Any) -> str:
    if field.default_factory is not None:
        return "(computed)"
    value = field.default
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1024 * 1024:
        return f"`{value}` ({value // (1024 * 1024)} MiB)"
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def _annotation(field: Any) -> str:
    text = getattr(field.annotation, "__name__", None) or str(field.annotation)
    text = re.sub(
        r"\btyping\.", "", str(field.annotation) if "[" in str(field.annotation) else text
    )
    text = text.replace("NoneType", "None")
    return "`" + text.replace("|", "\\|") + "`"


def settings_tables() -> str:
    parts: list[str] = []
    for cls in settings_classes():
        prefix = cls.model_config.get("env_prefix", "")
        rows = [
            [
                f"`{name}`",
                _annotation(field),
                _default(field),
                f"`{prefix}{name.upper()}`",
                _markdown(field.description or ""),
            ]
            for name, field in cls.model_fields.items()
        ]
        parts.append(
            f"### `{cls.__name__}`\n\n"
            f"`{public_home(cls.__module__)}.{cls.__name__}`: {_first_sentence(cls)}\n\n"
            + _table(["setting", "type", "default", "environment variable", "meaning"], rows)
        )
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- metrics


def _where(metric: Any) -> str:
    if metric._type == "gauge" and getattr(metric, "_multiprocess_mode", "") == "liveall":
        return "each process (under `lagompy run --workers`, one series per live worker: `pid`)"
    return "each process (added up over `lagompy run` workers)"


def metric_rows() -> list[list[str]]:
    """(exposed names, type, labels, where it is measured, help) of every lagompy metric."""
    from prometheus_client.metrics import MetricWrapperBase

    from lagompy.service import _metrics as metrics

    rows: list[list[str]] = []
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        kind = value._type
        assert kind is not None  # every metric class sets it ("counter", "gauge", ...)
        name = value._name
        if kind == "counter":
            exposed = [f"{name}_total"]
        elif kind == "histogram":
            exposed = [f"{name}_bucket", f"{name}_sum", f"{name}_count"]
        else:
            exposed = [name]
        rows.append(
            [
                "<br>".join(f"`{n}`" for n in exposed),
                kind,
                ", ".join(f"`{label}`" for label in value._labelnames),
                _where(value),
                _markdown(value._documentation),
            ]
        )
    for name, kind, help_text in metrics.HOST_FIGURES.values():
        series = f"{name}_total" if kind == "counter" else name
        rows.append(
            [
                f"`{series}`",
                kind,
                "`host`",
                "pulled from the shard hosts at scrape time",
                _markdown(help_text),
            ]
        )
    return rows


def metrics_table() -> str:
    return _table(["exposed as", "type", "labels", "measured in", "meaning"], metric_rows())


# ----------------------------------------------------------------------------- pages

#: page -> {table name: function that builds it}
GENERATED: dict[str, dict[str, Callable[[], str]]] = {
    "api.md": {"api": api_tables},
    "settings.md": {"settings": settings_tables},
    "http.md": {"metrics": metrics_table},
}


def generated_block(page_text: str, name: str) -> str | None:
    """The text between the markers of table ``name`` in a page, or None without markers."""
    begin, end = _BEGIN.format(name=name), _END.format(name=name)
    if begin not in page_text or end not in page_text:
        return None
    return page_text.split(begin, 1)[1].split(end, 1)[0].strip("\n")


def write_block(page_text: str, name: str, table: str) -> str:
    begin, end = _BEGIN.format(name=name), _END.format(name=name)
    head, rest = page_text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{table}\n{end}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check or rewrite the reference tables.")
    parser.add_argument("--write", action="store_true", help="rewrite the pages' tables")
    args = parser.parse_args(argv)
    stale = []
    for page, tables in GENERATED.items():
        path = REFERENCE / page
        text = path.read_text(encoding="utf-8")
        for name, build in tables.items():
            table = build()
            if generated_block(text, name) != table:
                stale.append(f"{page}: {name}")
                text = write_block(text, name, table)
        if args.write:
            path.write_text(text, encoding="utf-8")
    for item in stale:
        print(("rewrote " if args.write else "stale: ") + item)
    return 1 if stale and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
