"""The ``lagompy`` command line: the installed console script, ``python -m lagompy``, and the
error translation every command gets from the root group."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import types
from importlib import metadata
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from lagompy import cli
from lagompy.errors import ConcurrencyConflict, ConfigurationError, JournalUnavailable

LAGOMPY_VERSION = metadata.version("lagompy")


def _console_script() -> str:
    """The ``lagompy`` script installed next to the interpreter running the tests."""
    beside = Path(sys.executable).parent / "lagompy"
    if beside.is_file():
        return str(beside)
    found = shutil.which("lagompy")
    if found is None:
        pytest.fail(
            "the lagompy console script is not installed "
            f"(looked in {beside.parent} and on PATH); run `pip install -e .`"
        )
    return found


def _run(how: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a separate process, either as the console script or via ``-m``."""
    command = [_console_script()] if how == "script" else [sys.executable, "-m", "lagompy"]
    env = {**os.environ, "COLUMNS": "100", "NO_COLOR": "1"}
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


HOW = pytest.mark.parametrize("how", ["script", "module"])


@HOW
def test_help_says_what_lagompy_is_and_lists_commands(how: str) -> None:
    proc = _run(how, "--help")
    assert proc.returncode == 0, _describe(proc)
    assert "Usage: lagompy" in proc.stdout
    assert "event sourcing" in proc.stdout
    assert "version" in proc.stdout
    assert "Show the installed lagompy version." in proc.stdout


@HOW
def test_version_prints_the_installed_package_version(how: str) -> None:
    proc = _run(how, "version")
    assert proc.returncode == 0, _describe(proc)
    assert proc.stdout == f"lagompy {LAGOMPY_VERSION}\n"
    assert proc.stderr == ""


@HOW
def test_verbose_version_adds_python_sqlalchemy_and_ray(how: str) -> None:
    proc = _run(how, "version", "--verbose")
    assert proc.returncode == 0, _describe(proc)
    lines = proc.stdout.splitlines()
    assert lines[0] == f"lagompy {LAGOMPY_VERSION}"
    assert lines[1].startswith(f"python {sys.version_info.major}.{sys.version_info.minor}.")
    assert lines[2] == f"sqlalchemy {metadata.version('sqlalchemy')}"
    assert lines[3] == f"ray {metadata.version('ray')}"


