"""The documentation is tested.

* Every fenced ```python block of every ``docs/**/*.md`` page runs. A page's blocks are joined,
  in order, into one script that runs in a fresh interpreter, in an empty working directory,
  without any ``LAGOMPY_*`` environment variable. So the blocks of a page share their names,
  and the files they create (SQLite databases, for example) land in a temporary directory. An
  async example calls ``asyncio.run(...)`` itself. To show code that must not run, fence it as
  ```text or ```pycon instead. The selected pages' scripts run ahead of their tests, two
  at a time (see ``PAGE_CONCURRENCY``); each test waits for its page's outcome.
* ``mkdocs build --strict`` succeeds, so broken links, anchors and navigation fail the suite.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
# Every page of the docs site, and the README, whose example must stay true as well.
PAGES = [*sorted(DOCS.rglob("*.md")), REPO / "README.md"]
SNIPPET_TIMEOUT = 120.0
MKDOCS_TIMEOUT = 120.0
#: Pages whose scripts run at once. A script spends most of its time in a fresh interpreter
#: importing lagompy, or waiting for a local Ray or a server to start; two at a time on this
#: 2-core machine ran every page in 80 s where one at a time took 123 s (both measured while
#: other work loaded the machine). Each has its own process group and working directory, and
#: its servers and brokers take free ports.
PAGE_CONCURRENCY = 2

_OPENING_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>.*?)[ \t]*$")
_FUTURE_IMPORT = re.compile(r"^from[ \t]+__future__[ \t]+import[ \t]")


@dataclass(frozen=True)
class Block:
    """One fenced ```python block: where it starts in the page, and its code."""

    page: Path
    line: int  # 1-based line number of the first line of code, right after the opening fence
    code: str

    @property
    def where(self) -> str:
        return f"{_rel(self.page)}:{self.line}"


def _rel(path: Path) -> str:
    try:
        return path.relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


def python_blocks(page: Path) -> list[Block]:
    """The ```python blocks of a markdown page, in order.

    Fences follow CommonMark: ``` or ~~~ (three or more), closed by a fence of the same character
    that is at least as long. The language is the first word of the info string. Indented fences
    (in list items) are dedented by the indentation of their opening fence.
    """
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _OPENING_FENCE.match(lines[i])
        if opening is None or (opening["fence"][0] == "`" and "`" in opening["info"]):
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        language = (opening["info"].split() or [""])[0].lower()
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        start = i + 1
        end = start
        while end < len(lines) and not closing.match(lines[end]):
            end += 1
        if end == len(lines):
            pytest.fail(f"{_rel(page)}:{i + 1}: code fence {fence} is never closed", pytrace=False)
        if language == "python":
            body = [_dedent(line, indent) for line in lines[start:end]]
            blocks.append(Block(page=page, line=start + 1, code="\n".join(body)))
        i = end + 1
    return blocks


def _dedent(line: str, indent: str) -> str:
    return line[len(indent) :] if line.startswith(indent) else line.lstrip(" \t")


def build_script(blocks: list[Block]) -> tuple[str, dict[int, tuple[Path, int]]]:
    """Join ``blocks`` into one script; map each script line back to its page and line.

    ``from __future__`` imports must come first in a module, so they are moved to the top of
    the script (and replaced by a blank line where they were, which keeps the line numbers).
    """
    future: list[str] = []
    body: list[str] = []
    origin: dict[int, tuple[Path, int]] = {}
    for block in blocks:
        body.append(f"# ---- {block.where}")
        for offset, line in enumerate(block.code.split("\n")):
            if _FUTURE_IMPORT.match(line):
                future.append(line)
                line = ""
            body.append(line)
            origin[len(body)] = (block.page, block.line + offset)
    script = "\n".join([*future, *body]) + "\n"
    shift = len(future)
    return script, {n + shift: where for n, where in origin.items()}


def _point_at_pages(output: str, script: Path, origin: dict[int, tuple[Path, int]]) -> str:
    """Rewrite ``File "<script>", line N`` in a traceback to the markdown page and line."""

    def replace(match: re.Match[str]) -> str:
        where = origin.get(int(match["line"]))
        if where is None:
            return match[0]
        return f'File "{_rel(where[0])}", line {where[1]}'

    pattern = rf'File "{re.escape(str(script))}", line (?P<line>\d+)'
    return re.sub(pattern, replace, output)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAGOMPY_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(
    command: list[str], *, cwd: Path, logs: Path, timeout: float
) -> tuple[int | None, str, str]:
    """Run ``command`` in its own process group; return (exit status, stdout, stderr).

    The exit status is None if the command timed out. Output goes to files in ``logs``, not to
    pipes, so a background process the command leaves behind (a Ray node, say) cannot keep the
    test waiting for the end of the output. Whatever is left of the process group is killed.
    """
    out_path, err_path = logs / "stdout.txt", logs / "stderr.txt"
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=_clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        try:
            status: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    return status, stdout, stderr


@dataclass(frozen=True)
class PageRun:
    """A page's script, run: where it and its working directory are, and how it ended."""

    blocks: list[Block]
    origin: dict[int, tuple[Path, int]]
    script: Path
    workdir: Path
    status: int | None  # None: timed out
    stdout: str
    stderr: str


def _run_page(page: Path, directory: Path) -> PageRun | None:
    """Run the python blocks of ``page`` as one script in ``directory``; None if it has none."""
    blocks = python_blocks(page)
    if not blocks:
        return None
    script_text, origin = build_script(blocks)
    script_dir = directory / "script"
    workdir = directory / "cwd"
    script_dir.mkdir()
    workdir.mkdir()
    script = script_dir / (page.stem + "_examples.py")
    script.write_text(script_text, encoding="utf-8")
    status, stdout, stderr = _run(
        [sys.executable, str(script)], cwd=workdir, logs=script_dir, timeout=SNIPPET_TIMEOUT
    )
    return PageRun(blocks, origin, script, workdir, status, stdout, stderr)


@pytest.fixture(scope="module")
def page_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[Path, Future[PageRun | None]]]:
    """The scripts of the pages whose tests were selected, started in the tests' order,
    ``PAGE_CONCURRENCY`` at a time; by page."""
    pages: list[Path] = []
    for item in request.session.items:
        if (
            isinstance(item, pytest.Function)
            and item.module is request.module
            and item.originalname == "test_python_examples_run"
        ):
            page = item.callspec.params["page"]
            assert isinstance(page, Path), page
            pages.append(page)
    pool = ThreadPoolExecutor(PAGE_CONCURRENCY, thread_name_prefix="docs-page")
    try:
        yield {
            page: pool.submit(_run_page, page, tmp_path_factory.mktemp(f"docs-{page.stem}"))
            for page in pages
        }
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(REPO).as_posix() for p in PAGES])
def test_python_examples_run(page: Path, page_runs: dict[Path, Future[PageRun | None]]) -> None:
    run = page_runs[page].result()
    if run is None:
        return  # nothing to run on this page; test_docs_have_python_examples guards the total
    if run.status == 0:
        return
    where = ", ".join(block.where for block in run.blocks)
    problem = (
        f"timed out after {SNIPPET_TIMEOUT:.0f} s"
        if run.status is None
        else f"exited with {run.status}"
    )
    pytest.fail(
        f"python examples of {_rel(page)} {problem}\n"
        f"blocks: {where}\n"
        f"script: {run.script} (working directory {run.workdir})\n"
        f"--- stderr\n{_point_at_pages(run.stderr, run.script, run.origin)}\n"
        f"--- stdout\n{_point_at_pages(run.stdout, run.script, run.origin)}",
        pytrace=False,
    )


def test_docs_have_python_examples() -> None:
    # Without this, a broken fence parser or an empty docs/ would make the suite test nothing.
    assert PAGES, f"no markdown pages found under {DOCS}"
    blocks = [block for page in PAGES for block in python_blocks(page)]
    assert blocks, f"no ```python block in any of the {len(PAGES)} pages under {DOCS}"


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    command = [
        sys.executable, "-m", "mkdocs", "build", "--strict",
        "-f", str(REPO / "mkdocs.yml"), "-d", str(site),
    ]  # fmt: skip
    status, stdout, stderr = _run(command, cwd=tmp_path, logs=tmp_path, timeout=MKDOCS_TIMEOUT)
    if status != 0:
        problem = f"timed out after {MKDOCS_TIMEOUT:.0f} s" if status is None else "failed"
        pytest.fail(
            f"`mkdocs build --strict` {problem} (exit {status})\n"
            f"--- stderr\n{stderr}\n--- stdout\n{stdout}",
            pytrace=False,
        )
    assert (site / "index.html").is_file()


