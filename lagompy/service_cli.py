"""``lagompy run`` (serve an app with uvicorn) and ``lagompy entities stats``.

With ``--workers`` above 1, every worker process must reach the same shard hosts: ``run``
attaches them all to one Ray cluster, the one at ``--ray-address`` (or ``RAY_ADDRESS``) or else
a Ray head it starts itself for the lifetime of the command, and never lets each worker start a
Ray of its own. It also turns on prometheus_client's multiprocess mode (a temporary
``PROMETHEUS_MULTIPROC_DIR``) so that ``/metrics`` adds up every worker's figures.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import tempfile
from typing import Annotated, Any

import typer

from lagompy.errors import ConfigurationError

__all__ = ["entities_stats", "register_cli", "run"]

WORKERS_ENV = "LAGOMPY_WORKERS"  # the same name as lagompy.service.WORKERS_ENV


def _load_app(target: str) -> Any:
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(f"{target!r} is not MODULE:APP (e.g. myservice.api:app)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like uvicorn: modules of the working directory
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigurationError(f"cannot import module {module_name!r}: {e}") from e
    app = getattr(module, attribute, None)
    if app is None:
        raise ConfigurationError(f"module {module_name!r} has no attribute {attribute!r}")
    return app


def _service_of(app: Any) -> Any:
    state = getattr(app, "state", None)
    return getattr(state, "lagompy", None) if state is not None else None


def run(
    target: Annotated[str, typer.Argument(metavar="MODULE:APP", help="The ASGI app to serve.")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[
        int, typer.Option(min=1, help="Worker processes; above 1 they share one Ray cluster.")
    ] = 1,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster for the workers (default: RAY_ADDRESS, else a Ray head started "
            "by this command when --workers > 1)."
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve a FastAPI app (MODULE:APP) with uvicorn."""
    import uvicorn

    app = _load_app(target)
    service = _service_of(app)
    owned_dir: str | None = None
    owns_ray = False
    if workers > 1:
        if service is not None and service.entity_classes and not service.ray:
            raise ConfigurationError(
                f"{target} hosts its entities in-process (ray=False): {workers} workers would "
                "be that many writers per entity. Use ray=True or --workers 1"
            )
        os.environ[WORKERS_ENV] = str(workers)
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            owned_dir = tempfile.mkdtemp(prefix="lagompy-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = owned_dir
        if service is None or service.ray:
            address = ray_address or os.environ.get("RAY_ADDRESS")
            if not address:
                address, owns_ray = _start_ray_head(), True
                typer.echo(f"started a Ray head for the workers at {address}", err=True)
            os.environ["RAY_ADDRESS"] = address
    elif ray_address:
        os.environ["RAY_ADDRESS"] = ray_address
    try:
        uvicorn.run(
            target if workers > 1 else app,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
            lifespan="on",
        )
    finally:
        if owns_ray:
            import ray

            ray.shutdown()
        if owned_dir:
            shutil.rmtree(owned_dir, ignore_errors=True)


def _start_ray_head() -> str:
    import logging

    import ray

    context: Any = ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    return str(context.address_info["gcs_address"])


def entities_stats(
    app: Annotated[str, typer.Option("--app", help="The app's name (lagompy.start(app=...)).")],
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: RAY_ADDRESS).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the counters of an app's shard hosts on a running Ray cluster."""
    import asyncio
    import logging

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigurationError("no Ray cluster to attach to: give --address or set RAY_ADDRESS")
    import ray

    from lagompy.runtime import namespace_of

    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except Exception as e:
        raise ConfigurationError(f"cannot attach to Ray at {address}: {e}") from e
    try:
        namespace = namespace_of(app)
        names = sorted(
            entry["name"]
            for entry in ray.util.list_named_actors(all_namespaces=True)
            if entry["namespace"] == namespace and entry["name"].startswith("host-")
        )
        if not names:
            running = sorted(
                {
                    entry["namespace"].removeprefix("lagompy-")
                    for entry in ray.util.list_named_actors(all_namespaces=True)
                    if entry["namespace"].startswith("lagompy-")
                }
            )
            raise ConfigurationError(
                f"no app {app!r} runs on the Ray cluster at {address} (apps: {running or 'none'})"
            )
        handles = [ray.get_actor(name, namespace=namespace) for name in names]

        async def gather() -> list[dict[str, Any]]:
            return list(await asyncio.gather(*(h.stats.remote() for h in handles)))

        stats = asyncio.run(gather())
    finally:
        ray.shutdown()
    stats.sort(key=lambda s: int(s.get("index", 0)))
    if as_json:
        typer.echo(json.dumps(stats, indent=2, sort_keys=True))
        return
    columns = [
        "index", "pid", "commands", "events_persisted", "write_transactions", "batches",
        "live_entities", "activations", "passivations", "duplicates", "conflicts", "busy_seconds",
    ]  # fmt: skip
    rows = [[_cell(s.get(c)) for c in columns] for s in stats]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    typer.echo("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        typer.echo("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if not value.is_integer() else str(int(value))
    return "-" if value is None else str(value)


def register_cli(app: typer.Typer) -> None:
    """Add ``run`` and ``entities stats`` to ``app``."""
    app.command("run")(run)
    entities = typer.Typer(
        name="entities", help="Inspect an app's entities on Ray.", no_args_is_help=True
    )
    entities.command("stats")(entities_stats)
    app.add_typer(entities, name="entities")