@HOW
def test_unknown_subcommand_is_a_usage_error(how: str) -> None:
    proc = _run(how, "no-such-command")
    assert proc.returncode == 2, _describe(proc)
    assert "No such command" in proc.stderr
    assert "no-such-command" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_and_version_do_not_import_ray() -> None:
    script = textwrap.dedent(
        """
        import sys
        from lagompy.cli import main

        for argv in (["--help"], ["version"]):
            try:
                main(argv)
            except SystemExit as exc:
                assert exc.code in (0, None), (argv, exc.code)
        print("ray imported" if "ray" in sys.modules else "ray not imported")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, _describe(proc)
    assert proc.stdout.splitlines()[-1] == "ray not imported", (
        "`lagompy --help` / `lagompy version` must not import ray: import it inside the commands"
        " that need it (and keep it out of lagompy/__init__.py)"
    )


def test_help_and_import_lagompy_do_not_import_the_http_stack() -> None:
    # `lagompy --help` imports every command module, lagompy.service._cli among them: the
    # service package loads its names on first use, so that neither it nor `import lagompy`
    # (every shard host and read-side actor) pays for FastAPI, httpx and prometheus_client.
    script = textwrap.dedent(
        """
        import sys
        from lagompy.cli import main

        try:
            main(["--help"])
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
        heavy = ("fastapi", "starlette", "httpx", "prometheus_client", "pybreaker")
        print(sorted(m for m in heavy if m in sys.modules))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, _describe(proc)
    assert proc.stdout.splitlines()[-1] == "[]"


# --------------------------------------------------------------------------- in process


@pytest.fixture
def throwaway_module(monkeypatch: pytest.MonkeyPatch) -> str:
    """A command module, registered the way real ones are, whose commands fail on purpose."""

    def register_cli(app: typer.Typer) -> None:
        @app.command("fail")
        def fail() -> None:
            raise JournalUnavailable("cannot reach the journal at postgresql://db:5432/app")

        @app.command("fail-multiline")
        def fail_multiline() -> None:
            raise ConfigurationError("first line\n  second line")

        @app.command("crash")
        def crash() -> None:
            raise RuntimeError("a bug, not a LagompyError")

        sub = typer.Typer(help="A sub-application, as migrations or projections will add.")

        @sub.command("conflict")
        def conflict(entity_id: str) -> None:
            raise ConcurrencyConflict(
                entity_type="Account", entity_id=entity_id, expected_seq_nr=3, actual_seq_nr=4
            )

        app.add_typer(sub, name="sub")

    module = types.ModuleType("lagompy_throwaway_cli")
    module.register_cli = register_cli  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module.__name__


def test_lagompy_error_becomes_one_line_and_exit_status_1(throwaway_module: str) -> None:
    app = cli.build_app(modules=("lagompy.cli", throwaway_module))
    result = CliRunner().invoke(app, ["fail"], prog_name="lagompy")
    assert result.exit_code == 1, result.output
    assert result.stderr == "error: cannot reach the journal at postgresql://db:5432/app\n"
    assert result.stdout == ""
    assert "Traceback" not in result.output


def test_multiline_message_is_printed_on_one_line(throwaway_module: str) -> None:
    app = cli.build_app(modules=(throwaway_module,))
    result = CliRunner().invoke(app, ["fail-multiline"], prog_name="lagompy")
    assert result.exit_code == 1
    assert result.stderr == "error: first line second line\n"


def test_errors_in_sub_application_commands_are_translated_too(throwaway_module: str) -> None:
    app = cli.build_app(modules=(throwaway_module,))
    result = CliRunner().invoke(app, ["sub", "conflict", "acc-1"], prog_name="lagompy")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: concurrent write to Account/acc-1: ")


def test_other_exceptions_are_bugs_and_are_not_translated(throwaway_module: str) -> None:
    app = cli.build_app(modules=(throwaway_module,))
    result = CliRunner().invoke(app, ["crash"], prog_name="lagompy")
    assert isinstance(result.exception, RuntimeError)
    assert "error:" not in result.stderr


def test_usage_errors_keep_exit_status_2(throwaway_module: str) -> None:
    app = cli.build_app(modules=(throwaway_module,))
    result = CliRunner().invoke(app, ["sub", "conflict"], prog_name="lagompy")
    assert result.exit_code == 2
    assert "Missing argument" in result.stderr


def test_registered_modules_appear_in_help(throwaway_module: str) -> None:
    app = cli.build_app(modules=("lagompy.cli", throwaway_module))
    result = CliRunner().invoke(app, ["--help"], prog_name="lagompy")
    assert result.exit_code == 0
    for command in ("version", "fail", "sub"):
        assert command in result.stdout


def test_module_without_register_cli_is_reported_by_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = types.ModuleType("lagompy_empty_cli")
    monkeypatch.setitem(sys.modules, empty.__name__, empty)
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("lagompy.cli", empty.__name__))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["version"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err == (
        "error: module 'lagompy_empty_cli' is listed in lagompy.cli.COMMAND_MODULES "
        "but defines no register_cli(app) function\n"
    )


def test_every_listed_command_module_registers() -> None:
    # Guards COMMAND_MODULES as other modules add themselves: each must import and register.
    app = cli.build_app()
    result = CliRunner().invoke(app, ["--help"], prog_name="lagompy")
    assert result.exit_code == 0, result.output
    assert "version" in result.stdout


# --------------------------------------------------------------------------- lagompy migrate


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_migrate_names_the_database_and_the_schema_it_migrated(
    backend: str, tmp_path: Path
) -> None:
    """``lagompy migrate`` says where the tables are: the database without its password and,
    on PostgreSQL, the schema."""
    import asyncio

    from sqlalchemy.engine import make_url

    from lagompy.sql import head_revision
    from tests.conftest import POSTGRES_URL, _create_schema, _drop_schema, require_postgres

    schema = None
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'm.db'}"
        args, place = ["--url", url], url
    else:
        require_postgres()
        given = make_url(POSTGRES_URL).set(password="hunter2")  # trust: any password does
        shown = f"postgresql://{given.username}@{given.host}:{given.port}/{given.database}"
        schema = asyncio.run(_create_schema())
        url = given.render_as_string(hide_password=False)
        args, place = ["--url", url, "--schema", schema], f"{shown} (schema {schema})"
    try:
        runner = CliRunner()
        first = runner.invoke(cli.build_app(), ["migrate", *args], prog_name="lagompy")
        again = runner.invoke(cli.build_app(), ["migrate", *args], prog_name="lagompy")
    finally:
        if schema is not None:
            asyncio.run(_drop_schema(schema))
    head = head_revision()
    assert first.exit_code == 0, first.output
    assert first.stdout == f"upgraded lagompy's tables in {place} from none to {head}\n"
    assert again.exit_code == 0, again.output
    assert again.stdout == f"lagompy's tables in {place} are up to date at revision {head}\n"
    assert "hunter2" not in first.stdout + again.stdout