# --------------------------------------------------------------------------- the fence parser


def test_fence_parser(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n"
        "```python\n"
        "x = 1\n"
        "```\n"
        "```bash\n"
        "echo no\n"
        "```\n"
        '````python title="nested"\n'
        "s = '''\n"
        "```\n"
        "'''\n"
        "````\n"
        "- item\n"
        "\n"
        "    ~~~python\n"
        "    if x:\n"
        "        y = 2\n"
        "    ~~~\n"
        "```pycon\n"
        ">>> 1\n"
        "```\n"
        "```py\n"
        "not run\n"
        "```\n",
        encoding="utf-8",
    )
    blocks = python_blocks(page)
    assert [(b.line, b.code) for b in blocks] == [
        (3, "x = 1"),
        (9, "s = '''\n```\n'''"),
        (16, "if x:\n    y = 2"),
    ]


def test_script_maps_lines_back_to_pages(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    blocks = [
        Block(page=page, line=5, code="import os"),
        Block(page=page, line=20, code="from __future__ import annotations\nraise SystemExit(3)"),
    ]
    script_text, origin = build_script(blocks)
    lines = script_text.splitlines()
    assert lines[0] == "from __future__ import annotations"
    raise_at = lines.index("raise SystemExit(3)") + 1
    assert origin[raise_at] == (page, 21)
    compile(script_text, "script.py", "exec")  # the moved __future__ import is legal
