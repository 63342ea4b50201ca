"""The reference pages stay in step with the code.

* The generated tables of ``docs/reference/`` (public API, settings, metrics) equal what
  ``tests/reference_tables.py`` builds from the code today; run
  ``python -m tests.reference_tables --write`` after changing an export, a setting or a metric.
* Every name in ``lagompy.__all__`` is on the API page, and every settings field on the
  settings page with its environment variable.
* Every command and every long option of ``lagompy`` (as ``lagompy --help`` shows them) is
  documented in ``docs/reference/cli.md``, and the page names no command that does not exist.
"""

from __future__ import annotations

import re

import pytest
import typer.main

import lagompy
from lagompy.cli import build_app
from tests.reference_tables import GENERATED, REFERENCE, generated_block, settings_classes

CLI_PAGE = REFERENCE / "cli.md"


@pytest.mark.parametrize(
    ("page", "name"), [(page, name) for page, tables in GENERATED.items() for name in tables]
)
def test_generated_tables_are_current(page: str, name: str) -> None:
    text = (REFERENCE / page).read_text(encoding="utf-8")
    block = generated_block(text, name)
    assert block is not None, f"docs/reference/{page} lacks the markers of the {name!r} table"
    assert block == GENERATED[page][name](), (
        f"docs/reference/{page}: the {name!r} table differs from the code; "
        "run `python -m tests.reference_tables --write`"
    )


def test_every_export_is_on_the_api_page() -> None:
    text = (REFERENCE / "api.md").read_text(encoding="utf-8")
    missing = [name for name in lagompy.__all__ if f"| `{name}` |" not in text]
    assert missing == []


def test_every_setting_is_on_the_settings_page() -> None:
    text = (REFERENCE / "settings.md").read_text(encoding="utf-8")
    classes = settings_classes()
    assert {cls.__name__ for cls in classes} >= {"JournalSettings", "RuntimeSettings"}
    for cls in classes:
        assert f"### `{cls.__name__}`" in text
        prefix = cls.model_config.get("env_prefix", "")
        for field in cls.model_fields:
            assert f"`{prefix}{field.upper()}`" in text, f"{cls.__name__}.{field}"


def _commands() -> list[tuple[list[str], list[str]]]:
    """(command path, long options other than --help) of every command of ``lagompy``."""
    found: list[tuple[list[str], list[str]]] = []

    def walk(command: object, path: list[str]) -> None:
        options = [
            opt
            for param in getattr(command, "params", [])
            for opt in getattr(param, "opts", [])
            if opt.startswith("--") and opt != "--help"
        ]
        if path:
            found.append((path, options))
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, [*path, name])

    walk(typer.main.get_command(build_app()), [])
    return found


def _sections(text: str) -> dict[str, str]:
    """The page's ``## `lagompy X ...` `` sections, by their first command word."""
    sections: dict[str, str] = {}
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        heading = part.splitlines()[0]
        match = re.match(r"`lagompy (\w[\w-]*)", heading)
        if match:
            sections[match[1]] = sections.get(match[1], "") + part
    return sections


def test_cli_page_documents_every_command_and_option() -> None:
    text = CLI_PAGE.read_text(encoding="utf-8")
    sections = _sections(text)
    problems = []
    for path, options in _commands():
        section = sections.get(path[0])
        if section is None:
            problems.append(f"no section `## \\`lagompy {path[0]}\\`` for {' '.join(path)}")
            continue
        if f"lagompy {' '.join(path)}" not in section:
            problems.append(f"`lagompy {' '.join(path)}` is not named in its section")
        problems += [
            f"{' '.join(path)}: {opt} undocumented" for opt in options if opt not in section
        ]
    assert problems == []


def test_cli_page_names_only_real_commands() -> None:
    text = CLI_PAGE.read_text(encoding="utf-8")
    real = {" ".join(path) for path, _ in _commands()}
    top = {path[0] for path, _ in _commands()}
    named = set(re.findall(r"`lagompy ([a-z][\w-]*)", text))
    assert named <= top, f"cli.md names commands lagompy does not have: {named - top}"
    assert real  # the walk found the commands
