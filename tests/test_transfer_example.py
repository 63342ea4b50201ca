"""The transfer service example (examples/transfer_service) over HTTP, with the notification
service: a transfer completes and notifies, a rejected deposit compensates the withdrawal,
the transfer id is idempotent, and a notification service that is down does not undo a
transfer (its breaker opens; the step's failure is recorded)."""

from __future__ import annotations

from pathlib import Path

import httpx

from examples.notification_service.api import create_app as create_notifications
from examples.transfer_service.api import create_app as create_transfers
from lagompy import JournalSettings
from lagompy.service import BreakerRegistry, ServiceLocator
from lagompy.testkit.server import serve_in_thread
from lagompy.workflow import WorkflowSettings


async def test_transfers_complete_compensate_and_notify(
    journal_settings: JournalSettings, tmp_path: Path
) -> None:
    notifications_app = create_notifications(database_url=f"sqlite:///{tmp_path / 'n.db'}")
    with serve_in_thread(notifications_app) as notifications_url:
        locator = ServiceLocator({"notifications": notifications_url})
        app = create_transfers(
            journal_settings=journal_settings,
            ray=False,
            locator=locator,
            breakers=BreakerRegistry(),
            workflow_settings=WorkflowSettings(lease_ttl=2, renew_interval=0.5),
        )
        with serve_in_thread(app) as url:
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                await http.post("/accounts/alice/deposits", json={"amount": 100})
                await http.post("/accounts/carol/close")
                started = await http.put(
                    "/transfers/t1", json={"source": "alice", "target": "bob", "amount": 30}
                )
                assert started.status_code == 202, started.text
                done = (await http.get("/transfers/t1", params={"wait": 10})).json()
                assert done["status"] == "completed", done
                assert done["receipt"] == {
                    "source_balance": 70,
                    "target_balance": 30,
                    "notified": True,
                }
                assert done["steps"] == [
                    "ask account Withdraw",
                    "ask account Deposit",
                    "notify",
                ]
                sent = httpx.get(f"{notifications_url}/notifications").json()["items"]
                assert [n["id"] for n in sent] == ["transfer:t1"]

                again = await http.put(
                    "/transfers/t1", json={"source": "alice", "target": "bob", "amount": 30}
                )
                assert again.status_code == 202 and again.json()["status"] == "completed"
                other = await http.put(
                    "/transfers/t1", json={"source": "alice", "target": "bob", "amount": 31}
                )
                assert other.status_code == 409, other.text
                assert "another input" in other.json()["detail"]

                await http.put(
                    "/transfers/t2", json={"source": "alice", "target": "carol", "amount": 10}
                )
                failed = (await http.get("/transfers/t2", params={"wait": 10})).json()
                assert failed["status"] == "failed", failed
                assert failed["failed_steps"] == ["ask account Deposit"]
                assert "account carol is closed" in failed["error"]
                alice = (await http.get("/accounts/alice")).json()
                assert alice["balance"] == 70  # withdrawn, then compensated

                bad = await http.put(
                    "/transfers/t3", json={"source": "alice", "target": "bob", "amount": -1}
                )
                assert bad.status_code == 422
                assert (await http.get("/transfers/nope")).status_code == 404
    # The notification service is gone: the transfer completes, unnotified.
    with serve_in_thread(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            await http.put("/transfers/t4", json={"source": "alice", "target": "bob", "amount": 5})
            done = (await http.get("/transfers/t4", params={"wait": 20})).json()
            assert done["status"] == "completed", done
            assert done["receipt"]["notified"] is False
            assert done["failed_steps"] == ["notify"]
