"""The tutorial shows the example's real code.

A ```python block of ``docs/tutorial.md`` preceded by ``<!-- region: PATH#NAME -->`` must equal
the region ``NAME`` of the file ``PATH`` (the lines between ``# --8<-- [start:NAME]`` and
``# --8<-- [end:NAME]``, dedented, without blank lines at either end). tests/test_docs.py runs
the page's blocks; this test keeps them identical to the files the example runs. Every region
of the example's files is shown somewhere in the tutorial.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TUTORIAL = REPO / "docs" / "tutorial.md"
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


def shown_regions() -> list[tuple[str, str, str]]:
    """(path, region name, the code block after its marker) for every marker of the page."""
    lines = TUTORIAL.read_text(encoding="utf-8").splitlines()
    found = []
    for i, line in enumerate(lines):
        marker = _MARKER.match(line)
        if marker is None:
            continue
        assert lines[i + 1] == "```python", f"tutorial.md:{i + 2}: a ```python block must follow"
        end = lines.index("```", i + 2)
        found.append((marker["path"], marker["name"], "\n".join(lines[i + 2 : end])))
    return found


@pytest.mark.parametrize(
    ("path", "name", "code"), shown_regions(), ids=[f"{p}#{n}" for p, n, _ in shown_regions()]
)
def test_tutorial_block_equals_the_example_code(path: str, name: str, code: str) -> None:
    expected = region(REPO / path, name)
    assert code == expected, (
        f"docs/tutorial.md's block of {path}#{name} differs from the file: copy the region "
        "into the page again"
    )


def test_every_region_of_the_examples_is_in_the_tutorial() -> None:
    regions = {
        (path.relative_to(REPO).as_posix(), m["name"])
        for path in EXAMPLES.rglob("*.py")
        for line in path.read_text(encoding="utf-8").splitlines()
        if (m := _START.match(line))
    }
    shown = {(p, n) for p, n, _ in shown_regions()}
    assert len(regions) >= 5 and regions == shown
