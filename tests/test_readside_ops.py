"""Operating read sides from outside: ``lagompy projections ...`` (typer's CliRunner, and one
real subprocess) and the status route, on SQLite files and PostgreSQL schemas."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from typer.testing import CliRunner

from examples.user_service.entity import ChangeName, RegisterUser, UserEntity
from examples.user_service.projection import UsersProjection
from lagompy import JournalSettings, start_in_process
from lagompy.cli import build_app
from lagompy.journal import TailSettings
from lagompy.readside import ReadSide, open_projections, readside_router, start_readside

REPO = Path(__file__).resolve().parent.parent
FAST: dict[str, Any] = {
    "lease_ttl": 2.0,
    "renew_interval": 0.05,
    "tail": TailSettings(poll_interval=0.02),
}


def cli_args(journal_settings: JournalSettings) -> list[str]:
    args = ["--journal-url", journal_settings.url]
    if journal_settings.postgres_schema:
        args += ["--journal-schema", journal_settings.postgres_schema]
    return args


@pytest.fixture
async def users_readside(journal_settings: JournalSettings) -> AsyncIterator[ReadSide]:
    """The users projection of 12 users (3 renamed), caught up, workers stopped."""
    async with await start_in_process(entities=[UserEntity], settings=journal_settings) as ents:
        for i in range(12):
            await ents.ref_for(UserEntity, f"u{i}").ask(RegisterUser(f"U{i}", f"u{i}@x.org"))
        for i in range(3):
            await ents.ref_for(UserEntity, f"u{i}").ask(ChangeName(f"V{i}"))
    async with await start_readside(
        [UsersProjection], journal_settings=journal_settings, **FAST
    ) as rs:
        await rs.wait_until_caught_up()
        yield rs


async def user_count(rs: ReadSide) -> int:
    async with rs.projection.read() as conn:
        return int(await conn.scalar(text("SELECT count(*) FROM users")) or 0)


async def test_cli_status_pause_resume_set_offset(
    users_readside: ReadSide, journal_settings: JournalSettings
) -> None:
    app = build_app()
    runner = CliRunner()
    args = cli_args(journal_settings)

    async def run(*words: str) -> Any:
        # The command runs its own event loop (asyncio.run): in a thread, while the workers
        # go on in this one.
        return await asyncio.to_thread(runner.invoke, app, ["projections", *words, *args])

    result = await run("status")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["PROCESSOR", "TAG", "STATE", "OFFSET", "LAG"]
    assert [line.split()[:3] for line in lines[1:5]] == [
        ["users", f"user-events{i}", "running"] for i in range(4)
    ]
    # Below: the process running the processor (its one member) and the tags it holds.
    member = users_readside.member
    assert lines[5:] == [
        "",
        "MEMBERS",
        f"users  {member}  holds " + ", ".join(f"user-events{i}" for i in range(4)),
    ]

    result = await run("pause", "users", "--tag", "user-events1")
    assert (result.exit_code, result.stdout) == (0, "paused users (1 tag)\n")
    statuses = json.loads((await run("status", "users", "--json")).stdout)
    assert [s["paused"] for s in statuses] == [False, True, False, False]

    result = await run("resume", "users")
    assert (result.exit_code, result.stdout) == (0, "resumed users (4 tags)\n")

    async with users_readside.projection.write() as conn:
        await conn.execute(text("UPDATE users SET name = 'broken'"))
    result = await run("set-offset", "users", "user-events0", "0")
    assert result.exit_code == 0 and "resumes after offset 0" in result.stdout
    # The running worker of user-events0 loses its lease; the next holder replays the tag.
    shard0 = {f"u{i}" for i in range(12) if UserEntity.tag.shard_of(f"u{i}") == 0}
    assert shard0 and len(shard0) < 12
    deadline = time.monotonic() + 10
    while True:
        async with users_readside.projection.read() as conn:
            rows = (await conn.execute(text("SELECT user_id, name FROM users"))).all()
        fixed = {u for u, name in rows if name != "broken"}
        if fixed == shard0 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert fixed == shard0

    result = await run("pause", "nobody")
    assert result.exit_code == 1
    assert "error: no read-side offsets for processor 'nobody'" in result.stderr
    result = await asyncio.to_thread(
        runner.invoke,
        app,
        ["projections", "set-offset", *args, "--", "users", "user-events0", "-5"],
    )
    assert result.exit_code == 1 and "an offset must be an integer from 0" in result.stderr
    result = await asyncio.to_thread(
        runner.invoke,
        app,
        ["projections", "set-offset", *args, "users", "user-events0", str(2**64), "--force"],
    )
    assert result.exit_code == 1, result.output
    assert f"an offset must be an integer from 0 to {2**63 - 1}" in result.stderr
    assert "Traceback" not in result.output and "OverflowError" not in result.output


async def test_cli_rebuild_with_a_progress_bar(
    users_readside: ReadSide, journal_settings: JournalSettings
) -> None:
    rs = users_readside
    async with rs.projection.write() as conn:  # damage the projection
        await conn.execute(text("UPDATE users SET name = 'broken'"))
    # In a real process: the command line as users run it.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env = {k: v for k, v in env.items() if not k.startswith("LAGOMPY_")}
    # In a thread: the workers of this process go on (and release their SQLite locks).
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "lagompy",
            "projections",
            "rebuild",
            "examples.user_service.projection:UsersProjection",
            "--yes",
            *cli_args(journal_settings),
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "rebuilt users from 15 events" in done.stdout
    assert "15/15" in done.stdout  # the progress bar's last state
    async with rs.projection.read() as conn:
        rows = (await conn.execute(text("SELECT user_id, name FROM users"))).all()
        names: dict[str, str] = dict(rows)
    assert len(names) == 12
    assert all(names[f"u{i}"] == (f"V{i}" if i < 3 else f"U{i}") for i in range(12))

    runner = CliRunner()
    refused = await asyncio.to_thread(
        runner.invoke,
        build_app(),
        ["projections", "rebuild", "examples.user_service.entity:UserEntity", "--yes"],
    )
    assert refused.exit_code == 1 and "is not a SqlReadSideProcessor subclass" in refused.stderr
    aborted = await asyncio.to_thread(
        runner.invoke,
        build_app(),
        [
            "projections",
            "rebuild",
            "examples.user_service.projection:UsersProjection",
            *cli_args(journal_settings),
        ],
        input="n\n",
    )
    assert aborted.exit_code == 1 and await user_count(rs) == 12


async def test_status_route(users_readside: ReadSide, journal_settings: JournalSettings) -> None:
    async with await open_projections(journal_settings=journal_settings) as projections:
        app = FastAPI()
        app.include_router(readside_router(projections))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            everything = await client.get("/readside")
            assert everything.status_code == 200
            body = everything.json()
            assert [(s["processor"], s["tag"], s["state"]) for s in body] == [
                ("users", f"user-events{i}", "running") for i in range(4)
            ]
            assert sum(s["offset"] > 0 for s in body) >= 2 and all(
                s["lag_events"] == 0 for s in body
            )
            one = await client.get("/readside/users")
            assert one.status_code == 200 and len(one.json()) == 4
            missing = await client.get("/readside/nobody")
            assert missing.status_code == 404
            assert "no read-side processor 'nobody'" in missing.json()["detail"]
            members = await client.get("/readside/users/members")
            assert members.status_code == 200
            (member,) = members.json()
            assert member["member"] == users_readside.member
            assert member["tags"] == [f"user-events{i}" for i in range(4)]
            assert member["joined"] <= member["heartbeat"] < member["expires"]
            missing = await client.get("/readside/nobody/members")
            assert missing.status_code == 404
            assert "no read-side processor 'nobody'" in missing.json()["detail"]


def test_cli_refuses_a_sqlite_database_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    existing = tmp_path / "journal.db"
    existing.touch()
    runner = CliRunner()
    commands = [
        ["status"],
        ["status", "users", "--json"],
        ["pause", "users"],
        ["resume", "users"],
        ["skip", "users"],
        ["set-offset", "users", "t", "0"],
        ["set-offset", "users", "t", "0", "--force"],
    ]
    hints = {
        "projection": "--url or LAGOMPY_READSIDE_URL",
        "journal": "--journal-url or LAGOMPY_JOURNAL_URL",
    }
    for words in commands:
        apart = ["--url", f"sqlite:///{missing}", "--journal-url", f"sqlite:///{existing}"]
        for urls, what in (
            (apart, "projection"),
            (["--journal-url", f"sqlite:///{missing}"], "journal"),  # also the projection db
        ):
            result = runner.invoke(build_app(), ["projections", *words, *urls])
            assert result.exit_code == 1, (words, result.output)
            assert result.stderr == (
                f"error: the {what} database {missing} does not exist (check {hints[what]}); "
                "nothing was created\n"
            ), words
            assert not missing.exists()
    # The journal named apart from the projection database, where the command reads it.
    result = runner.invoke(
        build_app(),
        ["projections", "status", "--url", f"sqlite:///{existing}", "--journal-url",
         f"sqlite:///{missing}"],
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: the journal database {missing} does not exist")
    assert not missing.exists()


async def test_cli_shows_a_failure_apart_from_a_pause_and_skips_it(
    journal_settings: JournalSettings,
) -> None:
    from readside_processors import PoisonedCredits

    from lagompy.journal import open_storage
    from lagompy.testkit.readside import CONTRACT_TAG, readside_contract_serializer
    from tests.test_readside import Accounts

    async with await open_storage(
        settings=journal_settings, serializer=readside_contract_serializer()
    ) as storage:
        accounts = Accounts(storage)
        ok = await accounts.credit("ok", 1)
        bad = await accounts.credit("bad", 2)
    PoisonedCredits.poison = {"bad"}
    app = build_app()
    runner = CliRunner()
    args = cli_args(journal_settings)

    async def run(*words: str) -> Any:
        return await asyncio.to_thread(runner.invoke, app, ["projections", *words, *args])

    async def table() -> list[list[str]]:
        result = await run("status", "poisoned-credits")
        assert result.exit_code == 0, result.output
        return [line.split() for line in result.stdout.splitlines()]

    try:
        async with await start_readside(
            [PoisonedCredits],
            journal_settings=journal_settings,
            serializer=readside_contract_serializer(),
            max_attempts=1,
            retry_initial_delay=0,
            **FAST,
        ) as rs:
            deadline = time.monotonic() + 10
            while (await rs.status())[0].state != "failed":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            lines = await table()
            assert lines[1][:4] == ["poisoned-credits", CONTRACT_TAG, "failed", str(ok[0].offset)]
            assert lines[2][:3] == ["poisoned-credits", CONTRACT_TAG, "failed:"]
            assert " ".join(lines[2][3:]).startswith(
                f"handler failed at offset {bad[0].offset} (contract-account/bad sequence number 1)"
            )

            assert (await run("pause", "poisoned-credits")).exit_code == 0
            assert (await table())[1][2] == "failed,paused"
            (as_json,) = json.loads((await run("status", "poisoned-credits", "--json")).stdout)
            assert (as_json["state"], as_json["paused"]) == ("failed", True)
            assert (await run("resume", "poisoned-credits")).exit_code == 0
            deadline = time.monotonic() + 10
            while (await rs.status())[0].state != "failed" or (await rs.status())[0].paused:
                assert time.monotonic() < deadline  # resumed, retried, failed again
                await asyncio.sleep(0.02)

            skipped = await run("skip", "poisoned-credits")
            assert (skipped.exit_code, skipped.stdout) == (
                0,
                "skipped the failing event of poisoned-credits (1 tag)\n",
            )
            deadline = time.monotonic() + 10
            while (lines := await table())[1][2] != "running":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            assert lines[1][3] == str(bad[0].offset) and lines[1][7] == "1"  # OFFSET, SKIPPED
            nothing = await run("skip", "poisoned-credits")
            assert nothing.exit_code == 1 and "error: nothing to skip" in nothing.stderr

            beyond = str(bad[0].offset + 5)
            refused = await run("set-offset", "poisoned-credits", CONTRACT_TAG, beyond)
            assert refused.exit_code == 1
            assert f"error: offset {beyond} is beyond the head of tag" in refused.stderr
            forced = await run("set-offset", "poisoned-credits", CONTRACT_TAG, beyond, "--force")
            assert forced.exit_code == 0, forced.output
            deadline = time.monotonic() + 10
            while (lines := await table())[1][3] != beyond:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            assert lines[1][4] == "-5"  # LAG: negative, never 0
    finally:
        PoisonedCredits.poison = set()
