"""Node loss on a simulated multi-node Ray cluster (``ray.cluster_utils.Cluster``).

The cluster owns the Ray of its process, so the scenario runs as a process of its own
(``tests/node_loss_scenario.py``, which documents what it checks) on each journal backend.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lagompy.settings import JournalSettings

REPO_ROOT = Path(__file__).resolve().parent.parent


async def test_a_lost_node_moves_its_host_and_loses_no_acknowledged_event(
    journal_settings: JournalSettings,
) -> None:
    command = [
        sys.executable,
        "-m",
        "tests.node_loss_scenario",
        "--url",
        journal_settings.url,
    ]
    if journal_settings.postgres_schema:
        command += ["--schema", journal_settings.postgres_schema]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RAY_ADDRESS", None)  # the scenario makes its own cluster
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            command,
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    except subprocess.TimeoutExpired as e:
        # What the child wrote so far: bytes here whatever text=True says.
        stderr = (e.stderr or b"").decode(errors="replace")
        pytest.fail(f"the node loss scenario did not finish in 240 s:\n{stderr[-3000:]}")
    summaries = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, (
        f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    )
    summary = json.loads(summaries[-1])
    # The scenario checked these already; restated so a change to it cannot loosen them.
    assert summary["acknowledged_before_removal"] > 0
    assert summary["recovery_seconds"] is not None and summary["recovery_seconds"] <= 30
    assert summary["host0_moved"] is True
    assert summary["twice"] == [] and summary["missing"] == []
    assert summary["state_differs_from_replay"] == {}
    assert summary["events"] == summary["acknowledged"]
    assert summary["actors_left"] == []
