"""``lagompy topics``: status, pause, resume and reset of subscriber groups, on a SQLite file
written by real subscribers (the embedded transport); bad input is one ``error:`` line."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

from typer.testing import CliRunner

from lagompy.cli import build_app
from lagompy.readside import ReadSideSettings
from lagompy.settings import JournalSettings
from lagompy.testkit.topics import Deposited, TopicEnv, contract_topic, recorder

runner = CliRunner()


def lagompy(*args: str) -> tuple[int, str]:
    result = runner.invoke(build_app(), list(args))
    return result.exit_code, result.output


def test_status_pause_resume_and_reset_of_a_group(tmp_path: Path) -> None:
    from lagompy.journal._storage import open_storage, serializer_for

    url = f"sqlite:///{tmp_path / 'topics.db'}"

    async def run_group() -> tuple[list[int], datetime]:
        settings = JournalSettings(url=url)
        serializer = serializer_for([contract_topic.source])
        serializer.register(contract_topic.message_type)
        storage = await open_storage(settings=settings, serializer=serializer)
        env = TopicEnv(storage, settings, ReadSideSettings(lease_ttl=1.0, renew_interval=0.1))
        try:
            first = await env.append(*(Deposited("cli", i) for i in range(3)))
            await asyncio.sleep(0.05)
            middle = datetime.now(UTC)
            await asyncio.sleep(0.05)
            later = await env.append(*(Deposited("cli", i) for i in range(3, 5)))
            running = await env.start(recorder("cli-group"))
            await running.wait_until_caught_up()
            await running.close()
            return [e.offset for e in first + later], middle
        finally:
            await env.close()

    offsets, middle = asyncio.run(run_group())
    tag = contract_topic.partition_tag(contract_topic.partition_of("cli"))
    common = ["--url", url, "--journal-url", url]

    code, out = lagompy("topics", "status", contract_topic.name, "--json", *common)
    assert code == 0, out
    rows = {r["tag"]: r for r in json.loads(out)}
    assert rows[tag]["processor"] == f"topic:{contract_topic.name}:cli-group"
    assert rows[tag]["offset"] == offsets[-1] and rows[tag]["lag_events"] == 0

    code, out = lagompy("topics", "pause", contract_topic.name, "cli-group", *common)
    assert code == 0 and "paused group 'cli-group'" in out and "(2 partitions)" in out
    code, out = lagompy("topics", "status", *common)
    assert code == 0 and "paused" in out and "cli-group" in out
    code, out = lagompy("topics", "resume", contract_topic.name, "cli-group", "--tag", tag, *common)
    assert code == 0 and "(1 partition)" in out

    code, out = lagompy(
        "topics", "reset", contract_topic.name, "cli-group", "--to-time", middle.isoformat(),
        "--tag", tag, *common,
    )  # fmt: skip
    assert code == 0, out
    assert f"resumes after offset {offsets[2]}" in out  # the last one written before the time
    code, out = lagompy(
        "topics", "reset", contract_topic.name, "cli-group", "--to-offset", "0", *common
    )
    assert code == 0 and out.count("resumes after offset 0") == 2

    # Bad input: one error line naming what was wrong, nothing changed.
    for args, words in (
        (["reset", contract_topic.name, "cli-group"], "exactly one of"),
        (["reset", contract_topic.name, "cli-group", "--to-time", "yesterday"], "ISO 8601"),
        (["reset", contract_topic.name, "cli-group", "--to-time", "2026-12-04T10:00"], "zone"),
        (["reset", contract_topic.name, "nobody", "--to-offset", "1"], "nobody"),
        (["status", "--url", f"sqlite:///{tmp_path / 'missing.db'}"], "does not exist"),
    ):
        code, out = lagompy("topics", *args, *(common if "--url" not in args else []))
        assert code == 1 and out.startswith("error:") and words in out, (args, out)
    assert not (tmp_path / "missing.db").exists()
