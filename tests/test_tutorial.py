"""The tutorial (and the how-to on fast projections) shows the example's real code.

A ```python block of ``docs/tutorial.md`` or ``docs/howto/fast-projections.md`` preceded by
``<!-- region: PATH#NAME -->`` must equal the region ``NAME`` of the file ``PATH`` (the lines
between ``# --8<-- [start:NAME]`` and ``# --8<-- [end:NAME]``, dedented, without blank lines at
either end). tests/test_docs.py runs the pages' blocks; this test keeps them identical to the
files the example runs. Every region of the example's files is shown somewhere in the tutorial,
but those of ``fast_projection.py`` (the projection written set-based), which the how-to shows.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TUTORIAL = REPO / "docs" / "tutorial.md"
HOWTO = REPO / "docs" / "howto" / "fast-projections.md"
#: The example's files the how-to shows rather than the tutorial.
SHOWN_BY_HOWTO = {"examples/user_service/fast_projection.py"}
EXAMPLES = REPO / "examples"

_MARKER = re.compile(r"^<!-- region: (?P<path>[\w/.]+)#(?P<name>[\w-]+) -->$")
_START = re.compile(r"^\s*# --8<-- \[start:(?P<name>[\w-]+)\]$")


def region(path: Path, name: str) -> str:
    """The text of region ``name`` of ``path``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = f"# --8<-- [start:{name}]"
    end = f"# --8<-- [end:{name}]"
    begins = [i for i, line in enumerate(lines) if line.strip() == start]
    ends = [i for i, line in enumerate(lines) if line.strip() == end]
    assert len(begins) == 1 and len(ends) == 1 and begins[0] < ends[0], (
        f"{path}: region {name!r} must be opened and closed once"
    )
    text = textwrap.dedent("\n".join(lines[begins[0] + 1 : ends[0]]))
    return text.strip("\n")


def shown_regions(page: Path = TUTORIAL) -> list[tuple[str, str, str]]:
    """(path, region name, the code block after its marker) for every marker of the page."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found = []
    for i, line in enumerate(lines):
        marker = _MARKER.match(line)
        if marker is None:
            continue
        assert lines[i + 1] == "```python", f"{page.name}:{i + 2}: a ```python block must follow"
        end = lines.index("```", i + 2)
        found.append((marker["path"], marker["name"], "\n".join(lines[i + 2 : end])))
    return found


SHOWN = [(TUTORIAL, *r) for r in shown_regions()] + [(HOWTO, *r) for r in shown_regions(HOWTO)]


@pytest.mark.parametrize(
    ("page", "path", "name", "code"),
    SHOWN,
    ids=[f"{page.stem}:{p}#{n}" for page, p, n, _ in SHOWN],
)
def test_tutorial_block_equals_the_example_code(
    page: Path, path: str, name: str, code: str
) -> None:
    expected = region(REPO / path, name)
    assert code == expected, (
        f"docs/{page.relative_to(REPO / 'docs').as_posix()}'s block of {path}#{name} differs "
        "from the file: copy the region into the page again"
    )


def test_every_region_of_the_examples_is_in_the_tutorial() -> None:
    regions = {
        (path.relative_to(REPO).as_posix(), m["name"])
        for path in EXAMPLES.rglob("*.py")
        for line in path.read_text(encoding="utf-8").splitlines()
        if (m := _START.match(line))
    }
    shown = {(p, n) for p, n, _ in shown_regions()}
    by_howto = {(p, n) for p, n, _ in shown_regions(HOWTO)}
    assert {p for p, _ in by_howto} == SHOWN_BY_HOWTO
    assert len(regions) >= 5 and regions == shown | by_howto
    assert not any(p in SHOWN_BY_HOWTO for p, _ in shown)
