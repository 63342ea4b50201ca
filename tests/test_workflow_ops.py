"""Operating workflows over real HTTP, on both journal backends: a service with a
WorkflowsComponent (entities in its process) served by uvicorn; its routes list and filter
runs, inspect one (input, steps with times, output, error, compensations), start (bad input
is a 422 naming the field), cancel, resume, retry, signal, act in bulk over a filter, pause a
type; the CLI does the same through them; /metrics carries the per-type and per-step figures;
the console's Workflows page shows the runs and acts on them with the token, audited."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from typer.testing import CliRunner

from lagompy.cli import build_app
from lagompy.console import ConsoleSettings
from lagompy.service import Service
from lagompy.settings import JournalSettings
from lagompy.testkit.server import serve_in_thread
from lagompy.workflow import WorkflowRun, WorkflowsComponent, WorkflowSettings
from tests.workflow_app import AccountEntity, workflows

FAST = WorkflowSettings(lease_ttl=1.0, renew_interval=0.25, admission_interval=0.1)
TOKEN = "workflow-console-token-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}

runner = CliRunner()


def wait(check: Callable[[], Any], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture
def served(journal_settings: JournalSettings) -> Iterator[httpx.Client]:
    service = Service(
        name="wf-ops",
        entities=[AccountEntity, WorkflowRun],
        journal_settings=journal_settings,
        ray=False,
        components=[WorkflowsComponent(workflows, settings=FAST)],
    )
    app = FastAPI(lifespan=service.lifespan)
    service.install(app, console=ConsoleSettings(token=TOKEN))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        yield http


def status_of(http: httpx.Client, run_id: str) -> str:
    return str(http.get(f"/workflows/{run_id}").json()["status"])


def finished(http: httpx.Client, run_id: str, status: str) -> None:
    wait(lambda: status_of(http, run_id) == status, f"run {run_id} {status}")
    # ...and the index (the list) has caught up with it
    wait(
        lambda: [r["status"] for r in http.get("/workflows", params={"id_prefix": run_id}).json()
                 ["runs"] if r["run_id"] == run_id] == [status],
        f"the index shows {run_id} {status}",
    )  # fmt: skip


def problem(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    for word in words:
        assert word in body["detail"], body
    assert "Traceback" not in response.text and "lagompy/" not in response.text


def cli(http: httpx.Client, *args: str) -> str:
    result = runner.invoke(build_app(), ["workflows", *args, "--url", str(http.base_url)])
    assert result.exit_code == 0, result.output
    return result.output


def test_runs_are_listed_inspected_and_operated_over_http_and_the_cli(
    served: httpx.Client,
) -> None:
    http = served
    before = datetime.now(UTC) - timedelta(seconds=1)

    # bad input: named, 4xx, nothing started
    problem(
        http.post("/workflows", json={"workflow": "transfer", "input": {"source": "a"}}),
        422, "target",
    )  # fmt: skip
    problem(
        http.post("/workflows", json={"workflow": "transfer", "input": {"source": "a",
                  "target": "b", "amount": "lots"}}),
        422, "amount",
    )  # fmt: skip
    problem(http.post("/workflows", json={"workflow": "nope", "input": 1}), 422, "nope")
    problem(http.post("/workflows", json={"input": 1}), 422)
    problem(
        http.post("/workflows", content=b"{", headers={"content-type": "application/json"}), 422
    )
    assert http.get("/workflows").json() == {"runs": [], "next": None}

    # a transfer that completes, one that fails (no funds)
    ok = http.post("/workflows", json={"workflow": "transfer", "id": "t-ok",
                   "input": {"source": "bank", "target": "a", "amount": 0}})  # fmt: skip
    assert ok.json() == {"run_id": "t-ok", "workflow": "transfer", "version": 1,
                         "status": "running"}  # fmt: skip
    bad = http.post("/workflows", json={"workflow": "transfer", "id": "t-bad",
                    "input": {"source": "a", "target": "b", "amount": 50}})  # fmt: skip
    assert bad.status_code == 202
    finished(http, "t-ok", "completed")
    finished(http, "t-bad", "failed")

    detail = http.get("/workflows/t-ok").json()
    assert detail["input"] == {"source": "bank", "target": "a", "amount": 0}
    assert detail["output"] == "done" and detail["error"] is None
    assert [s["name"] for s in detail["steps"]] == ["ask wf-account Withdraw",
                                                     "ask wf-account Deposit"]  # fmt: skip
    assert all(s["ok"] and s["at"] and s["seconds"] >= 0 for s in detail["steps"])
    assert detail["history"][0]["event"] == "RunStarted"
    assert detail["history"][-1]["event"] == "RunFinished"
    failed = http.get("/workflows/t-bad").json()
    assert failed["status"] == "failed" and "insufficient funds" in failed["error"]
    assert failed["steps"][0]["ok"] is False
    assert failed["steps"][0]["error_type"] == "InvalidCommand"
    assert http.get("/workflows/t-bad", params={"values": "false"}).json().get("input") is None
    problem(http.get("/workflows/nobody"), 404, "nobody")

    # waiting runs: signal one, cancel one, the rest in bulk
    for i in range(4):
        r = http.post("/workflows", json={"workflow": "approval", "id": f"ap-{i}",
                      "input": f"who-{i}"})  # fmt: skip
        assert r.status_code == 202, r.text
    wait(lambda: len(http.get("/workflows", params={"workflow": "approval",
         "status": "running"}).json()["runs"]) == 4, "four approvals running")  # fmt: skip
    signalled = http.post("/workflows/ap-0/signal/decision", json="yes")
    assert signalled.status_code == 200 and signalled.json()["index"] == 0
    finished(http, "ap-0", "completed")
    assert http.get("/workflows/ap-0").json()["output"] == "who-0: yes"
    problem(http.post("/workflows/ap-0/signal/decision", json="again"), 409, "completed")
    problem(http.post("/workflows/ap-1/resume"), 409, "only a finished run")
    problem(http.post("/workflows/ap-1/retry", params={"position": 0}), 409)
    problem(http.post("/workflows/ap-1/retry", params={"position": -1}), 422)
    cancelled = http.post("/workflows/ap-1/cancel", json={"reason": "changed my mind"})
    assert cancelled.status_code == 200, cancelled.text
    finished(http, "ap-1", "cancelled")
    assert "changed my mind" in http.get("/workflows/ap-1").json()["error"]

    # filters and paging
    listed = http.get("/workflows", params={"workflow": "approval", "limit": 2}).json()
    assert [r["run_id"] for r in listed["runs"]] == ["ap-0", "ap-1"] and listed["next"] == "ap-1"
    rest = http.get("/workflows", params={"workflow": "approval", "after": "ap-1"}).json()
    assert [r["run_id"] for r in rest["runs"]] == ["ap-2", "ap-3"] and rest["next"] is None
    both = http.get("/workflows", params=[("status", "completed"), ("status", "failed")])
    assert {r["run_id"] for r in both.json()["runs"]} >= {"t-ok", "t-bad", "ap-0"}
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert http.get("/workflows", params={"since": later}).json()["runs"] == []
    assert len(http.get("/workflows", params={"since": before.isoformat(),
                        "until": later}).json()["runs"]) == 6  # fmt: skip
    problem(http.get("/workflows", params={"status": "lost"}), 422, "status")
    problem(http.get("/workflows", params={"since": "yesterday"}), 422, "since")
    problem(http.post("/workflows/_bulk/cancel"), 422, "all=true")
    problem(http.post("/workflows/_bulk/explode", params={"workflow": "approval"}), 404)

    # bulk: cancel what still runs of approval; resume it all; a refusal is listed
    result = http.post("/workflows/_bulk/cancel", params={"workflow": "approval",
                       "status": "running"}, json={"reason": "bulk"}).json()  # fmt: skip
    assert (result["matched"], result["done"], result["refused"]) == (2, 2, {})
    finished(http, "ap-3", "cancelled")
    finished(http, "ap-2", "cancelled")
    resumed = http.post("/workflows/_bulk/resume", params={"id_prefix": "ap-"}).json()
    assert resumed["matched"] == 4 and resumed["done"] == 4
    wait(lambda: status_of(http, "ap-2") == "running", "ap-2 running again")
    again = http.post("/workflows/_bulk/resume", params={"id_prefix": "ap-2"}).json()
    assert again["done"] == 0 and "ap-2" in again["refused"]
    wait(
        lambda: (
            {
                r["run_id"]
                for r in http.get(
                    "/workflows", params={"workflow": "approval", "status": "running"}
                ).json()["runs"]
            }
            >= {"ap-1", "ap-2", "ap-3"}
        ),
        "resumed runs",
    )
    sent = http.post(
        "/workflows/_bulk/signal",
        params={"workflow": "approval", "status": "running"},
        json={"signal": "decision", "payload": "ok"},
    ).json()
    assert sent["done"] >= 3 and set(sent["refused"]) <= {"ap-0"}  # ap-0 may finish first
    for i in (1, 2, 3):
        finished(http, f"ap-{i}", "completed")
    assert http.get("/workflows/ap-2").json()["generation"] == 1

    # retry a failed transfer from the start: it runs again (a new generation)
    retried = http.post("/workflows/t-bad/retry", params={"position": 0})
    assert retried.status_code == 200 and retried.json()["steps_kept"] == 0
    wait(lambda: http.get("/workflows/t-bad").json()["finished_at"] is not None, "t-bad again")
    events = [h["event"] for h in http.get("/workflows/t-bad").json()["history"]]
    assert events.count("RunFinished") == 2 and "RunReopened" in events

    # a child run's id has a slash: its routes take it
    assert (
        http.post("/workflows", json={"workflow": "parent", "id": "par", "input": 3}).status_code
        == 202
    )
    finished(http, "par", "completed")
    children = http.get("/workflows", params={"parent": "par"}).json()["runs"]
    assert len(children) == 2 and all("/" in c["run_id"] for c in children)
    child = http.get(f"/workflows/{children[0]['run_id']}").json()
    assert child["output"] == 6 and child["parent"] == "par"
    assert http.get(f"/console/workflows/{children[0]['run_id']}").status_code == 200

    # types, pause and unpause
    kinds = {t["workflow"]: t for t in http.get("/workflows/types").json()}
    assert kinds["approval"]["counts"]["completed"] == 4
    assert kinds["transfer"]["latest_version"] == 1 and kinds["transfer"]["paused"] is False
    assert http.post("/workflows/types/sleeper/pause").json()["paused"] is True
    http.post("/workflows", json={"workflow": "sleeper", "id": "zz-sleep", "input": 0.01})
    time.sleep(0.5)
    assert status_of(http, "zz-sleep") == "queued"
    assert {t["workflow"]: t for t in http.get("/workflows/types").json()}["sleeper"]["paused"]
    problem(http.post("/workflows/types/nothing/pause"), 404, "nothing")
    http.post("/workflows/types/sleeper/unpause")
    finished(http, "zz-sleep", "completed")

    # metrics per type and per step
    text = http.get("/metrics").text
    assert 'lagompy_workflow_runs{status="completed",workflow="approval"} 4.0' in text
    assert re.search(
        r'lagompy_workflow_steps_total\{outcome="failed",step="ask wf-account Withdraw",'
        r'workflow="transfer"\} \d', text
    )  # fmt: skip
    assert 'lagompy_workflow_step_seconds_total{step="ask wf-account Deposit"' in text
    assert 'lagompy_workflow_runs_finished_total{status="cancelled",workflow="approval"}' in text
    assert 'lagompy_workflow_run_seconds_total{workflow="sleeper"}' in text
    assert 'lagompy_workflow_started_total{workflow="transfer"}' in text

    # the CLI, through the same routes
    out = cli(http, "list", "--workflow", "approval")
    assert "ap-0" in out and "completed" in out and "RUN" in out
    assert "ap-0" not in cli(http, "list", "--status", "failed")
    out = cli(http, "show", "t-ok")
    assert "ask wf-account Deposit" in out and '"done"' in out
    assert "sleeper" in cli(http, "types")
    out = cli(http, "start", "approval", '"cli"', "--id", "cli-1")
    assert "run cli-1" in out
    wait(lambda: status_of(http, "cli-1") == "running", "cli-1 running")
    cli(http, "cancel", "cli-1", "--reason", "from the cli")
    finished(http, "cli-1", "cancelled")
    refused = runner.invoke(build_app(), ["workflows", "cancel", "--workflow", "approval",
                            "--url", str(http.base_url)])  # fmt: skip
    assert refused.exit_code == 1 and "--yes" in refused.output
    out = cli(http, "retry", "--id-prefix", "cli-", "--position", "0", "--yes")
    assert "1 of 1 runs" in out
    finished(http, "cli-1", "running")
    assert "index 0" in cli(http, "signal", "cli-1", "--name", "decision", "--payload", '"y"')
    finished(http, "cli-1", "completed")
    problem(http.post("/workflows/cli-1/cancel"), 409, "nothing to cancel")
    gone = runner.invoke(build_app(), ["workflows", "show", "nobody", "--url",
                         str(http.base_url)])  # fmt: skip
    assert gone.exit_code == 1 and "error: 404" in gone.output and "nobody" in gone.output
    # A URL or prefix with no workflow routes there: said so, not a bare "404: Not Found".
    elsewhere = runner.invoke(build_app(), ["workflows", "list", "--url", str(http.base_url),
                              "--prefix", "/nothing-here"])  # fmt: skip
    assert elsewhere.exit_code == 1, elsewhere.output
    assert "has no workflow routes under /nothing-here (404)" in elsewhere.output
    assert "paused" in cli(http, "pause", "transfer")
    assert "again" in cli(http, "unpause", "transfer")


def test_the_console_shows_runs_and_acts_on_them_with_the_token(served: httpx.Client) -> None:
    http = served
    for i in range(2):
        http.post("/workflows", json={"workflow": "approval", "id": f"c-{i}", "input": "x"})
    wait(lambda: len(http.get("/workflows", params={"status": "running"}).json()["runs"]) == 2,
         "two runs")  # fmt: skip
    page = http.get("/console/workflows", params={"workflow": "approval"})
    assert page.status_code == 200 and "c-0" in page.text and "c-1" in page.text
    assert 'href="/console/workflows"' in http.get("/console/").text  # the nav link
    one = http.get("/console/workflows/c-0")
    assert one.status_code == 200 and "approval" in one.text and "history" in one.text.lower()
    assert http.get("/console/workflows/nobody").status_code == 404
    assert http.get("/console/api/workflows").json()["runs"][0]["run_id"] == "c-0"
    bad = http.get("/console/workflows", params={"status": "lost"})
    assert bad.status_code == 400 and "status must be one of" in bad.text

    # read-only without the token; with it, audited; destructive ones need confirm
    refused = http.post("/console/workflows/actions/cancel", json={"run_id": "c-0"})
    assert refused.status_code == 401
    unconfirmed = http.post("/console/workflows/actions/cancel", json={"run_id": "c-0"},
                            headers=BEARER)  # fmt: skip
    assert unconfirmed.status_code == 400 and "confirm" in unconfirmed.text
    done = http.post("/console/workflows/actions/cancel", json={"run_id": "c-0",
                     "confirm": "true"}, headers=BEARER)  # fmt: skip
    assert done.status_code == 200, done.text
    finished(http, "c-0", "cancelled")
    signalled = http.post(
        "/console/workflows/actions/signal",
        json={"run_id": "c-1", "signal": "decision", "payload": '"go"'},
        headers=BEARER,
    )
    assert signalled.status_code == 200, signalled.text  # fmt: skip
    finished(http, "c-1", "completed")
    bulk = http.post("/console/workflows/actions/bulk-resume", json={"workflow": "approval",
                     "status": "cancelled", "confirm": "true"}, headers=BEARER)  # fmt: skip
    assert bulk.status_code == 200 and "1 of 1" in bulk.json()["detail"], bulk.text
    paused = http.post("/console/workflows/actions/pause", json={"workflow": "approval"},
                       headers=BEARER)  # fmt: skip
    assert paused.status_code == 200
    assert http.post("/console/workflows/actions/resume", json={"run_id": "nobody"},
                     headers=BEARER).status_code == 404  # fmt: skip
    audit = [(e["action"], e["target"], e["result"]) for e in http.get("/console/api/audit").json()]
    assert ("workflow-cancel", "workflow run c-0", "ok") in audit
    assert ("workflow-signal", "workflow run c-1", "ok") in audit
    assert ("workflow-pause", "workflow approval", "ok") in audit
    assert any(a == "workflow-bulk-resume" and "status=cancelled" in t for a, t, _ in audit)
    assert ("workflow-resume", "workflow run nobody", "refused") in audit


def test_a_console_without_workflows_says_so(journal_settings: JournalSettings) -> None:
    service = Service(name="plain", journal_settings=journal_settings, ray=False)
    app = FastAPI(lifespan=service.lifespan)
    service.install(app, console=ConsoleSettings(token=TOKEN))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        page = http.get("/console/workflows")
        assert page.status_code == 404 and "no WorkflowsComponent" in page.text
        assert http.get("/console/api/workflows").status_code == 404
        refused = http.post(
            "/console/workflows/actions/resume", json={"run_id": "x"}, headers=BEARER
        )
        assert refused.status_code == 404, refused.text
        assert http.get("/workflows").status_code == 404  # no routes either


def test_routes_without_authentication_are_announced(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="lagompy.workflow")
    WorkflowsComponent(workflows, routes=False)
    WorkflowsComponent(workflows, route_dependencies=[Depends(lambda: None)])
    assert not caplog.records
    WorkflowsComponent(workflows, prefix="/ops/runs")
    (warning,) = caplog.records
    assert "/ops/runs take no authentication" in warning.getMessage()
    assert "route_dependencies" in warning.getMessage()


def test_the_cli_never_shows_a_password_of_its_url() -> None:
    """An operator's --url may carry credentials: the errors show it with the password as ***."""
    result = runner.invoke(
        build_app(), ["workflows", "list", "--url", "http://ops:s3cret@127.0.0.1:1"]
    )
    assert result.exit_code == 1, result.output
    assert "cannot reach the service at http://ops:***@127.0.0.1:1" in result.output
    assert "s3cret" not in result.output
