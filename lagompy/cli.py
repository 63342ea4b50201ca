"""The ``lagompy`` command line.

The command is assembled from the modules named in :data:`COMMAND_MODULES`. Each of them
defines ``register_cli(app: typer.Typer) -> None`` and adds its commands (``@app.command()``)
or a sub-application (``app.add_typer(sub, name="journal")``) to the root application. To add
commands to ``lagompy``, write ``register_cli`` in the module that owns them and append the
module's name to :data:`COMMAND_MODULES`.

Rules for command modules:

* Keep the module cheap to import. ``lagompy --help`` imports every module listed here, so
  import heavy dependencies (Ray, SQLAlchemy, FastAPI, ...) inside the command functions.
* Raise :class:`~lagompy.errors.LagompyError` (or a subclass) for every failure the user
  should see as a message. The root command group turns it into one line,
  ``error: <message>`` on stderr, and exit status 1 — commands never print tracebacks for
  expected failures and never call ``sys.exit`` themselves. Any other exception is a bug and
  keeps its traceback. Usage errors (unknown command, bad option) exit with status 2.
"""

from __future__ import annotations

import importlib
import platform
from collections.abc import Iterable, Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from lagompy.errors import ConfigurationError, LagompyError

__all__ = [
    "COMMAND_MODULES",
    "LagompyGroup",
    "build_app",
    "format_error",
    "main",
    "package_version",
    "register_cli",
]

#: Modules whose ``register_cli(app)`` contributes commands to ``lagompy``, in help order.
COMMAND_MODULES: tuple[str, ...] = (
    "lagompy.cli",
    "lagompy.sql._cli",
    "lagompy.journal._cli",
    "lagompy.readside._cli",
    "lagompy.topic._cli",
    "lagompy.process._cli",
    "lagompy.workflow._cli",
    "lagompy.service._cli",
)

PROG_NAME = "lagompy"

_HELP = (
    "lagompy: Lagom-style event sourcing for Python.\n\n"
    "Persistent entities turn commands into events, store them in a SQL journal (SQLite or "
    "PostgreSQL) with snapshots, run sharded on Ray, and feed read sides; services expose "
    "them over FastAPI. This command inspects and operates a lagompy installation."
)

_EPILOG = "Run 'lagompy COMMAND --help' for the options of a command."


def format_error(exc: BaseException) -> str:
    """Render ``exc`` as the single line the CLI prints: ``error: <message>``."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    return f"error: {message}"


class LagompyGroup(TyperGroup):
    """Root command group: translates :class:`LagompyError` into ``error: ...`` and exit 1.

    Every command, including those of sub-applications added with ``app.add_typer``, runs
    inside the root group's :meth:`invoke`, so this is the one place where expected failures
    are turned into a message. Click's own exceptions (usage errors, ``typer.Exit``,
    ``typer.Abort``) are not LagompyErrors and pass through unchanged.
    """

    # ``ctx`` is a click Context; its class lives in a private module of newer typer releases
    # (typer vendors click), so it is left unannotated here to stay compatible with both.
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except LagompyError as exc:
            typer.echo(format_error(exc), err=True)
            raise typer.Exit(1) from None


def _root_callback() -> None:
    # A root callback keeps the application a command *group* even while it has a single
    # command; otherwise typer would collapse it into that command (no ``version`` verb).
    pass


def build_app(modules: Iterable[str] | None = None) -> typer.Typer:
    """Build the ``lagompy`` application from ``modules`` (default: :data:`COMMAND_MODULES`).

    Raises :class:`~lagompy.errors.ConfigurationError` if a listed module has no
    ``register_cli`` function.
    """
    app = typer.Typer(
        name=PROG_NAME,
        cls=LagompyGroup,
        help=_HELP,
        epilog=_EPILOG,
        no_args_is_help=True,
        add_completion=False,
        # Locals of a crashing command may hold connection URLs with passwords.
        pretty_exceptions_show_locals=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_root_callback)
    for name in COMMAND_MODULES if modules is None else modules:
        _register_module(app, name)
    return app


def _register_module(app: typer.Typer, module_name: str) -> None:
    module = importlib.import_module(module_name)
    register: object = getattr(module, "register_cli", None)
    if not callable(register):
        raise ConfigurationError(
            f"module {module_name!r} is listed in lagompy.cli.COMMAND_MODULES "
            "but defines no register_cli(app) function"
        )
    register(app)


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``lagompy`` with ``argv`` (default: ``sys.argv[1:]``); exits the process."""
    try:
        app = build_app()
    except LagompyError as exc:
        typer.echo(format_error(exc), err=True)
        raise SystemExit(1) from None
    app(args=None if argv is None else list(argv), prog_name=PROG_NAME)


# --------------------------------------------------------------------------- commands


def package_version(distribution: str = "lagompy") -> str:
    """The installed version of ``distribution``, read from its metadata without importing it.

    Returns ``"not installed"`` when the distribution is not installed.
    """
    from importlib import metadata  # ~40 ms: not for `lagompy --help`

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def version(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Also show the versions of Python, SQLAlchemy and Ray."
        ),
    ] = False,
) -> None:
    """Show the installed lagompy version."""
    lines = [f"lagompy {package_version('lagompy')}"]
    if verbose:
        # Versions come from package metadata: nothing heavy (Ray!) is imported to print them.
        lines += [
            f"python {platform.python_version()} ({platform.python_implementation()})",
            f"sqlalchemy {package_version('sqlalchemy')}",
            f"ray {package_version('ray')}",
        ]
    for line in lines:
        typer.echo(line)


def register_cli(app: typer.Typer) -> None:
    """Add the commands this module owns (``version``) to ``app``."""
    app.command("version")(version)
