"""``lagompy workflows``: list, inspect and operate workflow runs of a running service.

Unlike ``lagompy projections`` and ``lagompy topics`` (whose operations are rows of an offset
table, flipped in the database), a run is an entity: cancel, resume, retry and signal are
commands to it, which the service's entity runtime hosts, and its input and output decode
with the service's own workflow types. So the command talks to the service's workflow routes
over HTTP (``--url``, default ``LAGOMPY_WORKFLOWS_URL``, else ``http://127.0.0.1:8000``;
``--token``/``LAGOMPY_WORKFLOWS_TOKEN`` is sent as a bearer token)::

    lagompy workflows list [--workflow W] [--status S] [--since T] [--until T] [--id-prefix P]
    lagompy workflows show RUN_ID [--json]
    lagompy workflows start WORKFLOW INPUT_JSON [--id ID] [--key KEY]
    lagompy workflows cancel|resume RUN_ID                      # or a filter and --yes (bulk)
    lagompy workflows retry RUN_ID --position N                 # or a filter and --yes (bulk)
    lagompy workflows signal RUN_ID NAME [--payload JSON]       # or a filter and --yes (bulk)
    lagompy workflows types
    lagompy workflows pause|unpause WORKFLOW
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import typer

from lagompy.errors import ConfigurationError, WorkflowError

__all__ = ["register_cli"]

DEFAULT_URL = "http://127.0.0.1:8000"

UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        help=f"The service's base URL (default: LAGOMPY_WORKFLOWS_URL, else {DEFAULT_URL}).",
        show_default=False,
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="A bearer token for the service (default: LAGOMPY_WORKFLOWS_TOKEN).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
PrefixOption = Annotated[
    str,
    typer.Option("--prefix", help="The path of the workflow routes on the service."),
]
WorkflowFilter = Annotated[
    str | None, typer.Option("--workflow", "-w", help="Runs of this workflow.", show_default=False)
]
StatusFilter = Annotated[
    list[str] | None,
    typer.Option(
        "--status",
        "-s",
        help="Runs in this status (queued, running, completed, failed, cancelled; repeat it).",
        show_default=False,
    ),
]
SinceFilter = Annotated[
    str | None,
    typer.Option("--since", help="Runs started at or after (ISO 8601).", show_default=False),
]
UntilFilter = Annotated[
    str | None, typer.Option("--until", help="Runs started before (ISO 8601).", show_default=False)
]
PrefixFilter = Annotated[
    str | None,
    typer.Option("--id-prefix", help="Runs whose id starts with this.", show_default=False),
]
KeyFilter = Annotated[
    str | None, typer.Option("--key", help="Runs of this key.", show_default=False)
]
YesOption = Annotated[
    bool, typer.Option("--yes", help="Act on every run the filter matches (a bulk action).")
]
RunIdArg = Annotated[
    str | None,
    typer.Argument(help="The run's id (or none, with a filter and --yes).", show_default=False),
]


class _Client:
    def __init__(self, url: str | None, token: str | None, prefix: str) -> None:
        self.base = (url or os.environ.get("LAGOMPY_WORKFLOWS_URL") or DEFAULT_URL).rstrip("/")
        token = token or os.environ.get("LAGOMPY_WORKFLOWS_TOKEN")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.prefix = "/" + prefix.strip("/")
        # Here, not at the module's top: `lagompy --help` imports no pydantic (tests/test_imports).
        from lagompy.settings import without_password

        #: The URL as errors show it (a password in it as ***).
        self.shown = without_password(self.base)

    def call(
        self, method: str, path: str, *, params: dict[str, Any] | None = None, body: Any = None
    ) -> Any:
        import httpx

        url = f"{self.base}{self.prefix}{path}"
        content = None if body is None else json.dumps(body).encode()
        headers = {**self.headers, **({"Content-Type": "application/json"} if content else {})}
        try:
            response = httpx.request(
                method, url, params=params, content=content, headers=headers, timeout=60
            )
        except httpx.HTTPError as e:
            raise ConfigurationError(
                f"cannot reach the service at {self.shown} ({type(e).__name__}): check --url "
                "or LAGOMPY_WORKFLOWS_URL"
            ) from None
        if response.status_code < 400:
            return response.json()
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code == 404 and not (isinstance(body, dict) and body.get("detail")):
            # No route there (a run or workflow not found comes with a detail saying so).
            raise ConfigurationError(
                f"the service at {self.shown} has no workflow routes under {self.prefix} (404): "
                "check --url (or LAGOMPY_WORKFLOWS_URL) and --prefix"
            )
        raise WorkflowError(f"{response.status_code}: {_detail(response, body)}")


def _detail(response: Any, body: Any) -> str:
    """The error of a reply whose JSON body is ``body`` (None: not JSON)."""
    if body is None:
        return str(response.text[:300] or response.reason_phrase)
    if isinstance(body, dict):
        detail = body.get("detail") or body.get("title")
        if isinstance(detail, list):  # FastAPI's validation errors
            detail = "; ".join(
                f"{'.'.join(str(p) for p in d.get('loc', ()))}: {d.get('msg')}" for d in detail
            )
        return str(detail)
    return str(body)[:300]


def _filter(
    workflow: str | None,
    status: list[str] | None,
    since: str | None,
    until: str | None,
    id_prefix: str | None,
    key: str | None,
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "workflow": workflow,
        "status": ",".join(status or []) or None,
        "since": since,
        "until": until,
        "id_prefix": id_prefix,
        "key": key,
    }
    return {k: v for k, v in params.items() if v}


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def list_runs(
    workflow: WorkflowFilter = None,
    status: StatusFilter = None,
    since: SinceFilter = None,
    until: UntilFilter = None,
    id_prefix: PrefixFilter = None,
    key: KeyFilter = None,
    limit: Annotated[int, typer.Option("--limit", help="At most this many runs.", min=1)] = 100,
    as_json: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
    prefix: PrefixOption = "/workflows",
) -> None:
    """List runs by id, filtered: status, steps, start, duration, error."""
    client = _Client(url, token, prefix)
    params = _filter(workflow, status, since, until, id_prefix, key)
    runs: list[dict[str, Any]] = []
    after: str | None = None
    while len(runs) < limit:
        page = client.call(
            "GET", "", params={**params, "limit": min(1000, limit - len(runs)), "after": after}
        )
        runs += page["runs"]
        after = page["next"]
        if after is None:
            break
    if as_json:
        typer.echo(json.dumps(runs, indent=2))
        return
    if not runs:
        typer.echo("no run matches")
        return
    header = ["RUN", "WORKFLOW", "VERSION", "STATUS", "STEPS", "STARTED", "DURATION S", "ERROR"]
    rows = [
        [
            r["run_id"], r["workflow"], str(r["version"]), r["status"], str(r["steps"]),
            r["started_at"][:23], _cell(r["duration_s"]), _cell(r["error"])[:80],
        ]
        for r in runs
    ]  # fmt: skip
    typer.echo(_table(header, rows))


def show(
    run_id: Annotated[str, typer.Argument(help="The run's id.")],
    as_json: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
    prefix: PrefixOption = "/workflows",
) -> None:
    """Show one run: status, input, output, error, steps with their times, compensations."""
    run = _Client(url, token, prefix).call("GET", f"/{run_id}")
    if as_json:
        typer.echo(json.dumps(run, indent=2))
        return
    lines = [
        f"run {run['run_id']}: {run['workflow']} version {run['version']}, {run['status']}",
        f"  started {run['started_at']}, finished {_cell(run['finished_at'])}, "
        f"duration {_cell(run['duration_s'])} s",
        f"  input: {json.dumps(run.get('input'))}",
    ]
    if run.get("output") is not None:
        lines.append(f"  output: {json.dumps(run['output'])}")
    for name in ("key", "parent", "cancel_reason", "error"):
        if run.get(name):
            lines.append(f"  {name}: {run[name]}")
    lines.append("  steps:")
    for s in run["steps"]:
        outcome = "ok" if s["ok"] else f"FAILED {s['error_type']}: {s['error']}"
        lines.append(
            f"    {s['position']:>3}  {s['name']}  {outcome}  at {_cell(s['at'])}  "
            f"{_cell(s['seconds'])} s"
        )
    for c in run["compensations"]:
        outcome = "ran" if c["ok"] else f"FAILED {c['error']}"
        lines.append(f"  compensation {c['index']} {c['name']}: {outcome}")
    for sig in run["signals"]:
        lines.append(f"  signal {sig['index']} {sig['name']} at {sig['at']}")
    typer.echo("\n".join(lines))


def start(
    workflow: Annotated[str, typer.Argument(help="The workflow's name.")],
    input_json: Annotated[str, typer.Argument(metavar="INPUT_JSON", help="The input, as JSON.")],
    run_id: Annotated[
        str | None, typer.Option("--id", help="The run's id (idempotency key).", show_default=False)
    ] = None,
    key: Annotated[
        str | None,
        typer.Option("--key", help="One run of this key at a time.", show_default=False),
    ] = None,
    url: UrlOption = None,
    token: TokenOption = None,
    prefix: PrefixOption = "/workflows",
) -> None:
    """Start a run of WORKFLOW with INPUT_JSON (checked against its input type)."""
    try:
        value = json.loads(input_json)
    except ValueError:
        raise ConfigurationError("INPUT_JSON is not valid JSON") from None
    body = {"workflow": workflow, "input": value, "id": run_id, "key": key}
    started = _Client(url, token, prefix).call(
        "POST", "", body={k: v for k, v in body.items() if v is not None or k == "input"}
    )
    typer.echo(f"run {started['run_id']}: {started['workflow']} version {started['version']}")


def _act(
    action: str,
    run_id: str | None,
    filters: dict[str, Any],
    yes: bool,
    body: dict[str, Any],
    client: _Client,
    path: str,
    params: dict[str, Any] | None = None,
) -> None:
    if run_id is not None:
        if filters:
            raise ConfigurationError("give a run id or a filter, not both")
        result = client.call("POST", f"/{run_id}{path}", params=params, body=body or None)
        typer.echo(f"run {run_id}: {action} ({json.dumps(result)})")
        return
    if not filters:
        raise ConfigurationError("give a run id, or a filter (--workflow, --status...) and --yes")
    if not yes:
        found = client.call("GET", "", params={**filters, "limit": 1000})
        more = "+" if found["next"] else ""
        raise ConfigurationError(
            f"{action} would act on {len(found['runs'])}{more} runs: add --yes to do it"
        )
    result = client.call(
        "POST", f"/_bulk/{action}", params=filters, body={**body, **(params or {})}
    )
    typer.echo(f"{action}: {result['done']} of {result['matched']} runs ({result['filter']})")
    for refused, why in result["refused"].items():
        typer.echo(f"  {refused}: {why}")


def cancel(
    run_id: RunIdArg = None,
    reason: Annotated[
        str | None, typer.Option("--reason", help="Why (kept with the run).", show_default=False)
    ] = None,
    workflow: WorkflowFilter = None,
    status: StatusFilter = None,
    since: SinceFilter = None,
    until: UntilFilter = None,
    id_prefix: PrefixFilter = None,
    key: KeyFilter = None,
    yes: YesOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
    prefix: PrefixOption = "/workflows",
) -> None:
    """Cancel a run (its compensations run), or every run of a filter with --yes."""
    filters = _filter(workflow, status, since, until, id_prefix, key)
    body = {"reason": reason} if reason else {}
    _act("cancel", run_id, filters, yes, body, _Client(url, token, prefix), "/cancel")


def resume(
    run_id: RunIdArg = None,
    workflow: WorkflowFilter = None,
    status: StatusFilter = None,
    since: SinceFilter = None,
    until: UntilFilter = None,
    id_prefix: PrefixFilter = None,
    key: KeyFilter = None,
    yes: YesOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
    prefix: PrefixOption = "/workflows",
) -> None:
    """Run a failed or cancelled run again from its failed step (or every run of a filter)."""
    filters = _filter(workflow, status, since, until, id_prefix, key)
    _act("resume", run_id, filters, yes, {}, _Client(url, token, prefix), "/resume")


def retry(
    run_id: RunIdArg = None,
    position: Annotated[
        int, typer.Option("--position", help="Run again from this step (0: the first).", min=0)
    ] = 0,
    workflow: WorkflowFilter = None,
    status: StatusFilter = None,
    since: SinceFilter = None,
    until: UntilFilter = None,
    id_prefix: PrefixFilter = None,
    key: KeyFilter = None,
    yes: YesOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
    prefix: PrefixOption = "/workflows",
) -> None:
    """Run a finished run again from step --position (the steps from there on are dropped)."""
    filters = _filter(workflow, status, since, until, id_prefix, key)
    client = _Client(url, token, prefix)
    if run_id is not None:
        _act("retry", run_id, filters, yes, {}, client, "/retry", {"position": position})
    else:
        _act("retry", None, filters, yes, {"position": position}, client, "/retry")


def signal(
    run_id: RunIdArg = None,
    name: Annotated[str, typer.Option("--name", "-n", help="The signal's name.")] = "",
    payload: Annotated[
        str | None, typer.Option("--payload", help="The payload, as JSON.", show_default=False)
    ] = None,
    workflow: WorkflowFilter = None,
    status: StatusFilter = None,
    since: SinceFilter = None,
    until: UntilFilter = None,
    id_prefix: PrefixFilter = None,
    key: KeyFilter = None,
    yes: YesOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
    prefix: PrefixOption = "/workflows",
) -> None:
    """Send signal --name (with --payload) to a run, or to every run of a filter with --yes."""
    if not name:
        raise ConfigurationError("give the signal's name (--name)")
    value: Any = None
    if payload is not None:
        try:
            value = json.loads(payload)
        except ValueError:
            raise ConfigurationError("--payload is not valid JSON") from None
    filters = _filter(workflow, status, since, until, id_prefix, key)
    client = _Client(url, token, prefix)
    if run_id is not None:
        if filters:
            raise ConfigurationError("give a run id or a filter, not both")
        result = client.call("POST", f"/{run_id}/signal/{name}", body=value)
        typer.echo(f"run {run_id}: signal {name!r} delivered (index {result['index']})")
        return
    _act("signal", None, filters, yes, {"signal": name, "payload": value}, client, "")


def list_types(
    as_json: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
    prefix: PrefixOption = "/workflows",
) -> None:
    """List the workflows: latest version, max running, paused, runs per status."""
    found = _Client(url, token, prefix).call("GET", "/types")
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    statuses = ["queued", "running", "completed", "failed", "cancelled"]
    header = ["WORKFLOW", "VERSION", "MAX RUNNING", "PAUSED", *(s.upper() for s in statuses)]
    rows = [
        [
            t["workflow"], _cell(t["latest_version"]), _cell(t["max_running"]),
            "yes" if t["paused"] else "no", *(str(t["counts"].get(s, 0)) for s in statuses),
        ]
        for t in found
    ]  # fmt: skip
    typer.echo(_table(header, rows) if rows else "no workflows")


def pause(
    workflow: Annotated[str, typer.Argument(help="The workflow's name.")],
    url: UrlOption = None,
    token: TokenOption = None,
    prefix: PrefixOption = "/workflows",
) -> None:
    """Admit no new run of WORKFLOW (they queue); running runs go on."""
    _Client(url, token, prefix).call("POST", f"/types/{workflow}/pause")
    typer.echo(f"workflow {workflow!r}: paused")


def unpause(
    workflow: Annotated[str, typer.Argument(help="The workflow's name.")],
    url: UrlOption = None,
    token: TokenOption = None,
    prefix: PrefixOption = "/workflows",
) -> None:
    """Admit runs of WORKFLOW again."""
    _Client(url, token, prefix).call("POST", f"/types/{workflow}/unpause")
    typer.echo(f"workflow {workflow!r}: admitting runs again")


_HELP = (
    "Inspect and operate workflow runs: list, show, start, cancel, resume, retry, signal, "
    "types, pause, unpause.\n\nThe command talks to the service's workflow routes over HTTP "
    "(--url, default LAGOMPY_WORKFLOWS_URL, else http://127.0.0.1:8000): runs are entities "
    "that the service hosts, so their operations go through it."
)


def register_cli(app: typer.Typer) -> None:
    """Add ``lagompy workflows ...`` to ``app``."""
    sub = typer.Typer(
        help=_HELP, no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]}
    )
    sub.command("list")(list_runs)
    sub.command("show")(show)
    sub.command("start")(start)
    sub.command("cancel")(cancel)
    sub.command("resume")(resume)
    sub.command("retry")(retry)
    sub.command("signal")(signal)
    sub.command("types")(list_types)
    sub.command("pause")(pause)
    sub.command("unpause")(unpause)
    app.add_typer(sub, name="workflows")
